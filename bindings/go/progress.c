/* The C side of progress and log callbacks: user_data carries an integer (a
   runtime/cgo.Handle, or a log registration id), never a Go pointer. */
#include <stdint.h>
#include "spo_runtime.h"
#include "_cgo_export.h"

static int32_t progress_trampoline(void *user_data, uint32_t done, uint32_t total) {
  return goSpoProgress((uintptr_t)user_data, done, total);
}

spo_error *goSpoSetProgress(const spo_job *job, uintptr_t handle) {
  return spo_job_set_progress_callback(job, handle ? progress_trampoline : NULL, (void *)handle);
}

spo_error *goSpoSetTrainerProgress(const spo_trainer *trainer, uintptr_t handle) {
  return spo_trainer_set_progress_callback(trainer, handle ? progress_trampoline : NULL, (void *)handle);
}

static void log_trampoline(void *user_data, int32_t level, const char *message) {
  goSpoLog((uintptr_t)user_data, level, (char *)message);
}

spo_error *goSpoSetLog(const spo_runtime *runtime, uintptr_t id, int32_t max_level) {
  return spo_runtime_set_log_callback(runtime, id ? log_trampoline : NULL, (void *)id, max_level);
}

spo_error *goSpoSetOptionsLog(spo_options *options, uintptr_t id, int32_t max_level) {
  return spo_options_set_log_callback(options, id ? log_trampoline : NULL, (void *)id, max_level);
}

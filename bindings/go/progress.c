/* The C side of progress callbacks: user_data carries a runtime/cgo.Handle
   (an integer), never a Go pointer. */
#include <stdint.h>
#include "spo_runtime.h"
#include "_cgo_export.h"

static int32_t trampoline(void *user_data, uint32_t done, uint32_t total) {
  return goSpoProgress((uintptr_t)user_data, done, total);
}

spo_error *goSpoSetProgress(const spo_job *job, uintptr_t handle) {
  return spo_job_set_progress_callback(job, handle ? trampoline : NULL, (void *)handle);
}

/* C ABI tests for the SPO trainer on the tiny SD 1.5 fixture (with the toy
   colour preference model), run under valgrind by `make test`. Rounds are kept
   to 3 DDIM steps with pools of 2 so that valgrind stays fast. */
#include <math.h>
#include <stdint.h>
#include "check.h"

#define MODEL "tests/fixtures/tiny-sd15"
#define TRAIN_DIR "tests/fixtures/train/tiny-sd15/graphs"
#define OTHER_TRAIN_DIR "tests/fixtures/train/tiny-sdxl/graphs"
#define SPM "tests/fixtures/preference/colour"
#define OUT_DIR "tests/c/build"

static spo_runtime *g_rt;
static spo_pipeline *g_pipe;

static spo_options *trainer_options(const char *dir) {
  spo_options *o = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  if (dir) expect_ok(spo_options_set(o, "train.dir", dir), "train.dir");
  expect_ok(spo_options_set(o, "train.preference", SPM), "train.preference");
  expect_ok(spo_options_set(o, "train.preset", "toy"), "train.preset");
  expect_ok(spo_options_set(o, "train.steps", "3"), "train.steps");
  expect_ok(spo_options_set(o, "train.divert_start", "1"), "train.divert_start");
  expect_ok(spo_options_set(o, "train.pool", "2"), "train.pool");
  expect_ok(spo_options_set(o, "train.threshold", "0"), "train.threshold");
  return o;
}

/* Creating a trainer with `key` = `value` fails with `code`, naming `needle`. */
static void expect_bad_option(const char *key, const char *value, spo_code code, const char *needle) {
  spo_options *o = trainer_options(TRAIN_DIR);
  if (key) expect_ok(spo_options_set(o, key, value), key);
  spo_trainer *t = (spo_trainer *)0x1;
  expect_error(spo_trainer_create(g_pipe, o, &t), code, needle, key ? key : needle);
  CHECK(t == (spo_trainer *)0x1); /* not written on error */
  spo_options_free(o);
}

static void test_bad_options(void) {
  expect_bad_option("train.lrr", "1", SPO_ERR_UNKNOWN_OPTION, "train.lrr");
  expect_bad_option("train.pool", "1", SPO_ERR_INVALID_OPTION_VALUE, "train.pool");
  expect_bad_option("train.lr", "fast", SPO_ERR_INVALID_OPTION_VALUE, "train.lr");
  expect_bad_option("train.preset", "sdxxl", SPO_ERR_INVALID_OPTION_VALUE, "train.preset");
  spo_options *o = trainer_options(NULL);
  spo_trainer *t = NULL;
  expect_error(spo_trainer_create(g_pipe, o, &t), SPO_ERR_INVALID_OPTION_VALUE, "train.dir", "no train.dir");
  spo_options_free(o);
  /* A folder made from another UNet is refused before any graph is loaded. */
  o = trainer_options(OTHER_TRAIN_DIR);
  expect_error(spo_trainer_create(g_pipe, o, &t), SPO_ERR_INVALID_MODEL, "training folder", "other UNet");
  spo_options_free(o);
  expect_error(spo_trainer_create(NULL, NULL, &t), SPO_ERR_NULL_ARGUMENT, "pipeline", "NULL pipeline");
  expect_error(spo_trainer_create(g_pipe, NULL, NULL), SPO_ERR_NULL_ARGUMENT, "out", "NULL out");
}

static int g_calls;
static int g_cancel_at;
static int32_t on_progress(void *user_data, uint32_t done, uint32_t total) {
  (void)user_data;
  g_calls++;
  CHECK(done <= total);
  return g_cancel_at > 0 && g_calls >= g_cancel_at;
}

static int round_ok(spo_trainer *t, spo_train_metrics *m, const char *what) {
  const char *prompts[] = {"a red apple", "a blue car"};
  return expect_ok(spo_trainer_step(t, prompts, 2, m), what);
}

static void test_round_cancel_and_resume(spo_trainer *t) {
  const char *bad_utf8[] = {"a red \xff apple"};
  spo_train_metrics m;
  expect_error(spo_trainer_step(t, NULL, 1, &m), SPO_ERR_NULL_ARGUMENT, "prompts", "NULL prompts");
  expect_error(spo_trainer_step(t, bad_utf8, 1, &m), SPO_ERR_INVALID_UTF8, "prompts[0]", "bad UTF-8");
  expect_error(spo_trainer_step(t, bad_utf8, 0, &m), SPO_ERR_INVALID_ARGUMENT, "0 prompts", "no prompts");
  expect_ok(spo_trainer_set_progress_callback(t, on_progress, NULL), "progress");
  if (round_ok(t, &m, "round 0")) {
    CHECK(m.round == 0);
    CHECK(m.pools == 2); /* 2 prompts x one segment, steps 1-2 (the last step opens no pool) */
    CHECK(m.pairs > 0 && m.updates > 0 && isfinite(m.loss));
    CHECK(m.time_backward > 0.0);
    CHECK(g_calls > 0);
  }
  /* Cancelled from the callback: the round is dropped, the trainer unchanged. */
  g_cancel_at = g_calls + 2;
  expect_error(spo_trainer_step(t, (const char *[]){"a red apple"}, 1, &m), SPO_ERR_CANCELLED, NULL, "cancel");
  g_cancel_at = 0;
  expect_ok(spo_trainer_save_checkpoint(t, OUT_DIR "/trainer.ckpt"), "save checkpoint");
  spo_train_metrics a, b;
  if (round_ok(t, &a, "round 1")) CHECK(a.round == 1); /* the cancelled round did not count */
  /* Back to the checkpoint: the same round again, bit for bit. */
  expect_ok(spo_trainer_load_checkpoint(t, OUT_DIR "/trainer.ckpt"), "load checkpoint");
  if (round_ok(t, &b, "round 1 again")) {
    CHECK(b.round == 1);
    CHECK(a.loss == b.loss && a.score_mean == b.score_mean && a.grad_norm == b.grad_norm);
  }
  expect_error(spo_trainer_load_checkpoint(t, MODEL "/unet/config.json"), SPO_ERR_INVALID_FILE, "config.json",
               "not a checkpoint");
}

static void test_outputs(spo_trainer *t) {
  expect_ok(spo_trainer_save_lora(t, OUT_DIR "/trained_webui.safetensors", "webui"), "save webui");
  expect_ok(spo_trainer_save_lora(t, OUT_DIR "/trained_diffusers.safetensors", "diffusers"), "save diffusers");
  expect_error(spo_trainer_save_lora(t, OUT_DIR "/x.safetensors", "ckpt"), SPO_ERR_INVALID_ARGUMENT, "ckpt", "format");
  const char *files[] = {OUT_DIR "/trained_webui.safetensors", OUT_DIR "/trained_diffusers.safetensors"};
  for (int i = 0; i < 2; i++) {
    spo_lora *l = NULL;
    if (expect_ok(spo_lora_load(g_rt, files[i], &l), files[i])) {
      float w = 1.0f;
      expect_ok(spo_pipeline_set_loras(g_pipe, (const spo_lora *const *)&l, &w, 1, 0), "set trained LoRA");
      spo_lora_free(l);
    }
  }
  expect_ok(spo_trainer_apply(t, g_pipe), "apply");
  spo_options *o = NULL;
  expect_ok(spo_options_create(&o), "job options");
  expect_ok(spo_options_set(o, "steps", "2"), "steps");
  spo_job *j = NULL;
  if (expect_ok(spo_job_create(g_pipe, o, &j), "job with the trained LoRA")) {
    expect_ok(spo_job_run(j), "run");
    spo_job_free(j);
  }
  spo_options_free(o);
}

static void test_update(spo_trainer *t) {
  uint32_t shape[4] = {0, 0, 0, 0};
  expect_ok(spo_trainer_latent_shape(t, shape), "latent shape");
  CHECK(shape[0] == 1 && shape[1] == 4 && shape[2] == 8 && shape[3] == 8);
  size_t n = (size_t)shape[0] * shape[1] * shape[2] * shape[3];
  float *x = calloc(4 * n, sizeof(float));
  for (size_t i = 0; i < 4 * n; i++) x[i] = (float)((i * 37) % 19) / 19.0f - 0.5f;
  const char *prompts[] = {"a green field"};
  spo_train_pair pair = {0, 334, x, x + n, x + 2 * n, x + 3 * n};
  spo_train_metrics m;
  if (expect_ok(spo_trainer_update(t, prompts, 1, &pair, 1, &m), "update")) {
    CHECK(m.pairs == 1 && m.updates + m.skipped_updates == 1 && m.pools == 0);
  }
  pair.timestep = 500;
  expect_error(spo_trainer_update(t, prompts, 1, &pair, 1, &m), SPO_ERR_INVALID_ARGUMENT, "schedule", "timestep");
  pair.timestep = 334;
  pair.prompt = 3;
  expect_error(spo_trainer_update(t, prompts, 1, &pair, 1, &m), SPO_ERR_INVALID_ARGUMENT, "prompt 3", "prompt index");
  pair.prompt = 0;
  pair.x_prev_lose = NULL;
  expect_error(spo_trainer_update(t, prompts, 1, &pair, 1, &m), SPO_ERR_NULL_ARGUMENT, "x_prev_lose", "NULL latent");
  free(x);
}

int main(void) {
  spo_options *ro = NULL;
  expect_ok(spo_options_create(&ro), "options");
  expect_ok(spo_options_set(ro, "ep", "cpu"), "ep cpu");
  if (!expect_ok(spo_runtime_create(SPO_ABI_VERSION, ro, &g_rt), "runtime")) return finish("trainer.c");
  spo_options_free(ro);
  if (expect_ok(spo_pipeline_load(g_rt, MODEL, NULL, &g_pipe), "pipeline_load")) {
    test_bad_options();
    spo_options *o = trainer_options(TRAIN_DIR);
    spo_trainer *t = NULL;
    if (expect_ok(spo_trainer_create(g_pipe, o, &t), "trainer_create")) {
      test_round_cancel_and_resume(t);
      test_outputs(t);
      test_update(t);
      spo_trainer_cancel(NULL);
      spo_trainer_free(t);
    }
    spo_options_free(o);
    spo_pipeline_free(g_pipe);
  }
  spo_runtime_free(g_rt);
  return finish("trainer.c");
}

/* C ABI tests for pipelines, jobs and images on the tiny SD 1.5 fixture, run
   under valgrind by `make test`. Broken model folders are prepared by the
   Makefile in tests/c/build/ (a truncated unet/model.onnx, a missing tokenizer). */
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include "check.h"

#define MODEL "tests/fixtures/tiny-sd15"

static spo_runtime *g_rt;
static spo_pipeline *g_pipe;

static spo_options *job_options(const char *steps) {
  spo_options *o = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  expect_ok(spo_options_set(o, "prompt", "a lighthouse at dusk"), "set prompt");
  expect_ok(spo_options_set(o, "steps", steps), "set steps");
  expect_ok(spo_options_set(o, "width", "64"), "set width");
  expect_ok(spo_options_set(o, "height", "64"), "set height");
  return o;
}

/* A 2-step job with `key` set to `value` is refused with `code`, naming `needle`. */
static void expect_bad_job_option(const char *key, const char *value, spo_code code, const char *needle) {
  spo_options *o = job_options("2");
  spo_job *j = NULL;
  expect_ok(spo_options_set(o, key, value), key);
  expect_error(spo_job_create(g_pipe, o, &j), code, needle, key);
  CHECK(j == NULL);
  spo_options_free(o);
}

static int run_to_images(spo_job *job, const char *what) {
  spo_images *images = NULL;
  if (!expect_ok(spo_job_run(job), what)) return 0;
  if (!expect_ok(spo_job_take_images(job, &images), "take_images")) return 0;
  CHECK(spo_images_count(images) == 1);
  spo_image img = {0, 0, 0, NULL};
  if (expect_ok(spo_images_get(images, 0, &img), "images_get")) {
    CHECK(img.width == 64 && img.height == 64 && img.stride == 192 && img.data != NULL);
    long sum = 0;
    for (uint32_t i = 0; i < img.height * img.stride; i++) sum += img.data[i];
    CHECK(sum > 0); /* a real image, not an untouched buffer */
  }
  spo_image untouched = {7, 7, 7, NULL};
  expect_error(spo_images_get(images, 1, &untouched), SPO_ERR_INVALID_ARGUMENT, "out of range", "image index");
  CHECK(untouched.width == 7);
  /* Taking twice is an error. */
  spo_images *again = NULL;
  expect_error(spo_job_take_images(job, &again), SPO_ERR_INVALID_ARGUMENT, "already taken", "take twice");
  spo_images_free(images);
  return 1;
}

static void test_load_errors(void) {
  spo_pipeline *p = (spo_pipeline *)0x1;
  expect_error(spo_pipeline_load(g_rt, "/no/such/model", NULL, &p), SPO_ERR_INVALID_MODEL, "/no/such/model", "missing dir");
  expect_error(spo_pipeline_load(g_rt, "tests/c/build/broken-truncated", NULL, &p), SPO_ERR_INVALID_MODEL, "unet/model.onnx", "truncated unet");
  expect_error(spo_pipeline_load(g_rt, "tests/c/build/broken-notokenizer", NULL, &p), SPO_ERR_INVALID_MODEL, "tokenizer", "missing tokenizer");
  expect_error(spo_pipeline_load(g_rt, "tests/fixtures/tiny-sd15\xff", NULL, &p), SPO_ERR_INVALID_UTF8, "'dir'", "bad utf8 dir");
  CHECK(p == (spo_pipeline *)0x1);
}

static void test_nulls(void) {
  spo_pipeline *p = NULL;
  spo_job *j = NULL;
  spo_images *im = NULL;
  char *s = NULL;
  spo_image view;
  expect_error(spo_pipeline_load(NULL, MODEL, NULL, &p), SPO_ERR_NULL_ARGUMENT, "'runtime'", "load(NULL rt)");
  expect_error(spo_pipeline_load(g_rt, NULL, NULL, &p), SPO_ERR_NULL_ARGUMENT, "'dir'", "load(NULL dir)");
  expect_error(spo_pipeline_load(g_rt, MODEL, NULL, NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "load(NULL out)");
  expect_error(spo_pipeline_info(NULL, "kind", &s), SPO_ERR_NULL_ARGUMENT, "'pipeline'", "info(NULL)");
  expect_error(spo_pipeline_info(g_pipe, NULL, &s), SPO_ERR_NULL_ARGUMENT, "'key'", "info(NULL key)");
  expect_error(spo_pipeline_info(g_pipe, "kind", NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "info(NULL out)");
  expect_error(spo_job_create(NULL, NULL, &j), SPO_ERR_NULL_ARGUMENT, "'pipeline'", "job_create(NULL)");
  expect_error(spo_job_create(g_pipe, NULL, NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "job_create(NULL out)");
  expect_error(spo_job_step(NULL, NULL), SPO_ERR_NULL_ARGUMENT, "'job'", "step(NULL)");
  size_t shape[4];
  expect_error(spo_job_preview(NULL, NULL, 0, shape, NULL), SPO_ERR_NULL_ARGUMENT, "'job'", "preview(NULL)");
  expect_error(spo_job_run(NULL), SPO_ERR_NULL_ARGUMENT, "'job'", "run(NULL)");
  expect_error(spo_job_set_progress_callback(NULL, NULL, NULL), SPO_ERR_NULL_ARGUMENT, "'job'", "progress(NULL)");
  expect_error(spo_job_take_images(NULL, &im), SPO_ERR_NULL_ARGUMENT, "'job'", "take(NULL)");
  expect_error(spo_images_get(NULL, 0, &view), SPO_ERR_NULL_ARGUMENT, "'images'", "images_get(NULL)");
  CHECK(spo_images_count(NULL) == 0);
  spo_job_cancel(NULL);
  spo_job_free(NULL);
  spo_images_free(NULL);
  spo_pipeline_free(NULL);
  CHECK(p == NULL && j == NULL && im == NULL && s == NULL);
}

static void test_info_and_options(void) {
  char *v = NULL;
  if (expect_ok(spo_pipeline_info(g_pipe, "kind", &v), "info kind")) CHECK(strcmp(v, "sd15") == 0);
  spo_string_free(v);
  v = NULL;
  if (expect_ok(spo_pipeline_info(g_pipe, "ep.unet", &v), "info ep.unet")) CHECK(strcmp(v, "cpu") == 0);
  spo_string_free(v);
  expect_error(spo_pipeline_info(g_pipe, "nope", &v), SPO_ERR_INVALID_ARGUMENT, "'nope'", "unknown pipeline key");

  expect_bad_job_option("steps", "abc", SPO_ERR_INVALID_OPTION_VALUE, "'steps'");
  expect_bad_job_option("scheduler", "warp", SPO_ERR_INVALID_OPTION_VALUE, "scheduler");
  expect_bad_job_option("ep", "cpu", SPO_ERR_UNKNOWN_OPTION, "'ep'"); /* a runtime key given to a job */
  expect_bad_job_option("width", "65", SPO_ERR_INVALID_OPTION_VALUE, "65");
  expect_bad_job_option("step_math", "gpu", SPO_ERR_INVALID_OPTION_VALUE, "'step_math'");
  expect_bad_job_option("long_prompt", "wrap", SPO_ERR_INVALID_OPTION_VALUE, "'long_prompt'");
  /* Non-finite and meaningless numbers; the same refusals as the CLI's. */
  expect_bad_job_option("guidance", "nan", SPO_ERR_INVALID_OPTION_VALUE, "'nan'");
  expect_bad_job_option("guidance_rescale", "-inf", SPO_ERR_INVALID_OPTION_VALUE, "'-inf'");
  expect_bad_job_option("eta", "1e30", SPO_ERR_INVALID_OPTION_VALUE, "1e30");
  expect_bad_job_option("strength", "0.5", SPO_ERR_INVALID_OPTION_VALUE, "init_image");
  /* tiny-sd15 declares PNDMScheduler, which is not ported. */
  v = NULL;
  if (expect_ok(spo_pipeline_info(g_pipe, "scheduler.default", &v), "info scheduler.default"))
    CHECK(strcmp(v, "euler") == 0);
  spo_string_free(v);
}

/* The x0 preview after `done` steps: shape [1, 4, 8, 8], finite, not all zero. */
static void check_preview(spo_job *job, uint32_t done) {
  size_t shape[4] = {0, 0, 0, 0};
  uint32_t step = 0;
  if (!expect_ok(spo_job_preview(job, NULL, 0, shape, &step), "preview shape")) return;
  CHECK(shape[0] == 1 && shape[1] == 4 && shape[2] == 8 && shape[3] == 8);
  CHECK(step == done);
  float small[8];
  expect_error(spo_job_preview(job, small, 8, shape, NULL), SPO_ERR_INVALID_ARGUMENT, "needs 256", "preview capacity");
  float x0[256];
  for (int i = 0; i < 256; i++) x0[i] = 1e30f;
  if (!expect_ok(spo_job_preview(job, x0, 256, shape, NULL), "preview data")) return;
  int finite = 1, nonzero = 0;
  for (int i = 0; i < 256; i++) {
    finite &= x0[i] > -1e6f && x0[i] < 1e6f;
    nonzero |= x0[i] != 0.0f;
  }
  CHECK(finite && nonzero);
}

typedef struct {
  spo_job *job;
  int calls;
} preview_ctx;

/* Reads the preview from inside the progress callback, as a host UI would. */
static int preview_from_callback(void *user_data, uint32_t done, uint32_t total) {
  (void)total;
  preview_ctx *c = (preview_ctx *)user_data;
  check_preview(c->job, done);
  c->calls++;
  return 0;
}

static void test_generate_stepwise_and_busy(void) {
  spo_options *o = job_options("3");
  spo_job *a = NULL, *b = NULL;
  if (!expect_ok(spo_job_create(g_pipe, o, &a), "job a")) {
    spo_options_free(o);
    return;
  }
  /* One active job per pipeline. */
  expect_error(spo_job_create(g_pipe, o, &b), SPO_ERR_BUSY, "one job at a time", "busy");
  spo_images *im = NULL;
  expect_error(spo_job_take_images(a, &im), SPO_ERR_INVALID_ARGUMENT, "not finished", "take before done");
  size_t shape[4];
  expect_error(spo_job_preview(a, NULL, 0, shape, NULL), SPO_ERR_INVALID_ARGUMENT, "no preview yet", "preview before a step");
  expect_error(spo_job_preview(a, NULL, 0, NULL, NULL), SPO_ERR_NULL_ARGUMENT, "'shape'", "preview(shape NULL)");
  spo_job_status st = {0, 0, 0};
  int steps = 0;
  while (!st.finished && steps < 10) {
    if (!expect_ok(spo_job_step(a, &st), "step")) break;
    steps++;
    CHECK(st.total == 3);
    check_preview(a, (uint32_t)steps);
  }
  CHECK(steps == 3 && st.finished == 1 && st.done == 3);
  expect_ok(spo_job_take_images(a, &im), "take after steps");
  CHECK(spo_images_count(im) == 1);
  spo_images_free(im);
  spo_job_free(a);
  /* The slot is free again: a full run works, with previews read from the
     callback; this one runs the resident step graph (job a stepped on the
     host, the default on the CPU provider). */
  expect_ok(spo_options_set(o, "step_math", "graph"), "set step_math");
  if (expect_ok(spo_job_create(g_pipe, o, &b), "job b")) {
    preview_ctx pc = {b, 0};
    expect_ok(spo_job_set_progress_callback(b, preview_from_callback, &pc), "set progress");
    run_to_images(b, "run b");
    CHECK(pc.calls == 3);
    spo_job_free(b);
  }
  spo_options_free(o);
}

static int cancel_at_2(void *user_data, uint32_t done, uint32_t total) {
  (void)total;
  *(int *)user_data = (int)done;
  return done >= 2;
}

/* Cancel-from-thread handshake. The progress callback (on the job's thread)
   announces the first step, then blocks until the canceller says that
   spo_job_cancel has returned. So the cancel always lands mid-run, whatever
   the thread scheduler does (valgrind serialises threads), and no step of the
   test depends on timing. */
typedef struct {
  spo_job *job;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started;
  int cancel_returned;
  uint32_t calls;
} cancel_ctx;

static int signal_started(void *user_data, uint32_t done, uint32_t total) {
  (void)done;
  (void)total;
  cancel_ctx *c = (cancel_ctx *)user_data;
  pthread_mutex_lock(&c->mu);
  c->calls++;
  c->started = 1;
  pthread_cond_broadcast(&c->cv);
  while (!c->cancel_returned) pthread_cond_wait(&c->cv, &c->mu);
  pthread_mutex_unlock(&c->mu);
  return 0;
}

static void *canceller(void *arg) {
  cancel_ctx *c = (cancel_ctx *)arg;
  pthread_mutex_lock(&c->mu);
  while (!c->started) pthread_cond_wait(&c->cv, &c->mu);
  pthread_mutex_unlock(&c->mu);
  spo_job_cancel(c->job);
  pthread_mutex_lock(&c->mu);
  c->cancel_returned = 1;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

/* Cancels a running spo_job_run from another thread, in the given loop. */
static void cancel_from_thread(const char *step_math) {
  spo_options *o = job_options("6");
  expect_ok(spo_options_set(o, "step_math", step_math), "set step_math");
  cancel_ctx c = {0};
  pthread_mutex_init(&c.mu, NULL);
  pthread_cond_init(&c.cv, NULL);
  spo_job *j = NULL;
  if (expect_ok(spo_job_create(g_pipe, o, &j), "job thread")) {
    c.job = j;
    expect_ok(spo_job_set_progress_callback(j, signal_started, &c), "set progress");
    pthread_t t;
    pthread_create(&t, NULL, canceller, &c);
    expect_error(spo_job_run(j), SPO_ERR_CANCELLED, "cancelled", "cancel from thread");
    pthread_join(t, NULL);
    /* The run stopped right after the step during which the cancel landed. */
    CHECK(c.calls == 1);
    spo_job_free(j);
  }
  pthread_mutex_destroy(&c.mu);
  pthread_cond_destroy(&c.cv);
  spo_options_free(o);
}

/* A cancel from another thread that does not wait for the job: the job keeps
   stepping while the canceller runs, as in a host's UI thread. */
typedef struct {
  spo_job *job;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started;
  uint32_t calls;
  uint32_t calls_at_cancel;
  struct timespec cancelled_at;
} loose_cancel_ctx;

static double seconds_since(const struct timespec *t0) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) * 1e-9;
}

static int note_step(void *user_data, uint32_t done, uint32_t total) {
  (void)done;
  (void)total;
  loose_cancel_ctx *c = (loose_cancel_ctx *)user_data;
  pthread_mutex_lock(&c->mu);
  c->calls++;
  c->started = 1;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  return 0;
}

static void *loose_canceller(void *arg) {
  loose_cancel_ctx *c = (loose_cancel_ctx *)arg;
  pthread_mutex_lock(&c->mu);
  while (!c->started) pthread_cond_wait(&c->cv, &c->mu);
  clock_gettime(CLOCK_MONOTONIC, &c->cancelled_at);
  pthread_mutex_unlock(&c->mu);
  spo_job_cancel(c->job);
  /* Valgrind runs one thread at a time, so the job may take many steps before
     this thread runs at all: what is bounded is the steps after the cancel. */
  pthread_mutex_lock(&c->mu);
  c->calls_at_cancel = c->calls;
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

/* A 1000-step job cancelled from another thread returns within a bound, under
   valgrind too: the full run would take 1000 steps (minutes under valgrind), a
   cancel at most the step in flight (ONNX Runtime also stops the running graph
   between nodes, through the run options). */
static void cancel_long_job_is_prompt(void) {
  spo_options *o = job_options("1000");
  loose_cancel_ctx c;
  memset(&c, 0, sizeof c);
  pthread_mutex_init(&c.mu, NULL);
  pthread_cond_init(&c.cv, NULL);
  spo_job *j = NULL;
  if (expect_ok(spo_job_create(g_pipe, o, &j), "job 1000 steps")) {
    c.job = j;
    expect_ok(spo_job_set_progress_callback(j, note_step, &c), "set progress");
    pthread_t t;
    pthread_create(&t, NULL, loose_canceller, &c);
    expect_error(spo_job_run(j), SPO_ERR_CANCELLED, "cancelled", "cancel 1000-step job");
    pthread_join(t, NULL);
    double waited = seconds_since(&c.cancelled_at);
    printf("pipeline.c: 1000-step job returned %.2f s after the cancel, after %u steps (%u after "
           "the cancel returned)\n",
           waited, c.calls, c.calls - c.calls_at_cancel);
    CHECK(waited < 60.0);
    CHECK(c.calls >= 1 && c.calls < 1000 && c.calls - c.calls_at_cancel <= 1);
    spo_job_free(j);
  }
  pthread_mutex_destroy(&c.mu);
  pthread_cond_destroy(&c.cv);
  spo_options_free(o);
}

typedef struct {
  spo_job *job;
  int checked;
} reenter_ctx;

/* Calls back into its own job, which a callback may not do. */
static int reenter(void *user_data, uint32_t done, uint32_t total) {
  (void)done;
  (void)total;
  reenter_ctx *c = (reenter_ctx *)user_data;
  if (!c->checked) {
    expect_error(spo_job_step(c->job, NULL), SPO_ERR_BUSY, "own progress callback", "step from own callback");
    c->checked = 1;
  }
  return 0;
}

static void test_cancel(void) {
  spo_options *o = job_options("6");
  spo_job *j = NULL;
  /* Cancel through the progress callback. */
  int seen = 0;
  if (expect_ok(spo_job_create(g_pipe, o, &j), "job cb")) {
    expect_ok(spo_job_set_progress_callback(j, cancel_at_2, &seen), "set progress");
    expect_error(spo_job_run(j), SPO_ERR_CANCELLED, "cancelled", "cancel via callback");
    CHECK(seen == 2);
    /* A cancelled job stays cancelled. */
    expect_error(spo_job_step(j, NULL), SPO_ERR_CANCELLED, "cancelled", "step after cancel");
    spo_images *im = NULL;
    expect_error(spo_job_take_images(j, &im), SPO_ERR_INVALID_ARGUMENT, "was cancelled", "take after cancel");
    spo_job_free(j);
    j = NULL;
  }
  spo_options_free(o);
  /* Cancel from another thread while spo_job_run runs, in the resident loop
     and in the host loop. */
  cancel_from_thread("graph");
  cancel_from_thread("host");
  cancel_long_job_is_prompt();
  /* The pipeline is usable after a cancel. */
  o = job_options("2");
  if (expect_ok(spo_job_create(g_pipe, o, &j), "job after cancel")) {
    reenter_ctx rc = {j, 0};
    expect_ok(spo_job_set_progress_callback(j, reenter, &rc), "set progress");
    run_to_images(j, "run after cancel");
    CHECK(rc.checked == 1);
    spo_job_free(j);
  }
  spo_options_free(o);
}

int main(void) {
  spo_options *ro = NULL;
  expect_ok(spo_options_create(&ro), "options");
  expect_ok(spo_options_set(ro, "ep", "cpu"), "ep cpu");
  if (!expect_ok(spo_runtime_create(SPO_ABI_VERSION, ro, &g_rt), "runtime")) return finish("pipeline.c");
  spo_options_free(ro);
  test_load_errors();
  if (expect_ok(spo_pipeline_load(g_rt, MODEL, NULL, &g_pipe), "pipeline_load")) {
    test_nulls();
    test_info_and_options();
    test_generate_stepwise_and_busy();
    test_cancel();
    spo_pipeline_free(g_pipe);
  }
  spo_runtime_free(g_rt);
  return finish("pipeline.c");
}

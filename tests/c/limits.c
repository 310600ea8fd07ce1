/* C ABI tests for the request limits (limits.*, threads.intra) and for
   re-creating a runtime after the last one was freed, run under valgrind by
   `make test`. Absurd sizes must come back as errors naming the value, the
   limit and the option, never as an abort of the host. */
#include "check.h"

#define MODEL "tests/fixtures/tiny-sd15"

static spo_runtime *runtime_with(const char *key, const char *value, spo_error **err) {
  spo_options *o = NULL;
  spo_runtime *rt = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  expect_ok(spo_options_set(o, "ep", "cpu"), "ep cpu");
  if (key) expect_ok(spo_options_set(o, key, value), key);
  *err = spo_runtime_create(SPO_ABI_VERSION, o, &rt);
  spo_options_free(o);
  return rt;
}

/* A job of `w` x `h` (strings) is refused at creation with `code`, naming `needle`. */
static void expect_bad_size(spo_pipeline *p, const char *w, const char *h, spo_code code, const char *needle) {
  spo_options *o = NULL;
  spo_job *j = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  expect_ok(spo_options_set(o, "prompt", "a lighthouse"), "prompt");
  expect_ok(spo_options_set(o, "steps", "2"), "steps");
  expect_ok(spo_options_set(o, "width", w), "width");
  expect_ok(spo_options_set(o, "height", h), "height");
  expect_error(spo_job_create(p, o, &j), code, needle, w);
  CHECK(j == NULL);
  spo_options_free(o);
}

/* Generates one 64x64 image on a fresh pipeline of `rt`. */
static void generate(spo_runtime *rt, const char *what) {
  spo_pipeline *p = NULL;
  if (!expect_ok(spo_pipeline_load(rt, MODEL, NULL, &p), what)) return;
  spo_options *o = NULL;
  spo_job *j = NULL;
  spo_images *images = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  expect_ok(spo_options_set(o, "steps", "2"), "steps");
  expect_ok(spo_options_set(o, "width", "64"), "width");
  expect_ok(spo_options_set(o, "height", "64"), "height");
  if (expect_ok(spo_job_create(p, o, &j), what) && expect_ok(spo_job_run(j), what) &&
      expect_ok(spo_job_take_images(j, &images), what)) {
    CHECK(spo_images_count(images) == 1);
    spo_images_free(images);
  }
  spo_job_free(j);
  spo_options_free(o);
  spo_pipeline_free(p);
}

static void test_thread_limits(void) {
  spo_error *err = NULL;
  spo_runtime *rt = runtime_with("threads.intra", "1000000", &err);
  expect_error(err, SPO_ERR_INVALID_OPTION_VALUE, "threads.intra 1000000 exceeds the limit", "1e6 threads");
  CHECK(rt == NULL);
  rt = runtime_with("threads.intra", "99999999999999", &err);
  expect_error(err, SPO_ERR_INVALID_OPTION_VALUE, "limits.max_threads", "absurd threads");
  CHECK(rt == NULL);
  rt = runtime_with("limits.max_threads", "99999999999999", &err);
  expect_error(err, SPO_ERR_INVALID_OPTION_VALUE, "99999999999999", "absurd thread limit");
  CHECK(rt == NULL);
  rt = runtime_with("threads.intra", "2", &err);
  expect_ok(err, "2 threads");
  spo_runtime_free(rt);
}

static void test_size_limits(void) {
  spo_error *err = NULL;
  spo_runtime *rt = runtime_with(NULL, NULL, &err);
  spo_pipeline *p = NULL;
  if (!expect_ok(err, "runtime")) return;
  if (expect_ok(spo_pipeline_load(rt, MODEL, NULL, &p), "pipeline_load")) {
    expect_bad_size(p, "100000", "100000", SPO_ERR_INVALID_OPTION_VALUE,
                    "width 100000 exceeds the limit 16384 (option limits.max_side)");
    expect_bad_size(p, "4294967288", "4294967288", SPO_ERR_INVALID_OPTION_VALUE,
                    "width 4294967288 exceeds the limit");
    expect_bad_size(p, "16384", "16384", SPO_ERR_INVALID_OPTION_VALUE,
                    "size 16384x16384 = 268435456 pixels exceeds the limit 67108864 (option limits.max_pixels)");
    spo_pipeline_free(p);
  }
  spo_runtime_free(rt);
  /* A limit set low through options refuses a small request. */
  rt = runtime_with("limits.max_side", "32", &err);
  if (!expect_ok(err, "runtime max_side 32")) return;
  if (expect_ok(spo_pipeline_load(rt, MODEL, NULL, &p), "pipeline_load")) {
    expect_bad_size(p, "64", "32", SPO_ERR_INVALID_OPTION_VALUE, "width 64 exceeds the limit 32 (option limits.max_side)");
    spo_pipeline_free(p);
  }
  spo_runtime_free(rt);
}

/* Freeing the last runtime releases ONNX Runtime's environment; a runtime
   created afterwards must work as the first did. */
static void test_recreate(void) {
  for (int round = 0; round < 2; round++) {
    spo_error *err = NULL;
    spo_runtime *rt = runtime_with(NULL, NULL, &err);
    if (!expect_ok(err, "runtime (re)create")) return;
    generate(rt, round ? "generate after re-creation" : "generate");
    spo_runtime_free(rt);
  }
}

int main(void) {
  test_thread_limits();
  test_size_limits();
  test_recreate();
  return finish("limits.c");
}

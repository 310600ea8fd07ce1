/* C ABI tests for errors, options and the runtime, run under valgrind by
   `make test`. SPO_ORT_LIBRARY points at the fetched ONNX Runtime. */
#include <stdint.h>
#include "check.h"

typedef struct {
  int warnings;
  char last[1024];
} log_sink;

static void on_log(void *user_data, int32_t level, const char *message) {
  log_sink *s = (log_sink *)user_data;
  if (level == SPO_LOG_WARN) s->warnings++;
  snprintf(s->last, sizeof s->last, "%s", message);
}

static spo_options *options_with(const char *key, const char *value) {
  spo_options *o = NULL;
  expect_ok(spo_options_create(&o), "options_create");
  if (key) expect_ok(spo_options_set(o, key, value), key);
  return o;
}

static void test_wrong_library_paths(void) {
  /* Must run before any successful load: ONNX Runtime loads once per process. */
  spo_options *o = options_with("ort.library_path", "/nonexistent/dir/libonnxruntime.so");
  spo_runtime *rt = (spo_runtime *)0x1;
  spo_error *e = spo_runtime_create(SPO_ABI_VERSION, o, &rt);
  CHECK(rt == (spo_runtime *)0x1); /* out-param untouched on failure */
  CHECK(e && strstr(spo_error_message(e), "looked in") != NULL);
  expect_error(e, SPO_ERR_ORT_LOAD, "/nonexistent/dir/libonnxruntime.so", "bad ort.library_path");
  spo_options_free(o);

  /* The environment variable is reported the same way. */
  const char *saved = getenv("SPO_ORT_LIBRARY");
  char *copy = saved ? strdup(saved) : NULL;
  setenv("SPO_ORT_LIBRARY", "/also/missing/libonnxruntime.so", 1);
  e = spo_runtime_create(SPO_ABI_VERSION, NULL, &rt);
  expect_error(e, SPO_ERR_ORT_LOAD, "env SPO_ORT_LIBRARY -> /also/missing/libonnxruntime.so", "bad SPO_ORT_LIBRARY");
  if (copy) {
    setenv("SPO_ORT_LIBRARY", copy, 1);
    free(copy);
  } else {
    unsetenv("SPO_ORT_LIBRARY");
  }

  /* A file that is not ONNX Runtime. */
  o = options_with("ort.library_path", "/etc/hostname");
  expect_error(spo_runtime_create(SPO_ABI_VERSION, o, &rt), SPO_ERR_ORT_LOAD, "/etc/hostname", "non-library file");
  spo_options_free(o);
}

static void test_options(void) {
  spo_options *o = options_with(NULL, NULL);
  expect_error(spo_options_set(o, "stepz", "4"), SPO_ERR_UNKNOWN_OPTION, "'stepz'", "unknown key");
  expect_error(spo_options_set_json(o, "{\"cuda\": {\"nope\": 1}}"), SPO_ERR_UNKNOWN_OPTION, "'cuda.nope'", "unknown nested key");
  expect_error(spo_options_set_json(o, "{not json"), SPO_ERR_INVALID_OPTION_VALUE, "JSON", "bad json");
  expect_ok(spo_options_set_json(o, "{\"ep\": [\"cpu\"], \"cuda\": {\"device_id\": 0}}"), "json overlay");
  /* Invalid UTF-8 in key and value. */
  expect_error(spo_options_set(o, "ep\xff", "cpu"), SPO_ERR_INVALID_UTF8, "'key'", "bad utf8 key");
  expect_error(spo_options_set(o, "ep", "c\xc3\x28pu"), SPO_ERR_INVALID_UTF8, "'value'", "bad utf8 value");
  expect_error(spo_options_set_json(o, "{\"ep\": \"\xfe\"}"), SPO_ERR_INVALID_UTF8, "'json'", "bad utf8 json");
  expect_error(spo_options_set_log_callback(o, on_log, NULL, 9), SPO_ERR_INVALID_ARGUMENT, "log level 9", "bad log level");
  spo_options_free(o);
}

static void test_nulls(void) {
  spo_options *o = options_with(NULL, NULL);
  spo_runtime *rt = NULL;
  char *s = NULL;
  expect_error(spo_options_create(NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "options_create(NULL)");
  expect_error(spo_options_set(NULL, "ep", "cpu"), SPO_ERR_NULL_ARGUMENT, "'options'", "set(NULL options)");
  expect_error(spo_options_set(o, NULL, "cpu"), SPO_ERR_NULL_ARGUMENT, "'key'", "set(NULL key)");
  expect_error(spo_options_set(o, "ep", NULL), SPO_ERR_NULL_ARGUMENT, "'value'", "set(NULL value)");
  expect_error(spo_options_set_json(NULL, "{}"), SPO_ERR_NULL_ARGUMENT, "'options'", "set_json(NULL)");
  expect_error(spo_options_set_json(o, NULL), SPO_ERR_NULL_ARGUMENT, "'json'", "set_json(NULL json)");
  expect_error(spo_options_set_log_callback(NULL, on_log, NULL, SPO_LOG_INFO), SPO_ERR_NULL_ARGUMENT, "'options'", "set_log_callback(NULL)");
  expect_error(spo_runtime_create(SPO_ABI_VERSION, o, NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "runtime_create(NULL out)");
  expect_error(spo_runtime_info(NULL, "ep.active", &s), SPO_ERR_NULL_ARGUMENT, "'runtime'", "info(NULL rt)");
  expect_error(spo_runtime_set_log_callback(NULL, on_log, NULL, SPO_LOG_INFO), SPO_ERR_NULL_ARGUMENT, "'runtime'", "set_log_callback(NULL rt)");
  CHECK(spo_error_code(NULL) == SPO_OK);
  CHECK(strcmp(spo_error_message(NULL), "") == 0);
  spo_error_free(NULL);
  spo_options_free(NULL);
  spo_runtime_free(NULL);
  spo_string_free(NULL);
  CHECK(rt == NULL && s == NULL);
  spo_options_free(o);
}

static void test_runtime(void) {
  spo_runtime *rt = NULL;
  /* ABI mismatch is refused before anything is loaded. */
  expect_error(spo_runtime_create(SPO_ABI_VERSION + 1, NULL, &rt), SPO_ERR_ABI_MISMATCH, "ABI version", "abi mismatch");
  CHECK(rt == NULL);
  CHECK(spo_abi_version() == SPO_ABI_VERSION);
  CHECK(strlen(spo_version()) >= 5);

  /* Unknown and bad values name the key. */
  spo_options *o = options_with("ep", "cpu,tpu");
  expect_error(spo_runtime_create(SPO_ABI_VERSION, o, &rt), SPO_ERR_INVALID_OPTION_VALUE, "'tpu'", "unknown ep");
  spo_options_free(o);
  o = options_with("threads.intra", "many");
  expect_error(spo_runtime_create(SPO_ABI_VERSION, o, &rt), SPO_ERR_INVALID_OPTION_VALUE, "threads.intra", "bad threads");
  spo_options_free(o);

  /* CUDA requested on a machine without it: logged fallback, and ep.active tells the truth. */
  log_sink sink = {0, ""};
  o = options_with("ep", "cuda,cpu");
  expect_ok(spo_options_set_log_callback(o, on_log, &sink, SPO_LOG_INFO), "log callback");
  if (expect_ok(spo_runtime_create(SPO_ABI_VERSION, o, &rt), "runtime_create")) {
    char *v = NULL;
    if (expect_ok(spo_runtime_info(rt, "ep.active", &v), "info ep.active")) {
      char *avail = NULL;
      expect_ok(spo_runtime_info(rt, "ep.available", &avail), "info ep.available");
      if (avail && strstr(avail, "cuda") == NULL) {
        CHECK(strcmp(v, "cpu") == 0);
        CHECK(sink.warnings >= 1);
      }
      printf("ep.available=%s ep.active=%s\n", avail ? avail : "?", v);
      spo_string_free(avail);
    }
    spo_string_free(v);
    v = NULL;
    if (expect_ok(spo_runtime_info(rt, "ort.version", &v), "info ort.version")) CHECK(strncmp(v, "1.", 2) == 0);
    spo_string_free(v);
    v = NULL;
    if (expect_ok(spo_runtime_info(rt, "ort.library_path", &v), "info ort.library_path")) CHECK(strstr(v, "libonnxruntime") != NULL);
    spo_string_free(v);
    v = (char *)0x1;
    expect_error(spo_runtime_info(rt, "nope", &v), SPO_ERR_INVALID_ARGUMENT, "'nope'", "unknown info key");
    CHECK(v == (char *)0x1);
    expect_error(spo_runtime_info(rt, "\xff", &v), SPO_ERR_INVALID_UTF8, "'key'", "bad utf8 info key");
    expect_ok(spo_runtime_set_log_callback(rt, NULL, NULL, SPO_LOG_ERROR), "remove callback");
    spo_runtime_free(rt);
  }
  spo_options_free(o);

  /* A second runtime shares the loaded library; strict CUDA fails clearly without a GPU. */
  o = options_with("ep", "cuda");
  expect_ok(spo_options_set(o, "ep.strict", "true"), "set ep.strict");
  spo_error *e = spo_runtime_create(SPO_ABI_VERSION, o, &rt);
  if (e) {
    expect_error(e, SPO_ERR_EP_UNAVAILABLE, "cuda", "strict cuda");
  } else {
    spo_runtime_free(rt); /* a machine with CUDA */
  }
  spo_options_free(o);

  /* Asking for another library file after one is loaded is refused, naming both. */
  o = options_with("ort.library_path", "/etc/hostname");
  expect_error(spo_runtime_create(SPO_ABI_VERSION, o, &rt), SPO_ERR_ORT_LOAD, "already loaded", "second library");
  spo_options_free(o);
}

int main(void) {
  test_wrong_library_paths();
  test_options();
  test_nulls();
  test_runtime();
  return finish("runtime.c");
}

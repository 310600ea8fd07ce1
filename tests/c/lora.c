/* C ABI tests for LoRA handles and spo_pipeline_set_loras on the tiny SD 1.5
   fixture, under valgrind. The numbers are checked against diffusers in
   tests/lora_pipeline.rs; here the contract of the C calls is. */
#include <stdint.h>
#include <stdio.h>
#include "check.h"

#define MODEL "tests/fixtures/tiny-sd15"
#define LORA_A "tests/fixtures/lora/tiny-sd15/lora_a/kohya_flat.safetensors"
#define LORA_B "tests/fixtures/lora/tiny-sd15/lora_b/kohya_flat.safetensors"
#define LORA_XL "tests/fixtures/lora/tiny-sdxl/lora_a/kohya_flat.safetensors"

static void write_file(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  if (f) {
    if (n) fwrite(data, 1, n, f);
    fclose(f);
  }
}

static void test_load_errors(spo_runtime *rt) {
  spo_lora *l = (spo_lora *)0x1;
  expect_error(spo_lora_load(rt, "/no/such.safetensors", &l), SPO_ERR_IO, "/no/such.safetensors", "missing file");
  write_file("tests/c/build/empty.safetensors", "", 0);
  expect_error(spo_lora_load(rt, "tests/c/build/empty.safetensors", &l), SPO_ERR_INVALID_LORA, "empty.safetensors", "empty file");
  /* A header length far beyond the file. */
  const unsigned char huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, '{', '}', 0, 0, 0, 0, 0, 0};
  write_file("tests/c/build/huge.safetensors", huge, sizeof huge);
  expect_error(spo_lora_load(rt, "tests/c/build/huge.safetensors", &l), SPO_ERR_INVALID_LORA, "huge.safetensors", "header beyond file");
  CHECK(l == (spo_lora *)0x1);
  expect_error(spo_lora_load(NULL, LORA_A, &l), SPO_ERR_NULL_ARGUMENT, "'runtime'", "load(NULL rt)");
  expect_error(spo_lora_load(rt, NULL, &l), SPO_ERR_NULL_ARGUMENT, "'path'", "load(NULL path)");
  expect_error(spo_lora_load(rt, LORA_A, NULL), SPO_ERR_NULL_ARGUMENT, "'out'", "load(NULL out)");
  expect_error(spo_lora_load(rt, "bad\xff.safetensors", &l), SPO_ERR_INVALID_UTF8, "'path'", "bad utf8 path");
  spo_lora_free(NULL);
}

static int generate(spo_pipeline *p) {
  spo_options *o = NULL;
  spo_job *j = NULL;
  int ok = 0;
  expect_ok(spo_options_create(&o), "options");
  expect_ok(spo_options_set(o, "steps", "2"), "steps");
  expect_ok(spo_options_set(o, "width", "64"), "width");
  expect_ok(spo_options_set(o, "height", "64"), "height");
  if (expect_ok(spo_job_create(p, o, &j), "job")) ok = expect_ok(spo_job_run(j), "run");
  spo_job_free(j);
  spo_options_free(o);
  return ok;
}

int main(void) {
  spo_options *ro = NULL;
  spo_runtime *rt = NULL;
  spo_pipeline *p = NULL;
  expect_ok(spo_options_create(&ro), "options");
  expect_ok(spo_options_set(ro, "ep", "cpu"), "ep");
  if (!expect_ok(spo_runtime_create(SPO_ABI_VERSION, ro, &rt), "runtime")) return finish("lora.c");
  spo_options_free(ro);
  test_load_errors(rt);

  spo_lora *a = NULL, *b = NULL, *xl = NULL;
  expect_ok(spo_lora_load(rt, LORA_A, &a), "load a");
  expect_ok(spo_lora_load(rt, LORA_B, &b), "load b");
  expect_ok(spo_lora_load(rt, LORA_XL, &xl), "load xl");
  char *v = NULL;
  if (a && expect_ok(spo_lora_info(a, "rank", &v), "info rank")) CHECK(strcmp(v, "4") == 0);
  spo_string_free(v);
  v = NULL;
  if (a && expect_ok(spo_lora_info(a, "format", &v), "info format")) CHECK(strcmp(v, "Kohya") == 0);
  spo_string_free(v);
  expect_error(spo_lora_info(a, "nope", &v), SPO_ERR_INVALID_ARGUMENT, "'nope'", "unknown lora key");
  expect_error(spo_lora_info(NULL, "rank", &v), SPO_ERR_NULL_ARGUMENT, "'lora'", "info(NULL)");

  if (a && b && xl && expect_ok(spo_pipeline_load(rt, MODEL, NULL, &p), "pipeline")) {
    const spo_lora *both[2] = {a, b};
    const float mults[2] = {1.0f, 0.5f};
    expect_ok(spo_pipeline_set_loras(p, both, mults, 2, SPO_LORA_MERGE), "set two loras");
    if (expect_ok(spo_pipeline_info(p, "lora.mode", &v), "lora.mode")) CHECK(strcmp(v, "merge") == 0);
    spo_string_free(v);
    v = NULL;
    CHECK(generate(p));
    /* The handle may be freed once applied. */
    spo_lora_free(b);
    b = NULL;
    CHECK(generate(p));
    /* Errors leave the applied set in place. */
    const spo_lora *wrong[1] = {xl};
    expect_error(spo_pipeline_set_loras(p, wrong, mults, 1, SPO_LORA_MERGE), SPO_ERR_INVALID_LORA, "kohya_flat.safetensors", "sdxl lora on sd15");
    expect_error(spo_pipeline_set_loras(p, both, mults, 1, 7), SPO_ERR_INVALID_ARGUMENT, "mode 7", "bad mode");
    expect_error(spo_pipeline_set_loras(p, NULL, mults, 1, SPO_LORA_MERGE), SPO_ERR_NULL_ARGUMENT, "'loras'", "NULL loras");
    expect_error(spo_pipeline_set_loras(p, both, NULL, 1, SPO_LORA_MERGE), SPO_ERR_NULL_ARGUMENT, "'multipliers'", "NULL mults");
    const spo_lora *holes[1] = {NULL};
    expect_error(spo_pipeline_set_loras(p, holes, mults, 1, SPO_LORA_MERGE), SPO_ERR_NULL_ARGUMENT, "'loras[0]'", "NULL element");
    expect_error(spo_pipeline_set_loras(p, both, mults, 1, SPO_LORA_SLOTS), SPO_ERR_UNSUPPORTED, "--lora-slots", "slots without slots");
    expect_error(spo_pipeline_set_loras(NULL, NULL, NULL, 0, SPO_LORA_MERGE), SPO_ERR_NULL_ARGUMENT, "'pipeline'", "NULL pipeline");
    if (expect_ok(spo_pipeline_info(p, "lora.mode", &v), "lora.mode")) CHECK(strcmp(v, "merge") == 0);
    spo_string_free(v);
    v = NULL;
    /* n = 0 removes every LoRA. */
    expect_ok(spo_pipeline_set_loras(p, NULL, NULL, 0, SPO_LORA_AUTO), "remove loras");
    if (expect_ok(spo_pipeline_info(p, "lora.mode", &v), "lora.mode")) CHECK(strcmp(v, "none") == 0);
    spo_string_free(v);
    spo_pipeline_free(p);
  }
  spo_lora_free(a);
  spo_lora_free(b);
  spo_lora_free(xl);
  spo_runtime_free(rt);
  return finish("lora.c");
}

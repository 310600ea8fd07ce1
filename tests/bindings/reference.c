/* The reference image for the Go and C# binding tests, made through the C API
   alone: reference MODEL_DIR SEED OUT.rgb [LORA MULTIPLIER]. Writes the raw
   RGB8 rows (width * 3 bytes each, no padding) of a 64x64, 4-step euler run of
   the prompt "a red fox" at guidance 5, the settings the binding tests use. */
#include <stdio.h>
#include <stdlib.h>
#include "spo_runtime.h"

static int fail(spo_error *err) {
  fprintf(stderr, "reference: error %d: %s\n", (int)spo_error_code(err), spo_error_message(err));
  spo_error_free(err);
  return 1;
}

static spo_error *job_options(spo_options *o, const char *seed) {
  static const char *const kv[][2] = {{"prompt", "a red fox"}, {"steps", "4"},       {"width", "64"},
                                      {"height", "64"},        {"guidance", "5"},    {"scheduler", "euler"}};
  spo_error *err = NULL;
  for (size_t i = 0; !err && i < sizeof kv / sizeof kv[0]; i++) err = spo_options_set(o, kv[i][0], kv[i][1]);
  return err ? err : spo_options_set(o, "seed", seed);
}

static int write_rgb(const char *path, const spo_image *img) {
  FILE *f = fopen(path, "wb");
  if (!f) return 1;
  int bad = 0;
  for (uint32_t y = 0; y < img->height && !bad; y++)
    bad = fwrite(img->data + (size_t)y * img->stride, 3, img->width, f) != img->width;
  return fclose(f) != 0 || bad;
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 6) {
    fprintf(stderr, "usage: %s MODEL_DIR SEED OUT.rgb [LORA MULTIPLIER]\n", argv[0]);
    return 2;
  }
  spo_runtime *rt = NULL;
  spo_pipeline *pipe = NULL;
  spo_lora *lora = NULL;
  spo_options *jo = NULL;
  spo_job *job = NULL;
  spo_images *images = NULL;
  spo_image img = {0, 0, 0, NULL};
  spo_error *err = spo_runtime_create(SPO_ABI_VERSION, NULL, &rt);
  if (!err) err = spo_pipeline_load(rt, argv[1], NULL, &pipe);
  if (!err && argc == 6) err = spo_lora_load(rt, argv[4], &lora);
  if (!err && lora) {
    const spo_lora *list[1] = {lora};
    float mult[1] = {strtof(argv[5], NULL)};
    err = spo_pipeline_set_loras(pipe, list, mult, 1, SPO_LORA_MERGE);
  }
  if (!err) err = spo_options_create(&jo);
  if (!err) err = job_options(jo, argv[2]);
  if (!err) err = spo_job_create(pipe, jo, &job);
  if (!err) err = spo_job_run(job);
  if (!err) err = spo_job_take_images(job, &images);
  if (!err) err = spo_images_get(images, 0, &img);
  int rc = err ? fail(err) : write_rgb(argv[3], &img);
  if (!err && rc) fprintf(stderr, "reference: cannot write %s\n", argv[3]);
  spo_images_free(images);
  spo_job_free(job);
  spo_options_free(jo);
  spo_lora_free(lora);
  spo_pipeline_free(pipe);
  spo_runtime_free(rt);
  return rc;
}

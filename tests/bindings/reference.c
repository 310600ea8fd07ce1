/* The reference images of the Go and C# binding tests, made through the C API
   alone: reference CASE.txt OUT.rgb [lora]. Renders the case file's job.*
   settings on its model (with "lora": its LoRA merged at its multiplier) and
   writes the raw RGB8 rows, width * 3 bytes each, no padding. Paths in the case
   file are relative to the working directory (the repository root). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "spo_runtime.h"

struct reference_case {
  char model[512], lora[512], multiplier[32];
  spo_options *job;
};

static int fail(spo_error *err) {
  fprintf(stderr, "reference: error %d: %s\n", (int)spo_error_code(err), spo_error_message(err));
  spo_error_free(err);
  return 1;
}

static void copy(char *dst, size_t cap, const char *src) { snprintf(dst, cap, "%s", src); }

/* Reads KEY=VALUE lines ('#' starts a comment line); job.KEY goes to the job options. */
static spo_error *read_case(const char *path, struct reference_case *c) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "reference: cannot open %s\n", path);
    exit(1);
  }
  spo_error *err = spo_options_create(&c->job);
  char line[1024];
  while (!err && fgets(line, sizeof line, f)) {
    line[strcspn(line, "\r\n")] = 0;
    char *eq = strchr(line, '=');
    if (line[0] == '#' || line[0] == 0) continue;
    if (!eq) {
      fprintf(stderr, "reference: %s: line without '=': %s\n", path, line);
      exit(1);
    }
    *eq = 0;
    if (strncmp(line, "job.", 4) == 0) err = spo_options_set(c->job, line + 4, eq + 1);
    else if (strcmp(line, "model") == 0) copy(c->model, sizeof c->model, eq + 1);
    else if (strcmp(line, "lora") == 0) copy(c->lora, sizeof c->lora, eq + 1);
    else if (strcmp(line, "lora_multiplier") == 0) copy(c->multiplier, sizeof c->multiplier, eq + 1);
  }
  fclose(f);
  return err;
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
  if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "lora") != 0)) {
    fprintf(stderr, "usage: %s CASE.txt OUT.rgb [lora]\n", argv[0]);
    return 2;
  }
  struct reference_case c = {"", "", "", NULL};
  spo_runtime *rt = NULL;
  spo_pipeline *pipe = NULL;
  spo_lora *lora = NULL;
  spo_job *job = NULL;
  spo_images *images = NULL;
  spo_image img = {0, 0, 0, NULL};
  spo_error *err = read_case(argv[1], &c);
  if (!err) err = spo_runtime_create(SPO_ABI_VERSION, NULL, &rt);
  if (!err) err = spo_pipeline_load(rt, c.model, NULL, &pipe);
  if (!err && argc == 4) err = spo_lora_load(rt, c.lora, &lora);
  if (!err && lora) {
    const spo_lora *list[1] = {lora};
    float mult[1] = {strtof(c.multiplier, NULL)};
    err = spo_pipeline_set_loras(pipe, list, mult, 1, SPO_LORA_MERGE);
  }
  if (!err) err = spo_job_create(pipe, c.job, &job);
  if (!err) err = spo_job_run(job);
  if (!err) err = spo_job_take_images(job, &images);
  if (!err) err = spo_images_get(images, 0, &img);
  int rc = err ? fail(err) : write_rgb(argv[2], &img);
  if (!err && rc) fprintf(stderr, "reference: cannot write %s\n", argv[2]);
  spo_images_free(images);
  spo_job_free(job);
  spo_options_free(c.job);
  spo_lora_free(lora);
  spo_pipeline_free(pipe);
  spo_runtime_free(rt);
  return rc;
}

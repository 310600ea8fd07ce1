/* Text-to-image through the C API: txt2img MODEL_DIR "prompt" OUT.png [steps] */
#include <stdio.h>
#include <stdlib.h>
#include "png_write.h"
#include "spo_runtime.h"

static int progress(void *user_data, uint32_t done, uint32_t total) {
  (void)user_data;
  fprintf(stderr, "\rstep %u/%u", done, total);
  if (done == total) fputc('\n', stderr);
  return 0; /* nonzero would cancel */
}

static int fail(spo_error *err) {
  fprintf(stderr, "error %d: %s\n", (int)spo_error_code(err), spo_error_message(err));
  spo_error_free(err);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s MODEL_DIR PROMPT OUT.png [STEPS]\n", argv[0]);
    return 2;
  }
  spo_runtime *rt = NULL;
  spo_pipeline *pipe = NULL;
  spo_job *job = NULL;
  spo_images *images = NULL;
  spo_options *jo = NULL;
  spo_error *err = spo_runtime_create(SPO_ABI_VERSION, NULL, &rt);
  if (!err) err = spo_pipeline_load(rt, argv[1], NULL, &pipe);
  if (!err) err = spo_options_create(&jo);
  if (!err) err = spo_options_set(jo, "prompt", argv[2]);
  if (!err) err = spo_options_set(jo, "steps", argc > 4 ? argv[4] : "8");
  if (!err) err = spo_options_set(jo, "seed", "42");
  if (!err) err = spo_job_create(pipe, jo, &job);
  if (!err) err = spo_job_set_progress_callback(job, progress, NULL);
  if (!err) err = spo_job_run(job);
  if (!err) err = spo_job_take_images(job, &images);
  int rc = 0;
  if (err) {
    rc = fail(err);
  } else {
    spo_image img;
    err = spo_images_get(images, 0, &img);
    if (err) {
      rc = fail(err);
    } else if (png_write_rgb(argv[3], img.data, img.width, img.height, img.stride) != 0) {
      fprintf(stderr, "cannot write %s\n", argv[3]);
      rc = 1;
    } else {
      printf("wrote %s (%ux%u)\n", argv[3], img.width, img.height);
    }
  }
  spo_images_free(images);
  spo_job_free(job);
  spo_options_free(jo);
  spo_pipeline_free(pipe);
  spo_runtime_free(rt);
  return rc;
}

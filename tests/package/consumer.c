/* A program of a user's own, built outside the repository against an installed
 * spo-runtime (tests/package/run.sh): consumer MODEL_DIR
 * Prints the library version and where ONNX Runtime was loaded from, then
 * generates one image and prints its size. */
#include <stdio.h>
#include <string.h>
#include <spo_runtime.h>

static int fail(const char *what, spo_error *err) {
  fprintf(stderr, "consumer: %s: error %d: %s\n", what, (int)spo_error_code(err),
          spo_error_message(err));
  spo_error_free(err);
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
    return 2;
  }
  spo_runtime *rt = NULL;
  spo_pipeline *pipe = NULL;
  spo_options *jo = NULL;
  spo_job *job = NULL;
  spo_images *images = NULL;
  char *ort_path = NULL;
  int rc = 0;
  spo_error *err = spo_runtime_create(SPO_ABI_VERSION, NULL, &rt);
  if (err) return fail("runtime", err);
  if ((err = spo_runtime_info(rt, "ort.library_path", &ort_path))) {
    rc = fail("runtime info", err);
    goto done;
  }
  printf("consumer: spo-runtime %s (ABI %u), ONNX Runtime from %s\n", spo_version(),
         spo_abi_version(), ort_path);
  err = spo_pipeline_load(rt, argv[1], NULL, &pipe);
  if (!err) err = spo_options_create(&jo);
  if (!err) err = spo_options_set(jo, "prompt", "a lighthouse");
  if (!err) err = spo_options_set(jo, "steps", "2");
  if (!err) err = spo_options_set(jo, "seed", "1");
  if (!err) err = spo_job_create(pipe, jo, &job);
  if (!err) err = spo_job_run(job);
  if (!err) err = spo_job_take_images(job, &images);
  spo_image img;
  if (!err) err = spo_images_get(images, 0, &img);
  if (err) {
    rc = fail("generate", err);
    goto done;
  }
  printf("consumer: generated %zu image of %ux%u\n", spo_images_count(images), img.width,
         img.height);
done:
  spo_images_free(images);
  spo_job_free(job);
  spo_options_free(jo);
  spo_pipeline_free(pipe);
  spo_string_free(ort_path);
  spo_runtime_free(rt);
  return rc;
}

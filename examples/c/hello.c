/* The smallest spo-runtime host: create a runtime, print what it runs on. */
#include <stdio.h>
#include "spo_runtime.h"

int main(void) {
  spo_options *opts = NULL;
  spo_runtime *rt = NULL;
  spo_error *err = spo_options_create(&opts);
  if (!err) err = spo_options_set(opts, "ep", "cuda,cpu");
  if (!err) err = spo_runtime_create(SPO_ABI_VERSION, opts, &rt);
  spo_options_free(opts);
  if (err) {
    fprintf(stderr, "error %d: %s\n", (int)spo_error_code(err), spo_error_message(err));
    spo_error_free(err);
    return 1;
  }
  const char *keys[] = {"version", "ort.version", "ort.library_path", "ep.available", "ep.active"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    char *v = NULL;
    err = spo_runtime_info(rt, keys[i], &v);
    if (err) {
      fprintf(stderr, "%s: %s\n", keys[i], spo_error_message(err));
      spo_error_free(err);
      continue;
    }
    printf("%-18s %s\n", keys[i], v);
    spo_string_free(v);
  }
  spo_runtime_free(rt);
  return 0;
}

/* Tiny assertion helpers shared by the C ABI tests. */
#ifndef SPO_TEST_CHECK_H
#define SPO_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "spo_runtime.h"

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    g_checks++;                                                                \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      g_failures++;                                                            \
    }                                                                          \
  } while (0)

/* Expects `err` to be non-NULL with `code` and a message containing `needle`
   (NULL: any message). Frees the error. */
static void expect_error(spo_error *err, spo_code code, const char *needle, const char *what) {
  g_checks++;
  if (err == NULL) {
    fprintf(stderr, "FAIL %s: expected error code %d, got success\n", what, (int)code);
    g_failures++;
    return;
  }
  const char *msg = spo_error_message(err);
  if (spo_error_code(err) != code || (needle && strstr(msg, needle) == NULL)) {
    fprintf(stderr, "FAIL %s: got code %d message '%s'; wanted code %d containing '%s'\n", what,
            (int)spo_error_code(err), msg, (int)code, needle ? needle : "");
    g_failures++;
  }
  spo_error_free(err);
}

/* Expects success; prints and frees the error otherwise. */
static int expect_ok(spo_error *err, const char *what) {
  g_checks++;
  if (err != NULL) {
    fprintf(stderr, "FAIL %s: code %d: %s\n", what, (int)spo_error_code(err), spo_error_message(err));
    spo_error_free(err);
    g_failures++;
    return 0;
  }
  return 1;
}

static int finish(const char *name) {
  printf("%s: %d passed, %d failed\n", name, g_checks - g_failures, g_failures);
  return g_failures ? 1 : 0;
}
#endif

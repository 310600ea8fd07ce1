/* An engine-style host: the library is loaded at run time (dlopen, no link-time
   dependency), and a frame loop advances a generation one spo_job_step per
   frame while it keeps simulating its own world, shows progress and x0 preview
   statistics, writes the last preview, and cancels a job when a game event
   asks for it.

   engine-host LIBRARY.so MODEL_DIR PREVIEW.pgm

   Job 1 runs to the end; job 2 is cancelled when the "player leaves" (after
   CANCEL_AFTER steps); job 3 shows that the pipeline is free again. Exits
   nonzero when any of that does not happen. */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "spo_runtime.h"

/* The entry points used, typed from the header's own declarations. */
#define SPO_API(X)                                                                      \
  X(spo_abi_version) X(spo_error_code) X(spo_error_message) X(spo_error_free)          \
  X(spo_options_create) X(spo_options_set) X(spo_options_free) X(spo_runtime_create)    \
  X(spo_runtime_free) X(spo_pipeline_load) X(spo_pipeline_free) X(spo_job_create)      \
  X(spo_job_step) X(spo_job_cancel) X(spo_job_preview) X(spo_job_take_images)          \
  X(spo_job_free) X(spo_images_get) X(spo_images_free)

struct api {
  void *lib;
#define FIELD(name) __typeof__(name) *name;
  SPO_API(FIELD)
#undef FIELD
};

enum { STEPS = 5, CANCEL_AFTER = 2, MAX_FRAMES = 200 };

static int load_api(struct api *api, const char *path) {
  api->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!api->lib) {
    fprintf(stderr, "engine-host: cannot load %s: %s\n", path, dlerror());
    return 1;
  }
#define LOAD(name)                                                                \
  *(void **)&api->name = dlsym(api->lib, #name);                                  \
  if (!api->name) {                                                               \
    fprintf(stderr, "engine-host: %s lacks the symbol %s\n", path, #name);        \
    return 1;                                                                     \
  }
  SPO_API(LOAD)
#undef LOAD
  if (api->spo_abi_version() != SPO_ABI_VERSION) {
    fprintf(stderr, "engine-host: %s has ABI %u, this host was built for %u\n", path,
            api->spo_abi_version(), (unsigned)SPO_ABI_VERSION);
    return 1;
  }
  return 0;
}

/* Prints and frees an error; returns its code. */
static spo_code report(const struct api *api, spo_error *err, const char *what) {
  spo_code code = api->spo_error_code(err);
  if (err) fprintf(stderr, "engine-host: %s: error %u: %s\n", what, (unsigned)code, api->spo_error_message(err));
  api->spo_error_free(err);
  return code;
}

/* The engine's own per-frame work: a particle bouncing in a box. */
struct world {
  double x, v;
  unsigned bounces;
};

static void world_update(struct world *w, double dt) {
  w->x += w->v * dt;
  if (w->x < 0 || w->x > 1) {
    w->v = -w->v;
    w->x = w->x < 0 ? -w->x : 2 - w->x;
    w->bounces++;
  }
}

struct preview {
  size_t shape[4];
  uint32_t step;
  float *data;
  size_t cap;
};

/* Fetches the x0 preview of the latest step and prints its statistics. */
static int show_preview(const struct api *api, const spo_job *job, struct preview *p) {
  spo_error *err = api->spo_job_preview(job, NULL, 0, p->shape, &p->step);
  if (err) return report(api, err, "preview shape") != SPO_OK;
  size_t n = p->shape[0] * p->shape[1] * p->shape[2] * p->shape[3];
  if (n > p->cap) {
    float *grown = realloc(p->data, n * sizeof *grown);
    if (!grown) return 1;
    p->data = grown;
    p->cap = n;
  }
  err = api->spo_job_preview(job, p->data, p->cap, p->shape, &p->step);
  if (err) return report(api, err, "preview") != SPO_OK;
  double sum = 0, sq = 0, lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < n; i++) {
    sum += p->data[i];
    sq += (double)p->data[i] * p->data[i];
    lo = fmin(lo, p->data[i]);
    hi = fmax(hi, p->data[i]);
  }
  double mean = sum / (double)n;
  printf("    x0 preview of step %u [%zu,%zu,%zu,%zu]: mean %+.3f std %.3f range [%+.3f, %+.3f]\n", p->step,
         p->shape[0], p->shape[1], p->shape[2], p->shape[3], mean, sqrt(fmax(sq / (double)n - mean * mean, 0)), lo, hi);
  return !(isfinite(mean) && hi > lo);
}

/* Writes latent channel 0 of the preview as a grey PGM, stretched to 0..255. */
static int write_preview(const struct preview *p, const char *path) {
  size_t h = p->shape[2], w = p->shape[3];
  float lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < h * w; i++) {
    lo = fminf(lo, p->data[i]);
    hi = fmaxf(hi, p->data[i]);
  }
  FILE *f = fopen(path, "wb");
  if (!f) return 1;
  fprintf(f, "P5\n%zu %zu\n255\n", w, h);
  for (size_t i = 0; i < h * w; i++) fputc((int)lrintf(255.0f * (p->data[i] - lo) / (hi - lo)), f);
  return fclose(f) != 0;
}

static spo_job *start_job(const struct api *api, const spo_pipeline *pipe, const char *prompt, const char *steps) {
  spo_options *o = NULL;
  spo_job *job = NULL;
  spo_error *err = api->spo_options_create(&o);
  if (!err) err = api->spo_options_set(o, "prompt", prompt);
  if (!err) err = api->spo_options_set(o, "steps", steps);
  if (!err) err = api->spo_options_set(o, "seed", "42");
  if (!err) err = api->spo_job_create(pipe, o, &job);
  if (err) report(api, err, "job");
  api->spo_options_free(o);
  return job;
}

struct outcome {
  uint32_t steps;
  int finished, cancelled;
};

/* Plays frames until the job ends: one world update and one job step per
   frame. With cancel_after > 0 the player "leaves" once that many steps are
   done, and the job is cancelled; the next step reports it. */
static int play(const struct api *api, const spo_job *job, struct world *w, struct preview *p, uint32_t cancel_after,
                struct outcome *out) {
  memset(out, 0, sizeof *out);
  for (unsigned frame = 0; frame < MAX_FRAMES; frame++) {
    world_update(w, 1.0 / 60.0);
    spo_job_status st;
    spo_error *err = api->spo_job_step(job, &st);
    if (err && api->spo_error_code(err) == SPO_ERR_CANCELLED) {
      printf("  frame %u: job cancelled (%s)\n", frame, api->spo_error_message(err));
      api->spo_error_free(err);
      out->cancelled = 1;
      return 0;
    }
    if (err) return report(api, err, "step") != SPO_OK;
    printf("  frame %u: world x=%.3f bounces=%u | job step %u/%u%s\n", frame, w->x, w->bounces, st.done, st.total,
           st.finished ? " (finished)" : "");
    if (show_preview(api, job, p)) return 1;
    out->steps = st.done;
    if (st.finished) {
      out->finished = 1;
      return 0;
    }
    if (cancel_after && st.done == cancel_after) {
      printf("  frame %u: the player left the area: cancelling the job\n", frame);
      api->spo_job_cancel(job);
    }
  }
  fprintf(stderr, "engine-host: the job did not end within %d frames\n", MAX_FRAMES);
  return 1;
}

/* Job 1: runs to the end, writes its last preview, checks the image. */
static int finished_job(const struct api *api, const spo_pipeline *pipe, struct world *w, struct preview *p,
                        const char *preview_path) {
  char steps[16];
  snprintf(steps, sizeof steps, "%d", STEPS);
  spo_job *job = start_job(api, pipe, "a lighthouse at dusk", steps);
  if (!job) return 1;
  struct outcome out;
  int bad = play(api, job, w, p, 0, &out);
  if (!bad && !(out.finished && out.steps == STEPS && p->step == STEPS)) {
    fprintf(stderr, "engine-host: job 1 ended after %u steps (finished %d), wanted %d\n", out.steps, out.finished, STEPS);
    bad = 1;
  }
  spo_images *images = NULL;
  spo_image img = {0, 0, 0, NULL};
  if (!bad) bad = report(api, api->spo_job_take_images(job, &images), "images") != SPO_OK;
  if (!bad) bad = report(api, api->spo_images_get(images, 0, &img), "image 0") != SPO_OK;
  if (!bad) {
    printf("job 1: image %ux%u; last x0 preview written to %s\n", img.width, img.height, preview_path);
    bad = write_preview(p, preview_path);
  }
  api->spo_images_free(images);
  api->spo_job_free(job);
  return bad;
}

/* Job 2 is cancelled by the game; job 3 then runs on the same pipeline. */
static int cancelled_job_then_reuse(const struct api *api, const spo_pipeline *pipe, struct world *w,
                                    struct preview *p) {
  spo_job *job = start_job(api, pipe, "a castle", "20");
  if (!job) return 1;
  struct outcome out;
  int bad = play(api, job, w, p, CANCEL_AFTER, &out);
  api->spo_job_free(job);
  if (!bad && !(out.cancelled && out.steps == CANCEL_AFTER)) {
    fprintf(stderr, "engine-host: job 2 was not cancelled after %d steps (steps %u)\n", CANCEL_AFTER, out.steps);
    bad = 1;
  }
  if (bad) return 1;
  job = start_job(api, pipe, "a castle", "2");
  if (!job) return 1;
  bad = play(api, job, w, p, 0, &out) || !out.finished;
  api->spo_job_free(job);
  if (!bad) printf("job 3: finished after job 2's cancel\n");
  return bad;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s LIBRARY.so MODEL_DIR PREVIEW.pgm\n", argv[0]);
    return 2;
  }
  struct api api;
  memset(&api, 0, sizeof api);
  if (load_api(&api, argv[1])) return 1;
  spo_runtime *rt = NULL;
  spo_pipeline *pipe = NULL;
  int bad = report(&api, api.spo_runtime_create(SPO_ABI_VERSION, NULL, &rt), "runtime") != SPO_OK;
  if (!bad) bad = report(&api, api.spo_pipeline_load(rt, argv[2], NULL, &pipe), "pipeline") != SPO_OK;
  struct world w = {0.5, 6.0, 0};
  struct preview p;
  memset(&p, 0, sizeof p);
  if (!bad) bad = finished_job(&api, pipe, &w, &p, argv[3]);
  if (!bad) bad = cancelled_job_then_reuse(&api, pipe, &w, &p);
  free(p.data);
  api.spo_pipeline_free(pipe);
  api.spo_runtime_free(rt);
  /* No dlclose: the library keeps ONNX Runtime loaded for the whole process
     (it is loaded once per process), so it stays mapped until exit. */
  printf("engine-host: %s (world: %u bounces)\n", bad ? "FAILED" : "ok", w.bounces);
  return bad;
}

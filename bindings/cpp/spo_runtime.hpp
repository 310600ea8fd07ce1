// Header-only C++17 RAII wrapper over spo_runtime.h. Errors become spo::Error
// exceptions carrying the stable code; every handle frees itself. The C
// header's ownership and threading rules apply unchanged.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "spo_runtime.h"

namespace spo {

class Error : public std::runtime_error {
 public:
  Error(spo_code code, const std::string& message) : std::runtime_error(message), code_(code) {}
  spo_code code() const noexcept { return code_; }

 private:
  spo_code code_;
};

// Throws (and frees) a non-NULL error.
inline void check(spo_error* e) {
  if (e) {
    Error err(spo_error_code(e), spo_error_message(e));
    spo_error_free(e);
    throw err;
  }
}

namespace detail {
template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const noexcept { Free(p); }
};
template <typename T, void (*Free)(T*)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

inline std::string take_string(char* s) {
  std::string out(s ? s : "");
  spo_string_free(s);
  return out;
}
}  // namespace detail

class Options {
 public:
  Options() {
    spo_options* o = nullptr;
    check(spo_options_create(&o));
    h_.reset(o);
  }
  Options& set(const std::string& key, const std::string& value) {
    check(spo_options_set(h_.get(), key.c_str(), value.c_str()));
    return *this;
  }
  Options& set_json(const std::string& json) {
    check(spo_options_set_json(h_.get(), json.c_str()));
    return *this;
  }
  const spo_options* get() const noexcept { return h_.get(); }

 private:
  detail::Handle<spo_options, spo_options_free> h_;
};

class Runtime {
 public:
  explicit Runtime(const Options* options = nullptr) {
    spo_runtime* r = nullptr;
    check(spo_runtime_create(SPO_ABI_VERSION, options ? options->get() : nullptr, &r));
    h_.reset(r);
  }
  std::string info(const std::string& key) const {
    char* s = nullptr;
    check(spo_runtime_info(h_.get(), key.c_str(), &s));
    return detail::take_string(s);
  }
  const spo_runtime* get() const noexcept { return h_.get(); }

 private:
  detail::Handle<spo_runtime, spo_runtime_free> h_;
};

class Lora {
 public:
  Lora(const Runtime& rt, const std::string& path) {
    spo_lora* l = nullptr;
    check(spo_lora_load(rt.get(), path.c_str(), &l));
    h_.reset(l);
  }
  std::string info(const std::string& key) const {
    char* s = nullptr;
    check(spo_lora_info(h_.get(), key.c_str(), &s));
    return detail::take_string(s);
  }
  const spo_lora* get() const noexcept { return h_.get(); }

 private:
  detail::Handle<spo_lora, spo_lora_free> h_;
};

// An RGB8 image copied out of the library.
struct Image {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height rows of width * 3 bytes
};

class Job {
 public:
  explicit Job(spo_job* j) : h_(j) {}
  // Advances one step; returns true when the images are ready.
  bool step(spo_job_status* status = nullptr) {
    spo_job_status s{};
    check(spo_job_step(h_.get(), &s));
    if (status) *status = s;
    return s.finished != 0;
  }
  void run() { check(spo_job_run(h_.get())); }
  // Safe from any thread.
  void cancel() noexcept { spo_job_cancel(h_.get()); }
  // The x0 latents of the latest step, NCHW (see spo_job_preview); also
  // callable from a progress callback.
  struct Preview {
    size_t shape[4] = {0, 0, 0, 0};
    uint32_t step = 0;
    std::vector<float> latents;
  };
  Preview preview() const {
    Preview p;
    check(spo_job_preview(h_.get(), nullptr, 0, p.shape, &p.step));
    p.latents.resize(p.shape[0] * p.shape[1] * p.shape[2] * p.shape[3]);
    check(spo_job_preview(h_.get(), p.latents.data(), p.latents.size(), p.shape, &p.step));
    return p;
  }
  // Runs the job to the end and takes its images.
  std::vector<Image> take_images_after_run() {
    run();
    return take_images();
  }
  std::vector<Image> take_images() {
    spo_images* raw = nullptr;
    check(spo_job_take_images(h_.get(), &raw));
    detail::Handle<spo_images, spo_images_free> images(raw);
    std::vector<Image> out;
    for (size_t i = 0; i < spo_images_count(images.get()); i++) {
      spo_image v{};
      check(spo_images_get(images.get(), i, &v));
      Image img;
      img.width = v.width;
      img.height = v.height;
      for (uint32_t y = 0; y < v.height; y++) img.rgb.insert(img.rgb.end(), v.data + size_t(y) * v.stride, v.data + size_t(y) * v.stride + size_t(v.width) * 3);
      out.push_back(std::move(img));
    }
    return out;
  }

 private:
  detail::Handle<spo_job, spo_job_free> h_;
};

class Pipeline {
 public:
  Pipeline(const Runtime& rt, const std::string& dir, const Options* options = nullptr) {
    spo_pipeline* p = nullptr;
    check(spo_pipeline_load(rt.get(), dir.c_str(), options ? options->get() : nullptr, &p));
    h_.reset(p);
  }
  std::string info(const std::string& key) const {
    char* s = nullptr;
    check(spo_pipeline_info(h_.get(), key.c_str(), &s));
    return detail::take_string(s);
  }
  Job job(const Options& options) {
    spo_job* j = nullptr;
    check(spo_job_create(h_.get(), options.get(), &j));
    return Job(j);
  }
  void set_loras(const std::vector<std::pair<const Lora*, float>>& loras, spo_lora_mode mode = SPO_LORA_AUTO) {
    std::vector<const spo_lora*> handles;
    std::vector<float> mults;
    for (const auto& l : loras) {
      handles.push_back(l.first->get());
      mults.push_back(l.second);
    }
    check(spo_pipeline_set_loras(h_.get(), handles.data(), mults.data(), handles.size(), mode));
  }
  const spo_pipeline* get() const noexcept { return h_.get(); }

 private:
  detail::Handle<spo_pipeline, spo_pipeline_free> h_;
};

// SPO fine-tuning of a LoRA on a pipeline (see spo_trainer_create for the
// "train.*" options). cancel() is safe from any thread; the other calls on
// one trainer must not overlap.
class Trainer {
 public:
  Trainer(const Pipeline& pipeline, const Options& options) {
    spo_trainer* t = nullptr;
    check(spo_trainer_create(pipeline.get(), options.get(), &t));
    h_.reset(t);
  }
  // One round: sample the prompts with the current LoRA, then train.
  spo_train_metrics step(const std::vector<std::string>& prompts) {
    std::vector<const char*> p;
    for (const auto& s : prompts) p.push_back(s.c_str());
    spo_train_metrics m{};
    check(spo_trainer_step(h_.get(), p.data(), p.size(), &m));
    return m;
  }
  void cancel() noexcept { spo_trainer_cancel(h_.get()); }
  void save_lora(const std::string& path, const std::string& format = "webui") const {
    check(spo_trainer_save_lora(h_.get(), path.c_str(), format.c_str()));
  }
  void save_checkpoint(const std::string& path) const {
    check(spo_trainer_save_checkpoint(h_.get(), path.c_str()));
  }
  void load_checkpoint(const std::string& path) { check(spo_trainer_load_checkpoint(h_.get(), path.c_str())); }
  // Generates with the current LoRA from then on, without a file.
  void apply(const Pipeline& pipeline) const { check(spo_trainer_apply(h_.get(), pipeline.get())); }

 private:
  detail::Handle<spo_trainer, spo_trainer_free> h_;
};

}  // namespace spo

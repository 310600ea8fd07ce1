// Header-only C++17 wrapper over spo_runtime.h: RAII handles, std::function
// callbacks and typed errors. The C header's ownership and threading rules
// apply unchanged; what this file adds is stated where it is added.
//
// Errors: by default a failed call throws spo::Error (code() is the stable
// spo_code, what() the library's message). Built without exceptions
// (-fno-exceptions) or with SPO_NO_EXCEPTIONS defined, every fallible call
// returns spo::Result<T> instead (ok(), value(), error()), and objects are made
// by the static create()/load() factories, which exist in both builds.
//
// Handles: every class owns one C handle and frees it in its destructor. They
// are move-only; a moved-from object is empty (explicit operator bool is
// false), its destructor does nothing, and a call on it fails with
// SPO_ERR_NULL_ARGUMENT instead of crashing.
//
// Callbacks: a std::function given to on_progress/set_log_callback is owned by
// the object it is set on (heap-held, so moves keep its address) and lives as
// long as the library may call it. An exception thrown by a progress function
// never unwinds through C: the trampoline catches it and cancels, and the call
// that ran the job (run, step, Trainer::step) rethrows it once the C call has
// returned (in the no-exceptions build: returns it as an SPO_ERR_CANCELLED
// error naming it). A log function cannot stop anything; what it throws is
// dropped.
#pragma once
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "spo_runtime.h"

#if !defined(SPO_NO_EXCEPTIONS) && !defined(__cpp_exceptions)
#define SPO_NO_EXCEPTIONS 1
#endif

namespace spo {

// The ABI version this wrapper was compiled against (compare abi_version()).
constexpr uint32_t header_abi_version = SPO_ABI_VERSION;
// The loaded library's version ("MAJOR.MINOR.PATCH") and ABI version.
inline std::string version() { return spo_version(); }
inline uint32_t abi_version() noexcept { return spo_abi_version(); }

// A library error: the stable code and the message naming what was wrong.
class Error : public std::runtime_error {
 public:
  Error(spo_code code, const std::string& message) : std::runtime_error(message), code_(code) {}
  spo_code code() const noexcept { return code_; }

 private:
  spo_code code_;
};

namespace detail {
// value()/error() on the wrong side is a programming error; without
// exceptions there is nothing to throw, so it ends the program loudly.
template <typename P>
P* must(P* p, const char* what) {
  if (!p) {
    std::fprintf(stderr, "spo::Result: %s\n", what);
    std::abort();
  }
  return p;
}
}  // namespace detail

// Expected-style result of the no-exceptions build (usable in both builds).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}
  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  T& value() & { return *detail::must(std::get_if<0>(&v_), "value() of an error"); }
  const T& value() const& { return *detail::must(std::get_if<0>(&v_), "value() of an error"); }
  T&& value() && { return std::move(*detail::must(std::get_if<0>(&v_), "value() of an error")); }
  const Error& error() const { return *detail::must(std::get_if<1>(&v_), "error() of a success"); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : e_(std::make_unique<Error>(std::move(error))) {}
  bool ok() const noexcept { return !e_; }
  explicit operator bool() const noexcept { return ok(); }
  void value() const { detail::must(ok() ? this : nullptr, "value() of an error"); }
  const Error& error() const { return *detail::must(e_.get(), "error() of a success"); }

 private:
  std::unique_ptr<Error> e_;
};

// What a fallible call returns: T (errors throw) or Result<T>.
#ifdef SPO_NO_EXCEPTIONS
template <typename T>
using Ret = Result<T>;
#else
template <typename T>
using Ret = T;
#endif

namespace detail {
// Reads and frees a C error.
inline Error take_error(spo_error* e) {
  Error err(spo_error_code(e), spo_error_message(e));
  spo_error_free(e);
  return err;
}

#ifdef SPO_NO_EXCEPTIONS
template <typename T>
Result<T> fail(Error err) {
  return Result<T>(std::move(err));
}
inline Result<void> check(spo_error* e) { return e ? Result<void>(take_error(e)) : Result<void>(); }
#else
template <typename T>
[[noreturn]] T fail(Error err) {
  throw err;
}
inline void check(spo_error* e) {
  if (e) throw take_error(e);
}
#endif

// Copies and frees a library string.
inline std::string take_string(char* s) {
  std::string out(s ? s : "");
  spo_string_free(s);
  return out;
}

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const noexcept { Free(p); }
};
template <typename T, void (*Free)(T*)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

using LogFn = std::function<void(spo_log_level, std::string_view)>;

// A log function and its level, the user_data of log_trampoline. The library
// calls it outside its own lock, so a replaced function is kept alive by the
// call using it (shared_ptr copy), and the state by every handle that can log.
struct LogState {
  std::mutex mutex;
  std::shared_ptr<const LogFn> fn;
  spo_log_level level = SPO_LOG_INFO;
  void set(LogFn f, spo_log_level max_level) {
    auto next = f ? std::make_shared<const LogFn>(std::move(f)) : nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    fn = std::move(next);
    level = max_level;
  }
  std::shared_ptr<const LogFn> current() {
    std::lock_guard<std::mutex> lock(mutex);
    return fn;
  }
};

inline void log_trampoline(void* user_data, int32_t level, const char* message) noexcept {
  auto fn = static_cast<LogState*>(user_data)->current();
  if (!fn) return;
#ifdef __cpp_exceptions
  try {
    (*fn)(static_cast<spo_log_level>(level), message);
  } catch (...) {
  }
#else
  (*fn)(static_cast<spo_log_level>(level), message);
#endif
}

using ProgressFn = std::function<bool(uint32_t done, uint32_t total)>;

// A progress function and the exception it threw, the user_data of
// progress_trampoline.
struct ProgressState {
  ProgressFn fn;
#ifdef __cpp_exceptions
  std::exception_ptr thrown;
#endif
};

inline int32_t progress_trampoline(void* user_data, uint32_t done, uint32_t total) noexcept {
  auto* s = static_cast<ProgressState*>(user_data);
#ifdef __cpp_exceptions
  try {
    return s->fn(done, total) ? 0 : 1;
  } catch (...) {
    s->thrown = std::current_exception();
    return 1;
  }
#else
  return s->fn(done, total) ? 0 : 1;
#endif
}

// The error of a call that ran a progress function: the function's exception
// when it threw (rethrown here; an SPO_ERR_CANCELLED error naming it in the
// no-exceptions build), else the library's error. Frees `e`.
inline Error settle(ProgressState* s, spo_error* e) {
#ifdef __cpp_exceptions
  if (s && s->thrown) {
    std::exception_ptr thrown = std::exchange(s->thrown, nullptr);
    spo_error_free(e);
#ifdef SPO_NO_EXCEPTIONS
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(thrown);
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
    return Error(SPO_ERR_CANCELLED, "cancelled: the progress function threw: " + what);
#else
    std::rethrow_exception(thrown);
#endif
  }
#endif
  (void)s;
  return take_error(e);
}

// Whether a call that returned no error must still fail (its function threw
// on the last step, too late to cancel).
inline bool threw(const ProgressState* s) noexcept {
#ifdef __cpp_exceptions
  return s && s->thrown;
#else
  (void)s;
  return false;
#endif
}
}  // namespace detail

// Settings by string key (see spo_options_set for each object's keys).
class Options {
 public:
  static Ret<Options> create() {
    spo_options* o = nullptr;
    if (spo_error* e = spo_options_create(&o)) return detail::fail<Options>(detail::take_error(e));
    return Options(o);
  }
#ifndef SPO_NO_EXCEPTIONS
  Options() : Options(create()) {}
  Options& set(const std::string& key, const std::string& value) {
    detail::check(spo_options_set(h_.get(), key.c_str(), value.c_str()));
    return *this;
  }
  Options& set_json(const std::string& json) {
    detail::check(spo_options_set_json(h_.get(), json.c_str()));
    return *this;
  }
#else
  Result<void> set(const std::string& key, const std::string& value) {
    return detail::check(spo_options_set(h_.get(), key.c_str(), value.c_str()));
  }
  Result<void> set_json(const std::string& json) { return detail::check(spo_options_set_json(h_.get(), json.c_str())); }
#endif
  // The log function of runtimes created from these options, from their
  // creation on (each runtime copies it; an empty function removes it).
  Ret<void> set_log_callback(detail::LogFn fn, spo_log_level max_level = SPO_LOG_INFO) {
    if (!log_) log_ = std::make_shared<detail::LogState>();
    bool on = static_cast<bool>(fn);
    log_->set(std::move(fn), max_level);
    return detail::check(spo_options_set_log_callback(h_.get(), on ? detail::log_trampoline : nullptr, log_.get(),
                                                      max_level));
  }
  const spo_options* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  friend class Runtime;
  explicit Options(spo_options* o) : h_(o) {}
  detail::Handle<spo_options, spo_options_free> h_;
  std::shared_ptr<detail::LogState> log_;
};

// The loaded ONNX Runtime and its execution providers. Share one between
// threads. Its log function lives until the runtime, and every pipeline, job
// and trainer made from it, are gone.
class Runtime {
 public:
  static Ret<Runtime> create(const Options* options = nullptr) {
    spo_runtime* r = nullptr;
    if (spo_error* e = spo_runtime_create(SPO_ABI_VERSION, options ? options->get() : nullptr, &r))
      return detail::fail<Runtime>(detail::take_error(e));
    Runtime rt(r);
    // The runtime logs through the options' state while it is created; from
    // here on through its own, so the options may go.
    if (options && options->log_) {
      auto fn = options->log_->current();
      if (fn) rt.log_->set(*fn, options->log_->level);
      auto cb = fn ? detail::log_trampoline : nullptr;
      if (spo_error* e = spo_runtime_set_log_callback(r, cb, rt.log_.get(), rt.log_->level))
        return detail::fail<Runtime>(detail::take_error(e));
    }
    return rt;
  }
#ifndef SPO_NO_EXCEPTIONS
  explicit Runtime(const Options* options = nullptr) : Runtime(create(options)) {}
#endif
  Ret<std::string> info(const std::string& key) const {
    char* s = nullptr;
    if (spo_error* e = spo_runtime_info(h_.get(), key.c_str(), &s))
      return detail::fail<std::string>(detail::take_error(e));
    return detail::take_string(s);
  }
  // The version of the ONNX Runtime library in use.
  Ret<std::string> ort_version() const { return info("ort.version"); }
  // Replaces the log function (empty removes it). It may run on any thread
  // that uses the runtime, several at once: make it thread-safe.
  Ret<void> set_log_callback(detail::LogFn fn, spo_log_level max_level = SPO_LOG_INFO) {
    if (!h_) return detail::check(spo_runtime_set_log_callback(nullptr, nullptr, nullptr, max_level));
    bool on = static_cast<bool>(fn);
    log_->set(std::move(fn), max_level);
    return detail::check(
        spo_runtime_set_log_callback(h_.get(), on ? detail::log_trampoline : nullptr, log_.get(), max_level));
  }
  const spo_runtime* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  friend class Pipeline;
  explicit Runtime(spo_runtime* r) : log_(std::make_shared<detail::LogState>()), h_(r) {}
  std::shared_ptr<detail::LogState> log_;  // declared first: outlives the handle
  detail::Handle<spo_runtime, spo_runtime_free> h_;
};

// A LoRA file, immutable: share it between pipelines and threads.
class Lora {
 public:
  static Ret<Lora> load(const Runtime& rt, const std::string& path) {
    spo_lora* l = nullptr;
    if (spo_error* e = spo_lora_load(rt.get(), path.c_str(), &l)) return detail::fail<Lora>(detail::take_error(e));
    return Lora(l);
  }
#ifndef SPO_NO_EXCEPTIONS
  Lora(const Runtime& rt, const std::string& path) : Lora(load(rt, path)) {}
#endif
  // Keys: "path", "format", "dialect", "modules", "rank", "alpha".
  Ret<std::string> info(const std::string& key) const {
    char* s = nullptr;
    if (spo_error* e = spo_lora_info(h_.get(), key.c_str(), &s))
      return detail::fail<std::string>(detail::take_error(e));
    return detail::take_string(s);
  }
  const spo_lora* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  explicit Lora(spo_lora* l) : h_(l) {}
  detail::Handle<spo_lora, spo_lora_free> h_;
};

// An RGB8 image copied out of the library.
struct Image {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height rows of width * 3 bytes
};

// The x0 latents of a job's latest step, NCHW (see spo_job_preview).
struct Preview {
  size_t shape[4] = {0, 0, 0, 0};
  uint32_t step = 0;
  std::vector<float> latents;
};

// One generation request on a pipeline. cancel() is safe from any thread; the
// other calls must not overlap. The pipeline takes its next job once this one
// finishes, fails, is cancelled or is destroyed.
class Job {
 public:
  Job(Job&& o) noexcept = default;
  // Frees the current job before taking the other's (its callback state goes
  // with it only after the native job is gone).
  Job& operator=(Job&& o) noexcept {
    if (this != &o) {
      h_.reset();
      progress_ = std::move(o.progress_);
      log_ = std::move(o.log_);
      h_ = std::move(o.h_);
    }
    return *this;
  }
  // Called after each denoising step on the thread stepping the job; return
  // false to cancel. The job owns `fn` until it is destroyed or replaced.
  Ret<void> on_progress(detail::ProgressFn fn) {
    auto next = fn ? std::make_unique<detail::ProgressState>() : nullptr;
    if (next) next->fn = std::move(fn);
    auto cb = next ? detail::progress_trampoline : nullptr;
    spo_error* e = spo_job_set_progress_callback(h_.get(), cb, next.get());
    if (e) return detail::fail<void>(detail::take_error(e));
    progress_ = std::move(next);  // the old state is unused once replaced
    return Ret<void>();
  }
  // Advances one step (the first also encodes the prompt, the last decodes).
  Ret<spo_job_status> step() {
    spo_job_status s{};
    spo_error* e = spo_job_step(h_.get(), &s);
    if (e || detail::threw(progress_.get())) return detail::fail<spo_job_status>(detail::settle(progress_.get(), e));
    return s;
  }
  // Runs the remaining steps.
  Ret<void> run() {
    spo_error* e = spo_job_run(h_.get());
    if (e || detail::threw(progress_.get())) return detail::fail<void>(detail::settle(progress_.get(), e));
    return Ret<void>();
  }
  // Safe from any thread, also while another thread runs the job.
  void cancel() const noexcept { spo_job_cancel(h_.get()); }
  // Also callable from a progress function.
  Ret<Preview> preview() const {
    Preview p;
    if (spo_error* e = spo_job_preview(h_.get(), nullptr, 0, p.shape, &p.step))
      return detail::fail<Preview>(detail::take_error(e));
    p.latents.resize(p.shape[0] * p.shape[1] * p.shape[2] * p.shape[3]);
    if (spo_error* e = spo_job_preview(h_.get(), p.latents.data(), p.latents.size(), p.shape, &p.step))
      return detail::fail<Preview>(detail::take_error(e));
    return p;
  }
  // The finished images, copied (the C buffer is freed here).
  Ret<std::vector<Image>> take_images() {
    spo_images* raw = nullptr;
    if (spo_error* e = spo_job_take_images(h_.get(), &raw))
      return detail::fail<std::vector<Image>>(detail::take_error(e));
    detail::Handle<spo_images, spo_images_free> images(raw);
    std::vector<Image> out(spo_images_count(images.get()));
    for (size_t i = 0; i < out.size(); i++) {
      spo_image v{};
      if (spo_error* e = spo_images_get(images.get(), i, &v))
        return detail::fail<std::vector<Image>>(detail::take_error(e));
      out[i].width = v.width;
      out[i].height = v.height;
      for (uint32_t y = 0; y < v.height; y++) {
        const uint8_t* row = v.data + size_t(y) * v.stride;
        out[i].rgb.insert(out[i].rgb.end(), row, row + size_t(v.width) * 3);
      }
    }
    return out;
  }
  const spo_job* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  friend class Pipeline;
  Job(spo_job* j, std::shared_ptr<detail::LogState> log) : log_(std::move(log)), h_(j) {}
  // Declared before the handle, so they outlive it.
  std::shared_ptr<detail::LogState> log_;
  std::unique_ptr<detail::ProgressState> progress_;
  detail::Handle<spo_job, spo_job_free> h_;
};

// A loaded model folder. Shareable between threads; one job at a time
// (another gets SPO_ERR_BUSY).
class Pipeline {
 public:
  static Ret<Pipeline> load(const Runtime& rt, const std::string& dir, const Options* options = nullptr) {
    spo_pipeline* p = nullptr;
    if (spo_error* e = spo_pipeline_load(rt.get(), dir.c_str(), options ? options->get() : nullptr, &p))
      return detail::fail<Pipeline>(detail::take_error(e));
    return Pipeline(p, rt.log_);
  }
#ifndef SPO_NO_EXCEPTIONS
  Pipeline(const Runtime& rt, const std::string& dir, const Options* options = nullptr)
      : Pipeline(load(rt, dir, options)) {}
#endif
  Ret<std::string> info(const std::string& key) const {
    char* s = nullptr;
    if (spo_error* e = spo_pipeline_info(h_.get(), key.c_str(), &s))
      return detail::fail<std::string>(detail::take_error(e));
    return detail::take_string(s);
  }
  Ret<Job> job(const Options& options) const {
    spo_job* j = nullptr;
    if (spo_error* e = spo_job_create(h_.get(), options.get(), &j)) return detail::fail<Job>(detail::take_error(e));
    return Job(j, log_);
  }
  // Replaces the pipeline's LoRAs (an empty list removes them).
  Ret<void> set_loras(const std::vector<std::pair<const Lora*, float>>& loras,
                      spo_lora_mode mode = SPO_LORA_AUTO) const {
    std::vector<const spo_lora*> handles;
    std::vector<float> mults;
    for (const auto& l : loras) {
      handles.push_back(l.first ? l.first->get() : nullptr);
      mults.push_back(l.second);
    }
    return detail::check(spo_pipeline_set_loras(h_.get(), handles.data(), mults.data(), handles.size(), mode));
  }
  const spo_pipeline* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  friend class Trainer;
  Pipeline(spo_pipeline* p, std::shared_ptr<detail::LogState> log) : log_(std::move(log)), h_(p) {}
  std::shared_ptr<detail::LogState> log_;  // declared first: outlives the handle
  detail::Handle<spo_pipeline, spo_pipeline_free> h_;
};

// SPO fine-tuning of a LoRA on a pipeline (see spo_trainer_create for the
// "train.*" options). cancel() is safe from any thread; the other calls on
// one trainer must not overlap.
class Trainer {
 public:
  static Ret<Trainer> create(const Pipeline& pipeline, const Options& options) {
    spo_trainer* t = nullptr;
    if (spo_error* e = spo_trainer_create(pipeline.get(), options.get(), &t))
      return detail::fail<Trainer>(detail::take_error(e));
    return Trainer(t, pipeline.log_);
  }
#ifndef SPO_NO_EXCEPTIONS
  Trainer(const Pipeline& pipeline, const Options& options) : Trainer(create(pipeline, options)) {}
#endif
  Trainer(Trainer&&) noexcept = default;
  Trainer& operator=(Trainer&& o) noexcept {
    if (this != &o) {
      h_.reset();
      progress_ = std::move(o.progress_);
      log_ = std::move(o.log_);
      h_ = std::move(o.h_);
    }
    return *this;
  }
  // Called during rounds with (done, total); return false to cancel the
  // round. The trainer owns `fn` until it is destroyed or replaced.
  Ret<void> on_progress(detail::ProgressFn fn) {
    auto next = fn ? std::make_unique<detail::ProgressState>() : nullptr;
    if (next) next->fn = std::move(fn);
    auto cb = next ? detail::progress_trampoline : nullptr;
    spo_error* e = spo_trainer_set_progress_callback(h_.get(), cb, next.get());
    if (e) return detail::fail<void>(detail::take_error(e));
    progress_ = std::move(next);
    return Ret<void>();
  }
  // One round: sample the prompts with the current LoRA, then train.
  Ret<spo_train_metrics> step(const std::vector<std::string>& prompts) {
    std::vector<const char*> p = c_strings(prompts);
    spo_train_metrics m{};
    spo_error* e = spo_trainer_step(h_.get(), p.data(), p.size(), &m);
    if (e || detail::threw(progress_.get())) return detail::fail<spo_train_metrics>(detail::settle(progress_.get(), e));
    return m;
  }
  // Trains on pairs from the host's own sampler (see spo_trainer_update).
  Ret<spo_train_metrics> update(const std::vector<std::string>& prompts, const std::vector<spo_train_pair>& pairs) {
    std::vector<const char*> p = c_strings(prompts);
    spo_train_metrics m{};
    if (spo_error* e = spo_trainer_update(h_.get(), p.data(), p.size(), pairs.data(), pairs.size(), &m))
      return detail::fail<spo_train_metrics>(detail::take_error(e));
    return m;
  }
  // The shape [1, C, h, w] of one latent of update()'s pairs.
  Ret<std::array<uint32_t, 4>> latent_shape() const {
    std::array<uint32_t, 4> shape{};
    if (spo_error* e = spo_trainer_latent_shape(h_.get(), shape.data()))
      return detail::fail<std::array<uint32_t, 4>>(detail::take_error(e));
    return shape;
  }
  // Safe from any thread, also while another thread runs a round.
  void cancel() const noexcept { spo_trainer_cancel(h_.get()); }
  Ret<void> save_lora(const std::string& path, const std::string& format = "webui") const {
    return detail::check(spo_trainer_save_lora(h_.get(), path.c_str(), format.c_str()));
  }
  Ret<void> save_checkpoint(const std::string& path) const {
    return detail::check(spo_trainer_save_checkpoint(h_.get(), path.c_str()));
  }
  Ret<void> load_checkpoint(const std::string& path) {
    return detail::check(spo_trainer_load_checkpoint(h_.get(), path.c_str()));
  }
  // Generates with the current LoRA from then on, without a file.
  Ret<void> apply(const Pipeline& pipeline) const {
    return detail::check(spo_trainer_apply(h_.get(), pipeline.get()));
  }
  const spo_trainer* get() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return h_ != nullptr; }

 private:
  Trainer(spo_trainer* t, std::shared_ptr<detail::LogState> log) : log_(std::move(log)), h_(t) {}
  static std::vector<const char*> c_strings(const std::vector<std::string>& v) {
    std::vector<const char*> out;
    for (const auto& s : v) out.push_back(s.c_str());
    return out;
  }
  // Declared before the handle, so they outlive it.
  std::shared_ptr<detail::LogState> log_;
  std::unique_ptr<detail::ProgressState> progress_;
  detail::Handle<spo_trainer, spo_trainer_free> h_;
};

}  // namespace spo

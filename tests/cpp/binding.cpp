// The C++ wrapper's test: binding CASE.txt REF_DIR. Renders the binding case
// (tests/bindings/case.txt) and compares with REF_DIR/ref.rgb and
// ref-lora.rgb, which tests/bindings/reference.c made through the C API alone;
// then errors, cancelling from another thread, callbacks that throw or cancel,
// and moves. Built three ways by `make cpp-test`: with exceptions, with
// -fno-exceptions (Result<T> everywhere), and with SPO_NO_EXCEPTIONS while
// exceptions stay on (a throwing callback becomes a Result error).
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>

#include "spo_runtime.hpp"

static int failures = 0;

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      failures++;                                                      \
    }                                                                  \
  } while (0)

static bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

#ifdef SPO_NO_EXCEPTIONS
// A call that must succeed: its value, or the end of the test.
template <typename T>
static T unwrap(spo::Result<T> r, const char* what) {
  if (!r) {
    std::fprintf(stderr, "FAIL: %s: error %d: %s\n", what, int(r.error().code()), r.error().what());
    std::exit(1);
  }
  return std::move(r).value();
}
static void unwrap(spo::Result<void> r, const char* what) {
  if (!r) {
    std::fprintf(stderr, "FAIL: %s: error %d: %s\n", what, int(r.error().code()), r.error().what());
    std::exit(1);
  }
}
#define MUST(e) unwrap((e), #e)
// The error of a call that must fail (a default Error when it succeeded).
#define ERROR_OF(e) error_of((e), #e)
template <typename T>
static spo::Error error_of(spo::Result<T> r, const char* what) {
  if (r) {
    std::fprintf(stderr, "FAIL: %s succeeded\n", what);
    failures++;
    return spo::Error(SPO_OK, "");
  }
  return r.error();
}
#else
#define MUST(e) (e)
#define ERROR_OF(e) error_of([&] { (void)(e); }, #e)
template <typename F>
static spo::Error error_of(F f, const char* what) {
  try {
    f();
  } catch (const spo::Error& err) {
    return err;
  }
  std::fprintf(stderr, "FAIL: %s succeeded\n", what);
  failures++;
  return spo::Error(SPO_OK, "");
}
#endif

struct Case {
  std::string model, lora;
  float multiplier = 1;
  std::vector<std::pair<std::string, std::string>> job;
};

// KEY=VALUE lines as tests/bindings/reference.c reads them.
static Case read_case(const char* path) {
  std::ifstream f(path);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path);
    std::exit(2);
  }
  Case c;
  for (std::string line; std::getline(f, line);) {
    size_t eq = line.find('=');
    if (line.empty() || line[0] == '#' || eq == std::string::npos) continue;
    std::string key = line.substr(0, eq), value = line.substr(eq + 1);
    if (key.rfind("job.", 0) == 0) c.job.emplace_back(key.substr(4), value);
    if (key == "model") c.model = value;
    if (key == "lora") c.lora = value;
    if (key == "lora_multiplier") c.multiplier = std::strtof(value.c_str(), nullptr);
  }
  return c;
}

static std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot open %s (run `make bindings-ref`)\n", path.c_str());
    std::exit(2);
  }
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

static spo::Options job_options(const Case& c, const char* steps = nullptr) {
  spo::Options o = MUST(spo::Options::create());
  for (const auto& kv : c.job) MUST(o.set(kv.first, kv.second));
  if (steps) MUST(o.set("steps", steps));
  return o;
}

static std::vector<uint8_t> generate(const spo::Pipeline& pipe, const spo::Options& o) {
  spo::Job job = MUST(pipe.job(o));
  MUST(job.run());
  std::vector<spo::Image> images = MUST(job.take_images());
  CHECK(images.size() == 1);
  return images.at(0).rgb;
}

static void test_versions(const spo::Runtime& rt) {
  CHECK(spo::version() == SPO_TEST_VERSION);  // Cargo.toml's, passed by the Makefile
  CHECK(spo::abi_version() == spo::header_abi_version);
  std::string ort = MUST(rt.ort_version());
  CHECK(!ort.empty() && ort.find_first_not_of("0123456789.") == std::string::npos && has(ort, "."));
}

static void test_errors(const spo::Runtime& rt, const spo::Pipeline& pipe) {
  spo::Options o = MUST(spo::Options::create());
  spo::Error e = ERROR_OF(o.set("stepz", "1"));
  CHECK(e.code() == SPO_ERR_UNKNOWN_OPTION && has(e.what(), "stepz"));
  e = ERROR_OF(spo::Pipeline::load(rt, "tests/fixtures/no-such-model"));
  CHECK(e.code() != SPO_OK && has(e.what(), "no-such-model"));
  e = ERROR_OF(pipe.info("no.such.key"));
  CHECK(e.code() == SPO_ERR_INVALID_ARGUMENT && has(e.what(), "no.such.key"));
  e = ERROR_OF(spo::Lora::load(rt, "tests/fixtures/no-such.safetensors"));
  CHECK(e.code() == SPO_ERR_IO && has(e.what(), "no-such.safetensors"));
}

// Cancels from another thread once the first step is done, then reuses the
// pipeline. The first progress call waits until the other thread's cancel has
// returned: without that handshake a scheduler that runs one thread at a time
// (valgrind's) can finish all 200 steps before the canceller runs.
static void test_cancel(const spo::Pipeline& pipe, const Case& c, const std::vector<uint8_t>& ref) {
  spo::Options o = job_options(c, "200");
  spo::Job job = MUST(pipe.job(o));
  std::mutex m;
  std::condition_variable cv;
  bool started = false, cancelled = false;
  MUST(job.on_progress([&](uint32_t, uint32_t) {
    std::unique_lock<std::mutex> lock(m);
    started = true;
    cv.notify_all();
    cv.wait(lock, [&] { return cancelled; });
    return true;
  }));
  std::thread canceller([&] {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return started; });
    job.cancel();
    cancelled = true;
    cv.notify_all();
  });
  spo::Error e = ERROR_OF(job.run());
  canceller.join();
  CHECK(e.code() == SPO_ERR_CANCELLED);
  CHECK(generate(pipe, job_options(c)) == ref);
}

// A progress function that returns false cancels; one that throws does not
// crash, and its exception comes back from run().
static void test_progress(const spo::Pipeline& pipe, const Case& c, const std::vector<uint8_t>& ref) {
  spo::Options o = job_options(c);
  {
    spo::Job job = MUST(pipe.job(o));
    MUST(job.on_progress([](uint32_t done, uint32_t) { return done < 2; }));
    CHECK(ERROR_OF(job.run()).code() == SPO_ERR_CANCELLED);
  }
#ifdef __cpp_exceptions
  spo::Job job = MUST(pipe.job(o));
  MUST(job.on_progress([](uint32_t done, uint32_t) -> bool {
    if (done == 2) throw std::runtime_error("boom at step 2");
    return true;
  }));
#ifdef SPO_NO_EXCEPTIONS
  spo::Error e = ERROR_OF(job.run());
  CHECK(e.code() == SPO_ERR_CANCELLED && has(e.what(), "boom at step 2"));
#else
  bool caught = false;
  try {
    job.run();
  } catch (const spo::Error&) {
    CHECK(!"the callback's own exception was expected, not spo::Error");
  } catch (const std::runtime_error& x) {
    caught = has(x.what(), "boom at step 2");
  }
  CHECK(caught);
#endif
#endif
  CHECK(generate(pipe, o) == ref);
}

// Moved-from handles are empty, harmless, and fail calls with NULL_ARGUMENT.
static void test_moves(spo::Pipeline& pipe, const Case& c, const std::vector<uint8_t>& ref) {
  spo::Options o = job_options(c);
  spo::Job a = MUST(pipe.job(o));
  CHECK(ERROR_OF(pipe.job(o)).code() == SPO_ERR_BUSY);  // one job at a time
  uint32_t steps = 0;
  MUST(a.on_progress([&steps](uint32_t, uint32_t) { return ++steps > 0; }));
  spo::Job b(std::move(a));
  CHECK(!a && b);
  a.cancel();
  CHECK(ERROR_OF(a.run()).code() == SPO_ERR_NULL_ARGUMENT);
  a = std::move(b);  // the callback state moves with the job
  MUST(a.run());
  CHECK(steps == 4 && (MUST(a.take_images())).at(0).rgb == ref);
  spo::Pipeline moved(std::move(pipe));
  CHECK(!pipe && moved);
  CHECK(ERROR_OF(pipe.info("kind")).code() == SPO_ERR_NULL_ARGUMENT);
  CHECK(MUST(moved.info("kind")) == "sdxl");
  pipe = std::move(moved);
  spo::Options o2 = MUST(spo::Options::create());
  o2 = std::move(o);  // frees o2's first handle
  CHECK(!o && generate(pipe, o2) == ref);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE.txt REF_DIR\n", argv[0]);
    return 2;
  }
  Case c = read_case(argv[1]);
  std::vector<uint8_t> ref = read_file(std::string(argv[2]) + "/ref.rgb");
  std::vector<uint8_t> ref_lora = read_file(std::string(argv[2]) + "/ref-lora.rgb");
  std::atomic<int> logs{0};
  spo::Options ro = MUST(spo::Options::create());
  MUST(ro.set_log_callback([&logs](spo_log_level, std::string_view m) { logs += !m.empty(); }, SPO_LOG_DEBUG));
  spo::Runtime rt = MUST(spo::Runtime::create(&ro));
  test_versions(rt);
  spo::Pipeline pipe = MUST(spo::Pipeline::load(rt, c.model));
  CHECK(logs > 0);
  CHECK(generate(pipe, job_options(c)) == ref);
  spo::Lora lora = MUST(spo::Lora::load(rt, c.lora));
  MUST(pipe.set_loras({{&lora, c.multiplier}}, SPO_LORA_MERGE));
  CHECK(generate(pipe, job_options(c)) == ref_lora);
  MUST(pipe.set_loras({}));
  CHECK(generate(pipe, job_options(c)) == ref);
  test_errors(rt, pipe);
  test_cancel(pipe, c, ref);
  test_progress(pipe, c, ref);
  test_moves(pipe, c, ref);
  MUST(rt.set_log_callback(nullptr));
  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  else std::printf("cpp binding test: all checks passed\n");
  return failures ? 1 : 0;
}

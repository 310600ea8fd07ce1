// Text-to-image through the C++ wrapper: txt2img MODEL_DIR "prompt" LORA.safetensors
// Generates, switches the LoRA on, and generates again with the same seed;
// prints progress, the x0 preview's shape and how far the LoRA moved the image.
#include <cstdlib>
#include <iostream>

#include "spo_runtime.hpp"

static spo::Image generate(const spo::Pipeline& pipe, const spo::Options& o) {
  spo::Job job = pipe.job(o);
  job.on_progress([&job](uint32_t done, uint32_t total) {
    spo::Preview p = job.preview();
    std::cout << "  step " << done << "/" << total << ", x0 preview " << p.shape[2] << "x" << p.shape[3] << "\n";
    return true;  // false would cancel
  });
  job.run();
  return job.take_images().at(0);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL_DIR PROMPT LORA.safetensors\n";
    return 2;
  }
  try {
    std::cout << "spo-runtime " << spo::version() << " (ABI " << spo::abi_version() << ")\n";
    spo::Options ro;
    ro.set_log_callback([](spo_log_level level, std::string_view m) { std::cout << "  log " << level << ": " << m << "\n"; },
                        SPO_LOG_WARN);
    spo::Runtime rt(&ro);
    std::cout << "ONNX Runtime " << rt.ort_version() << " on " << rt.info("ep.active") << "\n";
    spo::Pipeline pipe(rt, argv[1]);
    spo::Options o;
    o.set("prompt", argv[2]).set("steps", "4").set_json(R"({"seed": 7})");
    spo::Image plain = generate(pipe, o);
    spo::Lora lora(rt, argv[3]);
    pipe.set_loras({{&lora, 0.8f}});
    std::cout << "LoRA " << lora.info("format") << " (" << lora.info("modules") << " modules), mode "
              << pipe.info("lora.mode") << "\n";
    spo::Image styled = generate(pipe, o);
    long diff = 0;
    for (size_t i = 0; i < plain.rgb.size() && i < styled.rgb.size(); i++) diff += std::labs(long(plain.rgb[i]) - styled.rgb[i]);
    std::cout << "image " << styled.width << "x" << styled.height << ", mean change from the LoRA "
              << double(diff) / double(plain.rgb.size()) << " per channel\n";
    // Errors carry the stable code and a message naming the key.
    try {
      o.set("stepz", "1");
    } catch (const spo::Error& e) {
      std::cout << "expected error " << e.code() << ": " << e.what() << "\n";
    }
  } catch (const spo::Error& e) {
    std::cerr << "error " << e.code() << ": " << e.what() << "\n";
    return 1;
  }
  return 0;
}

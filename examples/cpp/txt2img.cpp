// Text-to-image through the C++ wrapper: txt2img MODEL_DIR "prompt" [LORA]
#include <cstdio>
#include <iostream>

#include "spo_runtime.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL_DIR PROMPT [LORA.safetensors]\n";
    return 2;
  }
  try {
    spo::Runtime rt;
    spo::Pipeline pipe(rt, argv[1]);
    if (argc > 3) {
      spo::Lora lora(rt, argv[3]);
      pipe.set_loras({{&lora, 0.8f}});
      std::cout << "lora.mode " << pipe.info("lora.mode") << "\n";
    }
    spo::Options o;
    o.set("prompt", argv[2]).set("steps", "4").set_json(R"({"seed": 7})");
    spo::Job job = pipe.job(o);
    spo_job_status st{};
    while (!job.step(&st)) {
      auto p = job.preview();
      std::cout << "step " << st.done << "/" << st.total << ", x0 preview " << p.shape[2] << "x" << p.shape[3] << " latents\n";
    }
    auto images = job.take_images();
    std::cout << "image " << images.at(0).width << "x" << images.at(0).height << " on " << rt.info("ep.active") << "\n";
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

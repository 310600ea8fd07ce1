// SPO fine-tuning through the C++ wrapper:
//   train MODEL_DIR TRAIN_DIR PREFERENCE_DIR OUT.safetensors
// Two short rounds with the toy settings, then the LoRA is saved and applied
// to the pipeline, which generates with it.
#include <iostream>

#include "spo_runtime.hpp"

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0] << " MODEL_DIR TRAIN_DIR PREFERENCE_DIR OUT.safetensors\n";
    return 2;
  }
  try {
    spo::Options ro;
    ro.set("ep", "cpu");
    spo::Runtime rt(&ro);
    spo::Pipeline pipe(rt, argv[1]);
    spo::Options o;
    o.set("train.dir", argv[2]).set("train.preference", argv[3]).set("train.preset", "toy");
    o.set_json(R"({"train": {"steps": 3, "divert_start": 1, "pool": 2, "threshold": 0}})");
    spo::Trainer trainer(pipe, o);
    for (int r = 0; r < 2; r++) {
      spo_train_metrics m = trainer.step({"a red apple", "a blue car"});
      std::cout << "round " << m.round << ": loss " << m.loss << ", " << m.pairs << " pairs, score " << m.score_mean
                << ", " << m.updates << " updates\n";
    }
    trainer.save_lora(argv[4], "webui");
    trainer.apply(pipe);
    spo::Options j;
    j.set("prompt", "a red apple").set("steps", "4");
    spo::Job job = pipe.job(j);
    job.run();
    auto images = job.take_images();
    std::cout << "generated " << images.at(0).width << "x" << images.at(0).height << " with the trained LoRA\n";
  } catch (const spo::Error& e) {
    std::cerr << "error " << e.code() << ": " << e.what() << "\n";
    return 1;
  }
  return 0;
}

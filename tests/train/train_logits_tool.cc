// Test helper: the CPU model's logits and loss for one window, from a checkpoint, as JSON
// on stdout, so Python tests can compare an independent numpy forward (and transformers)
// with ours.   train_logits_tool CHECKPOINT t0,t1,...,tT [cpu|cuda]
// (cuda: the bf16 CUDA backend's logits, for the GPU export test).
// Prints {"T": T, "V": V, "logits": [T*V floats of the inputs t0..t(T-1)], "loss": mean
// cross-entropy of predicting t1..tT}.
#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <sstream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    fmt::print(stderr, "usage: train_logits_tool CHECKPOINT t0,t1,...,tT [cpu|cuda]\n");
    return 2;
  }
  try {
    const flashgpt::SafetensorsFile file(argv[1]);
    const flashgpt::CheckpointMeta meta = flashgpt::checkpoint_read_meta(file);
    std::vector<flashgpt::TokenId> window;
    std::stringstream in(argv[2]);
    std::string item;
    while (std::getline(in, item, ',')) window.push_back(static_cast<flashgpt::TokenId>(std::stoul(item)));
    const auto T = static_cast<int64_t>(window.size()) - 1;
    FLASHGPT_CHECK(T >= 1, "give at least two tokens");
    flashgpt::ModelOptions options;
    options.max_batch = 1;
    options.max_context = T;
    options.threads = 1;
    const std::string device = argc == 4 ? argv[3] : "cpu";
    FLASHGPT_CHECK(device == "cpu" || device == "cuda", "device '{}': expected cpu or cuda", device);
    auto model = device == "cuda" ? flashgpt::gpt_create_cuda(meta.model, options)
                                  : flashgpt::gpt_create_cpu(meta.model, options);
    model->params_set(flashgpt::checkpoint_read_params(file, meta.model));
    std::vector<float> logits(static_cast<size_t>(T * meta.model.vocab_size));
    model->forward_logits(std::span(window).first(static_cast<size_t>(T)), 1, T, logits);
    nlohmann::json j;
    j["T"] = T;
    j["V"] = meta.model.vocab_size;
    j["logits"] = logits;
    j["loss"] = model->forward_loss(window, 1, T);
    fmt::print("{}\n", j.dump());
  } catch (const std::exception& e) {
    fmt::print(stderr, "train_logits_tool: {}\n", e.what());
    return 1;
  }
  return 0;
}

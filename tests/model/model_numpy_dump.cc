// Writes what tests/model/test_model_numpy.py recomputes in numpy: a tiny model's
// checkpoint (checkpoint_save, the file users keep) and a batch with the C++ results.
//
//   model_numpy_dump OUT_DIR
//     OUT_DIR/checkpoint.safetensors  weights "model.<name>", config in __metadata__.model
//     OUT_DIR/batch.safetensors       "windows" I32 (B, T + 1), "logits" F32 (B, T, V);
//                                     __metadata__: loss (forward_loss, no dropout),
//                                     loss_dropout (forward_backward at dropout_seed/step)
//
// The weights are model_init_params's with every bias and LayerNorm parameter moved off
// its initial constant, so numpy exercises each of them.
#include <flashgpt/error.h>
#include <flashgpt/model.h>
#include <flashgpt/safetensors.h>
#include <flashgpt/train.h>

#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <random>

int main(int argc, char** argv) {
  using namespace flashgpt;
  if (argc != 2) {
    std::fprintf(stderr, "usage: model_numpy_dump OUT_DIR\n");
    return 2;
  }
  try {
    const std::filesystem::path out = argv[1];
    std::filesystem::create_directories(out);
    // tiny's shape (head dim 32) with 300 tokens (84 padding rows) and context 16.
    ModelConfig config = model_preset("tiny", 300);
    config.context = 16;
    config.dropout = 0.1f;
    const int64_t B = 3, T = 16, V = config.vocab_size;
    auto model = gpt_create_cpu(config, ModelOptions{.max_batch = B});

    std::vector<float> params(static_cast<size_t>(model_param_count(config)));
    model_init_params(config, 2024, params);
    std::mt19937_64 gen(7);
    std::normal_distribution<float> noise(0.0f, 0.1f);
    for (const ParamSpec& s : model_param_specs(config)) {
      if (s.shape.size() >= 2 && s.kind != ParamKind::ln1_w && s.kind != ParamKind::ln1_b &&
          s.kind != ParamKind::ln2_w && s.kind != ParamKind::ln2_b && s.kind != ParamKind::qkv_b &&
          s.kind != ParamKind::attn_proj_b && s.kind != ParamKind::fc_b && s.kind != ParamKind::fc_proj_b)
        continue;  // the matrices keep their GPT-2 initialisation
      for (int64_t i = 0; i < s.numel; ++i) params[static_cast<size_t>(s.offset + i)] += noise(gen);
    }
    model->params_set(params);

    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(V - 1));
    std::vector<int32_t> windows(static_cast<size_t>(B * (T + 1)));
    for (auto& id : windows) id = token(gen);
    const std::vector<TokenId> ids(windows.begin(), windows.end());
    std::vector<TokenId> inputs;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) inputs.push_back(ids[static_cast<size_t>(b * (T + 1) + t)]);

    const double loss = model->forward_loss(ids, B, T);
    std::vector<float> logits(static_cast<size_t>(B * T * V));
    model->forward_logits(inputs, B, T, logits);
    const StepRng rng{0x0123456789abcdefull, 5};
    model->grads_zero();
    const double loss_dropout = model->forward_backward(ids, B, T, rng, 1.0f);

    CheckpointMeta meta;
    meta.model = config;
    meta.encoding = "none";
    checkpoint_save(out / "checkpoint.safetensors", *model, meta);

    SafetensorsWriter batch;
    batch.add("windows", StDtype::I32, {B, T + 1}, std::as_bytes(std::span<const int32_t>(windows)));
    batch.add_f32("logits", {B, T, V}, logits);
    batch.set_metadata("loss", fmt::format("{:.17g}", loss));
    batch.set_metadata("loss_dropout", fmt::format("{:.17g}", loss_dropout));
    batch.set_metadata("dropout_seed", fmt::format("{}", rng.seed));
    batch.set_metadata("dropout_step", fmt::format("{}", rng.step));
    batch.write(out / "batch.safetensors");
    std::printf("loss %.9f, with dropout %.9f\n", loss, loss_dropout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "model_numpy_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}

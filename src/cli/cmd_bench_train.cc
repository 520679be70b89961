// `flashgpt bench train`: times training steps of a preset (grads_zero, forward_backward,
// grads_norm, adamw_step: what the trainer runs per step without accumulation; the clock
// runs over all timed steps, from a synchronized start to a synchronized end) on the
// chosen backend, on random token windows, after validating the model: the first loss
// must be near ln V (GPT-2 initialisation predicts almost uniformly) and finite. With
// --check-dir it also writes the initial weights, one batch and our dropout-free loss on
// it, so that bench/model/torch_gpt.py can compute the same loss with PyTorch before it
// times its own model. Prints one JSON object per vocabulary (tokens/s, MFU, memory).
#include "commands.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#ifdef FLASHGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {
namespace {

struct BenchTrainConfig {
  std::string device = "cuda";
  std::string preset = "seed";
  std::vector<int64_t> vocab = {100277, 50257};
  int64_t batch = 64;
  int64_t context = 0;  // 0: the preset's
  float dropout = -1;   // < 0: the preset's
  int warmup = 3;
  int steps = 10;
  bool deterministic = false;
  std::string check_dir;  // write weights, a batch and our loss for torch_gpt.py
  double peak_tflops = 989.0;  // H100 SXM dense bf16, the MFU denominator
};

// Writes bytes to path whole or not at all (temporary file, fsync, rename).
void write_file_atomic(const std::filesystem::path& path, const void* data, size_t bytes) {
  atomic_write_file(path, std::string_view(static_cast<const char*>(data), bytes));
}

std::vector<TokenId> random_windows(int64_t B, int64_t T, int64_t V, std::mt19937_64& rng) {
  std::vector<TokenId> w(size_t(B * (T + 1)));
  for (auto& t : w) t = static_cast<TokenId>(rng() % uint64_t(V));
  return w;
}

size_t device_free_bytes() {
#ifdef FLASHGPT_WITH_CUDA
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return free_bytes;
#endif
  return 0;
}

nlohmann::json bench_one(const BenchTrainConfig& c, int64_t vocab) {
  ModelConfig config = model_preset(c.preset, vocab);
  if (c.dropout >= 0) config.dropout = c.dropout;
  const int64_t T = c.context > 0 ? c.context : config.context;
  FLASHGPT_CHECK(T <= config.context, "bench train: --context {} exceeds the preset's {}", T, config.context);
  const Device device = c.device == "cuda" ? Device::cuda : Device::cpu;
  ModelOptions options;
  options.max_batch = c.batch;
  options.max_context = T;
  options.deterministic = c.deterministic;
#ifdef FLASHGPT_WITH_CUDA
  if (device == Device::cuda) cudaFree(nullptr);  // create the context before measuring free memory
#endif
  const size_t free_before = device == Device::cuda ? device_free_bytes() : 0;
  auto model = gpt_create(device, config, options);
  const size_t free_after = device == Device::cuda ? device_free_bytes() : 0;
  std::vector<float> params(size_t(model_param_count(config)));
  model_init_params(config, 1, params);
  model->params_set(params);
  std::mt19937_64 rng(42);

  // Validate: a dropout-free loss on one batch near ln V, written out for torch_gpt.py.
  const auto check = random_windows(c.batch, T, vocab, rng);
  const double check_loss = model->forward_loss(check, c.batch, T);
  fmt::print("bench train: {} V={} B={} T={}: validation loss at initialisation {:.5f} (ln V = {:.5f})\n",
             c.preset, vocab, c.batch, T, check_loss, std::log(double(vocab)));
  FLASHGPT_CHECK(std::isfinite(check_loss) && std::fabs(check_loss - std::log(double(vocab))) < 0.5,
                 "bench train: the initial loss {} is not near ln V = {}; not timing a broken model", check_loss,
                 std::log(double(vocab)));
  if (!c.check_dir.empty()) {
    const std::filesystem::path dir = c.check_dir;
    std::filesystem::create_directories(dir);
    write_file_atomic(dir / fmt::format("params_v{}.f32", vocab), params.data(), params.size() * sizeof(float));
    write_file_atomic(dir / fmt::format("windows_v{}.u32", vocab), check.data(), check.size() * sizeof(TokenId));
    nlohmann::json meta = {{"vocab", vocab},        {"padded_vocab", config.padded_vocab_size},
                           {"context", config.context}, {"d_model", config.d_model},
                           {"n_layer", config.n_layer}, {"n_head", config.n_head},
                           {"d_ff", config.d_ff},       {"batch", c.batch},
                           {"T", T},                    {"loss", check_loss}};
    const std::string text = meta.dump();
    write_file_atomic(dir / fmt::format("check_v{}.json", vocab), text.data(), text.size());
  }

  AdamWConfig adam;  // the seed's: lr 1e-4, betas 0.9/0.95, wd 0
  std::vector<double> losses;
  // The batches are drawn before the clock starts (PyTorch's side draws them on the GPU).
  std::vector<std::vector<TokenId>> batches;
  for (int step = 1; step <= c.warmup + c.steps; ++step) batches.push_back(random_windows(c.batch, T, vocab, rng));
  // Wall time of each call of the timed steps (the GPU idles between calls while the host
  // works: these show how much).
  double call_ms[4] = {};
  const char* call_names[4] = {"grads_zero", "forward_backward", "grads_norm", "adamw_step"};
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); };
  Clock::time_point start;
  for (int step = 1; step <= c.warmup + c.steps; ++step) {
    const bool timed = step > c.warmup;
    if (step == c.warmup + 1) {
      model->grads_norm();  // waits for the warm-up's last update
      start = Clock::now();
    }
    auto t = Clock::now();
    model->grads_zero();
    if (timed) call_ms[0] += ms_since(t);
    t = Clock::now();
    const double loss =
        model->forward_backward(batches[size_t(step - 1)], c.batch, T, StepRng{7, uint64_t(step)}, 1.0f);
    if (timed) call_ms[1] += ms_since(t);
    t = Clock::now();
    const double norm = model->grads_norm();
    if (timed) call_ms[2] += ms_since(t);
    t = Clock::now();
    model->adamw_step(adam, step, norm > 1.0 ? float(1.0 / norm) : 1.0f);
    if (timed) call_ms[3] += ms_since(t);
    losses.push_back(loss);
    FLASHGPT_CHECK(std::isfinite(loss), "bench train: step {} gave loss {}", step, loss);
  }
  model->grads_norm();  // waits for the last update
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  nlohmann::json host_ms;
  for (int i = 0; i < 4; ++i) host_ms[call_names[i]] = call_ms[i] / c.steps;
  const double tokens = double(c.steps) * c.batch * T;
  const double tokens_per_s = tokens / seconds;
  const double flops_per_token = model_train_flops_per_token(config, T);
  const size_t free_end = device == Device::cuda ? device_free_bytes() : 0;
  nlohmann::json row = {
      {"impl", "flashgpt"},
      {"device", c.device},
      {"preset", c.preset},
      {"vocab", vocab},
      {"batch", c.batch},
      {"T", T},
      {"dropout", config.dropout},
      {"steps", c.steps},
      {"step_ms", 1e3 * seconds / c.steps},
      {"tokens_per_s", tokens_per_s},
      {"tflops", tokens_per_s * flops_per_token / 1e12},
      {"mfu", tokens_per_s * flops_per_token / (c.peak_tflops * 1e12)},
      {"model_gib", double(free_before - free_after) / 1073741824.0},
      {"peak_gib", double(free_before - std::min(free_after, free_end)) / 1073741824.0},
      {"check_loss", check_loss},
      {"first_loss", losses.front()},
      {"last_loss", losses.back()},
      {"params", model_param_count_unpadded(config)},
      {"flops_per_token", flops_per_token},
      {"call_ms", host_ms},
  };
  return row;
}

void bench_train_run(const BenchTrainConfig& c) {
  fmt::print("bench train: device={} preset={} vocab={} batch={} context={} dropout={} warmup={} steps={} "
             "deterministic={} check_dir='{}'\n",
             c.device, c.preset, fmt::format("{}", fmt::join(c.vocab, ",")), c.batch, c.context, c.dropout, c.warmup,
             c.steps, c.deterministic, c.check_dir);
  for (int64_t v : c.vocab) {
    const nlohmann::json row = bench_one(c, v);
    fmt::print("{}\n", row.dump());
    std::fflush(stdout);
  }
}

}  // namespace

void cli_add_bench_train(CLI::App& bench) {
  auto config = std::make_shared<BenchTrainConfig>();
  auto* cmd = bench.add_subcommand("train", "Time training steps of a model preset (tokens/s, MFU, memory)");
  cmd->add_option("--device", config->device, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--preset", config->preset, "Model preset")->capture_default_str();
  cmd->add_option("--vocab", config->vocab, "Vocabulary sizes, one run each")->capture_default_str();
  cmd->add_option("--batch", config->batch, "Sequences per step")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--context", config->context, "Tokens per sequence (0: the preset's)")->capture_default_str();
  cmd->add_option("--dropout", config->dropout, "Dropout (negative: the preset's)")->capture_default_str();
  cmd->add_option("--warmup", config->warmup, "Untimed steps first")->capture_default_str();
  cmd->add_option("--steps", config->steps, "Timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_flag("--deterministic", config->deterministic, "Bit-reproducible mode");
  cmd->add_option("--check-dir", config->check_dir,
                  "Write initial weights, a batch and its loss here (for bench/model/torch_gpt.py)");
  cmd->add_option("--peak-tflops", config->peak_tflops, "MFU denominator, TFLOP/s")->capture_default_str();
  cmd->callback([config] { bench_train_run(*config); });
}

}  // namespace flashgpt

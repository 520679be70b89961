// `flashgpt bench generate`: CPU inference speed of a preset with random weights: prefill
// tokens/s for B prompts of P tokens, then decode tokens/s over N greedy steps at batch B,
// beside the weight bytes each decode step reads. Validated first: the logits of one decode
// step equal those of an uncached prefill of the same tokens (relative error printed).
#include "commands.h"

#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/model.h>

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>

namespace flashgpt {
namespace {

struct BenchGenerateOptions {
  std::string preset = "tiny";
  int64_t vocab = 100277;  // cl100k_base
  int64_t batch = 1;
  int64_t prompt_tokens = 32;
  int64_t new_tokens = 32;
  int threads = 0;
  uint64_t seed = 1;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void run_bench_generate(const BenchGenerateOptions& o) {
  fmt::print(stderr, "bench generate: preset={} vocab={} batch={} prompt_tokens={} new_tokens={} threads={}\n",
             o.preset, o.vocab, o.batch, o.prompt_tokens, o.new_tokens, o.threads);
  ModelConfig c = model_preset(o.preset, o.vocab);
  c.dropout = 0.0f;
  FLASHGPT_CHECK(o.prompt_tokens >= 1 && o.new_tokens >= 1 && o.prompt_tokens + o.new_tokens <= c.context,
                 "--prompt-tokens {} + --new-tokens {} must fit the {} preset's context of {}", o.prompt_tokens,
                 o.new_tokens, o.preset, c.context);
  std::vector<float> params(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, o.seed, params);
  auto engine = inference_create_cpu(c, params, {.max_slots = o.batch, .threads = o.threads});
  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  std::vector<std::vector<TokenId>> prompts(static_cast<size_t>(o.batch));
  for (auto& p : prompts) {
    p.resize(static_cast<size_t>(o.prompt_tokens));
    for (auto& t : p) t = static_cast<TokenId>(rng() % c.vocab_size);
  }
  const int64_t V = c.vocab_size;

  // Validation: one decode step after a prefill of P - 1 tokens against a prefill of P.
  {
    auto check = inference_create_cpu(c, params, {.max_slots = 2, .threads = o.threads});
    const auto& p = prompts[0];
    std::vector<float> a(static_cast<size_t>(V)), b(static_cast<size_t>(V));
    const SlotChunk whole{0, p};
    check->forward({&whole, 1}, a);
    if (p.size() > 1) {
      const SlotChunk head{1, std::span<const TokenId>(p).first(p.size() - 1)};
      check->forward({&head, 1}, b);
    }
    const SlotChunk last{1, std::span<const TokenId>(p).last(1)};
    check->forward({&last, 1}, b);
    double err = 0, scale = 1;
    for (int64_t v = 0; v < V; ++v) {
      err = std::max(err, double(std::abs(a[v] - b[v])));
      scale = std::max(scale, double(std::abs(a[v])));
    }
    FLASHGPT_CHECK(err / scale < 1e-4, "bench generate: cached and uncached logits differ by {:.3g}", err / scale);
    fmt::print("validated: decode step vs prefill logits, max relative difference {:.2e}\n", err / scale);
  }

  std::vector<SlotChunk> chunks;
  for (int64_t b = 0; b < o.batch; ++b) chunks.push_back({b, prompts[b]});
  std::vector<float> logits(static_cast<size_t>(o.batch * V));
  auto t0 = std::chrono::steady_clock::now();
  engine->forward(chunks, logits);
  const double prefill = seconds_since(t0);
  std::vector<std::vector<TokenId>> next(static_cast<size_t>(o.batch), std::vector<TokenId>(1));
  std::vector<std::pair<float, TokenId>> scratch;
  t0 = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < o.new_tokens; ++step) {
    for (int64_t b = 0; b < o.batch; ++b) {
      next[b][0] = sampling_draw(std::span<const float>(logits.data() + b * V, V), {.greedy = true}, b, step, scratch);
      chunks[b].tokens = next[b];
    }
    engine->forward(chunks, logits);
  }
  const double decode = seconds_since(t0);
  const double weight_bytes = 4.0 * static_cast<double>(model_param_count(c) - (c.padded_vocab_size - V) * c.d_model);
  const double step_s = decode / static_cast<double>(o.new_tokens);
  fmt::print("{} preset ({:.2f} M parameters), batch {}: prefill {} x {} tokens in {:.3f} s = {:.0f} tokens/s; "
             "decode {} steps in {:.3f} s = {:.1f} tokens/s ({:.2f} ms/step, weights read at {:.2f} GB/s)\n",
             o.preset, model_param_count_unpadded(c) / 1e6, o.batch, o.batch, o.prompt_tokens, prefill,
             static_cast<double>(o.batch * o.prompt_tokens) / prefill, o.new_tokens, decode,
             static_cast<double>(o.batch * o.new_tokens) / decode, 1e3 * step_s, weight_bytes / step_s / 1e9);
}

}  // namespace

void cli_add_bench_generate(CLI::App& bench) {
  auto o = std::make_shared<BenchGenerateOptions>();
  auto* g = bench.add_subcommand("generate", "CPU KV-cached inference: prefill and decode tokens/s of a preset");
  g->add_option("--preset", o->preset, "Model preset (random weights)")->capture_default_str();
  g->add_option("--vocab", o->vocab, "Vocabulary size (cl100k_base: 100277)")->capture_default_str();
  g->add_option("--batch", o->batch, "Sequences decoded together")->capture_default_str()->check(CLI::PositiveNumber);
  g->add_option("--prompt-tokens", o->prompt_tokens, "Prompt length P")->capture_default_str();
  g->add_option("--new-tokens", o->new_tokens, "Decode steps N")->capture_default_str();
  g->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  g->add_option("--seed", o->seed, "Seed of the random weights and prompts")->capture_default_str();
  g->callback([o] { run_bench_generate(*o); });
}

}  // namespace flashgpt

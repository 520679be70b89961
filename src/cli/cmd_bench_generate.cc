// `flashgpt bench generate`: inference speed of a preset with random weights on the CPU or
// the GPU: prefill tokens/s for B prompts of P tokens, then decode tokens/s over N greedy
// steps at batch B (forward_sample: on the GPU one CUDA graph per step, only the tokens
// come back), beside the bytes each decode step reads (weights and K/V cache) and, on the
// GPU, the memory-bandwidth bound: those bytes over the device's measured copy bandwidth.
// --prefill-tokens K also times a batch-1 prefill of K tokens. Validated first: the logits
// of one decode step equal those of an uncached prefill of the same tokens (relative error
// printed). The last line is one JSON object with every number.
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
#include <string>

namespace flashgpt {
namespace {

struct BenchGenerateOptions {
  std::string preset = "tiny";
  int64_t vocab = 100277;  // cl100k_base
  int64_t batch = 1;
  int64_t prompt_tokens = 32;
  int64_t new_tokens = 32;
  int64_t prefill_tokens = 0;
  int repeats = 3;
  int threads = 0;
  uint64_t seed = 1;
  std::string device = "cpu";
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void run_bench_generate(const BenchGenerateOptions& o) {
  ModelConfig c = model_preset(o.preset, o.vocab);
  c.dropout = 0.0f;
  const std::string device = inference_resolve_device(o.device, &c);
  fmt::print(stderr, "bench generate: preset={} vocab={} batch={} prompt_tokens={} new_tokens={} threads={} device={}\n",
             o.preset, o.vocab, o.batch, o.prompt_tokens, o.new_tokens, o.threads, device);
  FLASHGPT_CHECK(o.prompt_tokens >= 1 && o.new_tokens >= 1 && o.prompt_tokens + o.new_tokens <= c.context,
                 "--prompt-tokens {} + --new-tokens {} must fit the {} preset's context of {}", o.prompt_tokens,
                 o.new_tokens, o.preset, c.context);
  std::vector<float> params(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, o.seed, params);
  FLASHGPT_CHECK(o.prefill_tokens >= 0 && o.prefill_tokens <= c.context,
                 "--prefill-tokens {} must be in 0 .. the context of {}", o.prefill_tokens, c.context);
  FLASHGPT_CHECK(o.repeats >= 1, "--repeats must be at least 1, got {}", o.repeats);
  auto engine = inference_create(device, c, params, {.max_slots = o.batch, .threads = o.threads});
  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  std::vector<std::vector<TokenId>> prompts(static_cast<size_t>(o.batch));
  for (auto& p : prompts) {
    p.resize(static_cast<size_t>(o.prompt_tokens));
    for (auto& t : p) t = static_cast<TokenId>(rng() % c.vocab_size);
  }
  const int64_t V = c.vocab_size;

  // Validation: one decode step after a prefill of P - 1 tokens against a prefill of P.
  {
    auto check = inference_create(device, c, params, {.max_slots = 2, .threads = o.threads});
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
    // bf16 on the GPU: the cache holds rounded K/V and the products run in another order.
    const double tolerance = device == "cuda" ? 3e-2 : 1e-4;
    FLASHGPT_CHECK(err / scale < tolerance, "bench generate: cached and uncached logits differ by {:.3g}", err / scale);
    fmt::print("validated: decode step vs prefill logits, max relative difference {:.2e}\n", err / scale);
  }

  std::vector<SlotChunk> chunks;
  std::vector<uint64_t> index(static_cast<size_t>(o.batch)), step(static_cast<size_t>(o.batch));
  std::vector<TokenId> drawn(static_cast<size_t>(o.batch));
  for (int64_t b = 0; b < o.batch; ++b) chunks.push_back({b, prompts[b]}), index[b] = static_cast<uint64_t>(b);
  const SamplingConfig greedy{.greedy = true};
  std::vector<std::vector<TokenId>> next(static_cast<size_t>(o.batch), std::vector<TokenId>(1));
  // Each repeat: reset, prefill, N decode steps; the best repeat is reported (the first
  // also captures the CUDA graph).
  double prefill = 1e30, decode = 1e30;
  for (int rep = 0; rep < o.repeats; ++rep) {
    for (int64_t b = 0; b < o.batch; ++b) engine->reset(b), chunks[b].tokens = prompts[b];
    auto t0 = std::chrono::steady_clock::now();
    engine->forward_sample(chunks, greedy, index, step, drawn);
    prefill = std::min(prefill, seconds_since(t0));
    t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < o.new_tokens; ++s) {
      for (int64_t b = 0; b < o.batch; ++b) next[b][0] = drawn[b], chunks[b].tokens = next[b], step[b] = s + 1;
      engine->forward_sample(chunks, greedy, index, step, drawn);
    }
    decode = std::min(decode, seconds_since(t0));
  }
  // Bytes a decode step reads: every weight once (bf16 on the GPU, fp32 on the CPU; the
  // head's V real rows), plus each row's K and V cache (at the mean length over the steps).
  const double weight_elems = static_cast<double>(model_param_count(c) - (c.padded_vocab_size - V) * c.d_model);
  const double weight_bytes = (device == "cuda" ? 2.0 : 4.0) * weight_elems;
  const double mean_len = static_cast<double>(o.prompt_tokens) + 0.5 * static_cast<double>(o.new_tokens + 1);
  const double cache_bytes = static_cast<double>(o.batch) * static_cast<double>(c.n_layer) * 2.0 * mean_len *
                             static_cast<double>(c.d_model) * (device == "cuda" ? 2.0 : 4.0);
  const double step_s = decode / static_cast<double>(o.new_tokens);
  const double tokens_per_s = static_cast<double>(o.batch * o.new_tokens) / decode;
  double bandwidth = 0, bound_steps = 0;
  if (device == "cuda") {
    bandwidth = inference_cuda_copy_bandwidth(size_t{1} << 30);
    bound_steps = bandwidth / (weight_bytes + cache_bytes);
  }
  fmt::print("{} preset ({:.2f} M parameters) on {}, batch {}: prefill {} x {} tokens in {:.4f} s = {:.0f} tokens/s; "
             "decode {} steps in {:.4f} s = {:.1f} tokens/s ({:.3f} ms/step, {:.1f} MB read per step at {:.1f} GB/s)\n",
             o.preset, model_param_count_unpadded(c) / 1e6, device, o.batch, o.batch, o.prompt_tokens, prefill,
             static_cast<double>(o.batch * o.prompt_tokens) / prefill, o.new_tokens, decode, tokens_per_s, 1e3 * step_s,
             (weight_bytes + cache_bytes) / 1e6, (weight_bytes + cache_bytes) / step_s / 1e9);
  if (device == "cuda") {
    fmt::print("memory-bandwidth bound: copy bandwidth {:.0f} GB/s -> {:.0f} steps/s = {:.0f} tokens/s at batch {}; "
               "measured {:.1f}% of it\n",
               bandwidth / 1e9, bound_steps, bound_steps * static_cast<double>(o.batch), o.batch,
               100.0 * (1.0 / step_s) / bound_steps);
  }
  double prefill_long = 0;
  if (o.prefill_tokens > 0) {
    std::vector<TokenId> p(static_cast<size_t>(o.prefill_tokens));
    for (auto& t : p) t = static_cast<TokenId>(rng() % c.vocab_size);
    prefill_long = 1e30;
    const SlotChunk one{0, p};
    const uint64_t zero = 0;
    TokenId out = 0;
    for (int rep = 0; rep < o.repeats + 2; ++rep) {  // the first runs warm up
      engine->reset(0);
      const auto t0 = std::chrono::steady_clock::now();
      engine->forward_sample({&one, 1}, greedy, {&zero, 1}, {&zero, 1}, {&out, 1});
      if (rep >= 2 || o.repeats == 1) prefill_long = std::min(prefill_long, seconds_since(t0));
    }
    fmt::print("prefill of one {}-token prompt: {:.3f} ms (first token included)\n", o.prefill_tokens,
               1e3 * prefill_long);
  }
  fmt::print("{{\"preset\": \"{}\", \"device\": \"{}\", \"batch\": {}, \"prompt_tokens\": {}, \"new_tokens\": {}, "
             "\"prefill_s\": {:.6g}, \"decode_s\": {:.6g}, \"decode_tokens_per_s\": {:.6g}, \"step_ms\": {:.6g}, "
             "\"bytes_per_step\": {:.6g}, \"copy_bandwidth_gbs\": {:.6g}, \"bound_tokens_per_s\": {:.6g}, "
             "\"prefill_tokens\": {}, \"prefill_long_ms\": {:.6g}}}\n",
             o.preset, device, o.batch, o.prompt_tokens, o.new_tokens, prefill, decode, tokens_per_s, 1e3 * step_s,
             weight_bytes + cache_bytes, bandwidth / 1e9, bound_steps * static_cast<double>(o.batch), o.prefill_tokens,
             1e3 * prefill_long);
}

}  // namespace

void cli_add_bench_generate(CLI::App& bench) {
  auto o = std::make_shared<BenchGenerateOptions>();
  auto* g = bench.add_subcommand("generate", "KV-cached inference (CPU or GPU): prefill and decode tokens/s of a preset");
  g->add_option("--preset", o->preset, "Model preset (random weights)")->capture_default_str();
  g->add_option("--vocab", o->vocab, "Vocabulary size (cl100k_base: 100277)")->capture_default_str();
  g->add_option("--batch", o->batch, "Sequences decoded together")->capture_default_str()->check(CLI::PositiveNumber);
  g->add_option("--prompt-tokens", o->prompt_tokens, "Prompt length P")->capture_default_str();
  g->add_option("--new-tokens", o->new_tokens, "Decode steps N")->capture_default_str();
  g->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  g->add_option("--prefill-tokens", o->prefill_tokens, "Also time a batch-1 prefill of this many tokens (0: no)")
      ->capture_default_str();
  g->add_option("--repeats", o->repeats, "Runs of each measurement; the best is reported")->capture_default_str();
  g->add_option("--device", o->device, "cpu, cuda, or auto")->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  g->add_option("--seed", o->seed, "Seed of the random weights and prompts")->capture_default_str();
  g->callback([o] { run_bench_generate(*o); });
}

}  // namespace flashgpt

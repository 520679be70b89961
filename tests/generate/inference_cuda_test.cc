// The CUDA inference engine: the flash-decoding kernel against its CPU reference
// (attention_decode_split_reference) at cache lengths 1, 17, 511, 512 and several
// batch/head shapes; cached greedy generation against uncached recomputation on the GPU;
// the GPU engine against the fp32 CPU engine on the same weights (logits within bf16
// tolerance, greedy tokens equal wherever the CPU's top two logits are not a near tie);
// GPU sampling inside sampling_allowed_set and repeating under a seed; no allocation in a
// decode step. Skipped without a GPU (tests/common/gpu_main.cc).
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/generate_cuda.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <vector>

namespace flashgpt {
namespace {

float bf16_round(float f) { return __bfloat162float(__float2bfloat16(f)); }

template <class T>
T* to_device(const std::vector<T>& host) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(1, host.size()) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
  std::vector<__nv_bfloat16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = __float2bfloat16(x[i]);
  return out;
}

struct DecodeShape {
  int rows, heads, head_dim, keys_per_split;
};

TEST(AttentionDecodeCuda, MatchesSplitReference) {
  const int T = 600, S = 5;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (const DecodeShape& shape : {DecodeShape{1, 12, 64, 32}, DecodeShape{4, 2, 64, 128}, DecodeShape{3, 4, 32, 32},
                                   DecodeShape{5, 2, 128, 64}, DecodeShape{2, 3, 96, 8}}) {
    const int R = shape.rows, NH = shape.heads, D = shape.head_dim, C = NH * D;
    // Inputs rounded to bf16 first, so the reference sees exactly what the kernel reads.
    std::vector<float> k(static_cast<size_t>(S) * T * C), v(k.size()), q(static_cast<size_t>(R) * C);
    for (auto& x : k) x = bf16_round(normal(rng));
    for (auto& x : v) x = bf16_round(normal(rng));
    for (auto& x : q) x = bf16_round(2.0f * normal(rng));
    const int lengths_cycle[] = {1, 17, 511, 512, 600};
    std::vector<int32_t> q_rows, slots, lengths;
    std::vector<int64_t> slots64, lengths64;
    for (int r = 0; r < R; ++r) {
      q_rows.push_back(r);
      slots.push_back((r * 2 + 1) % S);
      lengths.push_back(lengths_cycle[(r + shape.head_dim / 32) % 5]);
      slots64.push_back(slots.back());
      lengths64.push_back(lengths.back());
    }
    for (int variant = 0; variant < 4; ++variant) {
      // Every row at each of the awkward lengths in turn, besides the mixed batch above.
      if (variant > 0) {
        for (int r = 0; r < R; ++r) lengths[r] = lengths_cycle[variant - 1], lengths64[r] = lengths[r];
      }
      std::vector<float> want(q.size());
      DecodeAttentionParams ref;
      ref.q = q.data(), ref.k = k.data(), ref.v = v.data(), ref.o = want.data();
      ref.rows = R, ref.heads = NH, ref.head_dim = D, ref.row_stride = C, ref.slot_stride = int64_t{T} * C;
      ref.slots = slots64.data(), ref.lengths = lengths64.data();
      attention_decode_split_reference(ref, shape.keys_per_split);

      auto* dq = to_device(to_bf16(q));
      auto* dk = to_device(to_bf16(k));
      auto* dv = to_device(to_bf16(v));
      auto* d_out = to_device(to_bf16(std::vector<float>(q.size(), 1e4f)));  // poisoned
      auto* d_rows = to_device(q_rows);
      auto* d_slots = to_device(slots);
      auto* d_lengths = to_device(lengths);
      std::vector<float> partial(attention_decode_cuda_partial_floats(R, NH, D, T, shape.keys_per_split), NAN);
      auto* d_partials = to_device(partial);
      DecodeAttentionCudaParams p;
      p.q = dq, p.k = dk, p.v = dv, p.o = d_out, p.partials = d_partials;
      p.q_rows = d_rows, p.slots = d_slots, p.lengths = d_lengths;
      p.rows = R, p.heads = NH, p.head_dim = D;
      p.q_row_stride = C, p.o_row_stride = C, p.row_stride = C, p.slot_stride = int64_t{T} * C;
      p.max_length = T, p.keys_per_split = shape.keys_per_split;
      attention_decode_cuda(p, nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<__nv_bfloat16> got(q.size());
      ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double g = __bfloat162float(got[i]), w = want[i];
        worst = std::max(worst, std::abs(g - w) / (1.0 + std::abs(w)));
      }
      EXPECT_LT(worst, 1e-2) << "rows " << R << " heads " << NH << " head_dim " << D << " split "
                             << shape.keys_per_split << " variant " << variant;
      for (void* ptr : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                        static_cast<void*>(d_out), static_cast<void*>(d_rows), static_cast<void*>(d_slots),
                        static_cast<void*>(d_lengths), static_cast<void*>(d_partials)}) {
        cudaFree(ptr);
      }
    }
  }
}

// A seed-shaped miniature (head dim 64), context 96, GPT-2 initialisation plus noise on
// every parameter (biases and LayerNorm included, so none hides behind zeros and ones).
// (Scaling the weights up to spread the logits made attention nearly one-hot, where bf16
// rounding of q and k flips which key wins: GPU and CPU then differ by 30% of the logits.)
ModelConfig mini_config() {
  ModelConfig c = model_preset("tiny", 1000);
  c.preset = "custom";
  c.d_model = 128, c.n_head = 2, c.d_ff = 512, c.n_layer = 3, c.context = 96;
  c.dropout = 0.0f;
  return c;
}

std::vector<float> random_params(const ModelConfig& c, uint64_t seed) {
  std::vector<float> p(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, seed, p);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (auto& v : p) v += noise(rng);
  return p;
}

std::vector<TokenId> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(static_cast<size_t>(n));
  for (auto& v : t) v = static_cast<TokenId>(rng() % vocab);
  return t;
}

struct Top2 {
  TokenId best;
  float margin;  // top1 - top2
  float scale;   // max |logit|
};
Top2 top2(std::span<const float> logits) {
  Top2 t{0, 0, 0};
  float a = -INFINITY, b = -INFINITY;
  for (size_t i = 0; i < logits.size(); ++i) {
    t.scale = std::max(t.scale, std::abs(logits[i]));
    if (logits[i] > a) {
      b = a, a = logits[i], t.best = static_cast<TokenId>(i);
    } else if (logits[i] > b) {
      b = logits[i];
    }
  }
  t.margin = a - b;
  return t;
}

TokenId argmax(std::span<const float> logits) { return top2(logits).best; }

// Greedy decoding of 3 ragged prompts at once (decode steps through the CUDA graph) equals,
// token for token, the argmax of an uncached prefill of each prefix on the GPU (no graph,
// FlashAttention over the whole sequence).
TEST(InferenceCuda, CachedGreedyEqualsUncachedRecompute) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 5);
  auto cached = inference_create_cuda(c, params, {.max_slots = 3});
  auto uncached = inference_create_cuda(c, params, {.max_slots = 1});
  const int64_t V = c.vocab_size;
  std::vector<std::vector<TokenId>> seqs = {random_tokens(5, V, 1), random_tokens(1, V, 2), random_tokens(23, V, 3)};
  std::vector<SlotChunk> chunks;
  std::vector<uint64_t> index = {0, 1, 2}, step = {0, 0, 0};
  std::vector<TokenId> drawn(3);
  const SamplingConfig greedy{.greedy = true};
  int compared = 0, near_ties = 0;
  std::vector<float> logits(static_cast<size_t>(V));
  for (int s = 0; s < 60; ++s) {
    chunks.clear();
    for (int64_t b = 0; b < 3; ++b) {
      const auto& seq = seqs[b];
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seq) : std::span<const TokenId>(seq).last(1)});
    }
    cached->forward_sample(chunks, greedy, index, step, drawn);
    for (int64_t b = 0; b < 3; ++b) {
      uncached->reset(0);
      const SlotChunk whole{0, seqs[b]};
      uncached->forward({&whole, 1}, logits);
      const Top2 t = top2(logits);
      if (t.margin > 1e-2f * std::max(1.0f, t.scale)) {
        EXPECT_EQ(drawn[b], t.best) << "row " << b << " step " << s;
        ++compared;
      } else {
        ++near_ties;
      }
      seqs[b].push_back(drawn[b]);  // teacher-forced on the cached choice either way
    }
  }
  EXPECT_EQ(cached->length(2), 23 + 59);
  EXPECT_GE(compared, 150);  // of 180 (the rest are near ties, not compared)
  EXPECT_LE(near_ties, 30);
  std::printf("cached vs uncached: %d greedy tokens equal, %d near ties not compared\n", compared, near_ties);
}

// The GPU engine against the fp32 CPU engine on the same weights, fed the same tokens:
// logits within bf16 tolerance, and the GPU's greedy token equal to the CPU's wherever the
// CPU's top two logits are more than the tolerance apart.
TEST(InferenceCuda, MatchesCpuEngine) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 9);
  auto gpu = inference_create_cuda(c, params, {.max_slots = 2});
  auto cpu = inference_create_cpu(c, params, {.max_slots = 2, .threads = 1});
  const int64_t V = c.vocab_size;
  std::vector<std::vector<TokenId>> seqs = {random_tokens(7, V, 4), random_tokens(12, V, 5)};
  std::vector<float> lg(static_cast<size_t>(2 * V)), lc(lg.size());
  double worst = 0;
  int compared = 0;
  for (int s = 0; s < 40; ++s) {
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < 2; ++b) {
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
    }
    gpu->forward(chunks, lg);
    cpu->forward(chunks, lc);
    for (int64_t b = 0; b < 2; ++b) {
      const std::span<const float> g(lg.data() + b * V, V), h(lc.data() + b * V, V);
      const Top2 t = top2(h);
      double err = 0;
      for (int64_t i = 0; i < V; ++i) err = std::max(err, double(std::abs(g[i] - h[i])));
      worst = std::max(worst, err / std::max(1.0f, t.scale));
      if (t.margin > 3e-2f * std::max(1.0f, t.scale)) {
        EXPECT_EQ(argmax(g), t.best) << "row " << b << " step " << s;
        ++compared;
      }
      seqs[b].push_back(t.best);  // the CPU's greedy choice
    }
  }
  EXPECT_LT(worst, 3e-2);
  EXPECT_GE(compared, 50);  // of 80
  std::printf("GPU vs CPU engine: max |logit difference| / max |logit| = %.3g over 40 steps, %d greedy tokens compared\n",
              worst, compared);
}

// GPU sampling draws inside the allowed set of sampling_allowed_set on the same logits
// (a second engine in the same state gives them, bit for bit), greedy equals the argmax,
// and a seed repeats through generate_tokens while another seed differs.
TEST(InferenceCuda, SamplingOnGpu) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 13);
  const int64_t V = c.vocab_size, R = 16;
  const auto prompt = random_tokens(9, V, 6);
  const std::vector<SamplingConfig> configs = {
      {.greedy = true},
      {.temperature = 1.0f, .seed = 1},
      {.temperature = 1.0f, .top_k = 5, .seed = 2},
      {.temperature = 0.7f, .top_p = 0.5f, .seed = 3},
      {.temperature = 1.3f, .top_k = 40, .top_p = 0.9f, .seed = 4},
      {.temperature = 2.0f, .top_k = 1, .seed = 5},
  };
  for (const SamplingConfig& sc : configs) {
    auto a = inference_create_cuda(c, params, {.max_slots = R});
    auto b = inference_create_cuda(c, params, {.max_slots = R});
    std::vector<SlotChunk> chunks;
    std::vector<uint64_t> index, step;
    for (int64_t r = 0; r < R; ++r) chunks.push_back({r, prompt}), index.push_back(100 + r), step.push_back(r % 3);
    std::vector<float> logits(static_cast<size_t>(R * V));
    std::vector<TokenId> drawn(static_cast<size_t>(R));
    a->forward(chunks, logits);
    b->forward_sample(chunks, sc, index, step, drawn);
    std::set<TokenId> distinct;
    for (int64_t r = 0; r < R; ++r) {
      const auto allowed = sampling_allowed_set(std::span<const float>(logits.data() + r * V, V), sc);
      EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), drawn[r]))
          << "temperature " << sc.temperature << " top_k " << sc.top_k << " top_p " << sc.top_p << " row " << r
          << " drew " << drawn[r] << " of " << allowed.size() << " allowed";
      distinct.insert(drawn[r]);
    }
    if (!sc.greedy && sc.top_k != 1) EXPECT_GT(distinct.size(), 1u) << "16 draws all gave one token";
  }
  // Seeds repeat through the whole loop (prefill, graph-captured decode steps, refills).
  const auto tokenizer_free_run = [&](uint64_t seed) {
    auto e = inference_create_cuda(c, params, {.max_slots = 2});
    std::vector<std::vector<TokenId>> out;
    std::vector<std::vector<TokenId>> seqs = {random_tokens(4, V, 7), random_tokens(11, V, 8)};
    std::vector<uint64_t> index = {0, 1}, step = {0, 0};
    std::vector<TokenId> drawn(2);
    const SamplingConfig sc{.temperature = 1.0f, .top_k = 50, .top_p = 0.95f, .seed = seed};
    for (int s = 0; s < 30; ++s) {
      std::vector<SlotChunk> chunks;
      for (int64_t b = 0; b < 2; ++b) {
        chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
      }
      e->forward_sample(chunks, sc, index, step, drawn);
      for (int64_t b = 0; b < 2; ++b) seqs[b].push_back(drawn[b]), step[b] += 1;
    }
    return seqs;
  };
  const auto first = tokenizer_free_run(42), again = tokenizer_free_run(42), other = tokenizer_free_run(43);
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other);
}

// Decode steps after the first (graph capture) allocate no device memory.
TEST(InferenceCuda, DecodeStepsAllocateNothing) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 17);
  auto e = inference_create_cuda(c, params, {.max_slots = 4});
  std::vector<std::vector<TokenId>> seqs = {random_tokens(3, c.vocab_size, 9), random_tokens(8, c.vocab_size, 10),
                                            random_tokens(2, c.vocab_size, 11), random_tokens(5, c.vocab_size, 12)};
  std::vector<uint64_t> index = {0, 1, 2, 3}, step = {0, 0, 0, 0};
  std::vector<TokenId> drawn(4);
  size_t free_before = 0, free_after = 0, total = 0;
  for (int s = 0; s < 40; ++s) {
    if (s == 3) ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < 4; ++b) {
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
    }
    e->forward_sample(chunks, {.greedy = true}, index, step, drawn);
    for (int64_t b = 0; b < 4; ++b) seqs[b].push_back(drawn[b]);
  }
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  EXPECT_EQ(free_before, free_after);
}

TEST(InferenceCuda, RejectsBadInput) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 1);
  EXPECT_THROW(inference_create_cuda(c, std::span<const float>(params).first(10), {}), Error);
  auto e = inference_create_cuda(c, params, {.max_slots = 2, .max_context = 16});
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  const std::vector<TokenId> bad = {static_cast<TokenId>(c.vocab_size)};
  const SlotChunk chunk{0, bad};
  EXPECT_THROW(e->forward({&chunk, 1}, logits), Error);
  const auto too_long = random_tokens(17, c.vocab_size, 1);
  const SlotChunk long_chunk{0, too_long};
  EXPECT_THROW(e->forward({&long_chunk, 1}, logits), Error);
  const SlotChunk other{5, too_long};
  EXPECT_THROW(e->forward({&other, 1}, logits), Error);
}

}  // namespace
}  // namespace flashgpt

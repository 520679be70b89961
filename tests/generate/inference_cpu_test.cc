// The KV-cached CPU engine against uncached full recomputation: the CPU backend's
// GptModel::forward_logits and a plain double-precision reference, on tiny randomly
// initialised models; the one-row decode attention against the attention reference.
#include "common/op_test.h"
#include "generate/reference_forward.h"

#include <flashgpt/attention_cpu.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

namespace flashgpt {
namespace {

ModelConfig tiny_config(int64_t vocab) {
  ModelConfig c = model_preset("tiny", vocab);  // C 64, L 2, NH 2 (HD 32), F 256, T 64
  c.dropout = 0.0f;
  return c;
}

// GPT-2 initialisation plus noise on every parameter, biases and LayerNorm included, so
// that a wrong bias or LayerNorm offset cannot hide behind zeros and ones.
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

// max |a - b| over max(1, max |b|): op_error's default (tests/common/op_test.h).
double relative_error(std::span<const float> a, std::span<const float> b) { return testing::op_error(a, b).value; }
double relative_error(std::span<const float> a, std::span<const double> b) { return testing::op_error(a, b).value; }

constexpr double kTolerance = 2e-5;  // fp32 through 2 layers, C 64, F 256

std::unique_ptr<GptModel> uncached_model(const ModelConfig& c, std::span<const float> params) {
  ModelOptions options;
  options.max_batch = 1;
  options.threads = 1;  // tiny shapes: a thread team costs more than it saves on a busy 2-core machine
  auto model = gpt_create_cpu(c, options);
  model->params_set(params);
  return model;
}

TEST(InferenceCpu, TokenByTokenMatchesUncachedAtEveryCacheLength) {
  const ModelConfig c = tiny_config(300);
  const auto params = random_params(c, 11);
  const auto tokens = random_tokens(c.context, c.vocab_size, 5);
  const int64_t T = c.context, V = c.vocab_size;
  std::vector<float> uncached(static_cast<size_t>(T * V));
  uncached_model(c, params)->forward_logits(tokens, 1, T, uncached);
  const auto reference = testing::reference_logits(c, params, tokens);

  auto engine = inference_create_cpu(c, params, {.max_slots = 2});
  std::vector<float> logits(static_cast<size_t>(V));
  // Cache lengths 1 .. T: each step appends one token to slot 1 and attends over all.
  for (int64_t t = 0; t < T; ++t) {
    const SlotChunk chunk{1, std::span<const TokenId>(tokens).subspan(t, 1)};
    engine->forward({&chunk, 1}, logits);
    ASSERT_EQ(engine->length(1), t + 1);
    const std::span<const float> want(uncached.data() + t * V, V);
    EXPECT_LT(relative_error(logits, want), kTolerance) << "cache length " << t + 1;
    EXPECT_LT(relative_error(logits, std::span<const double>(reference.data() + t * V, V)),
              kTolerance)
        << "cache length " << t + 1;
  }
  EXPECT_EQ(engine->length(0), 0);
  const SlotChunk past_end{1, std::span<const TokenId>(tokens).subspan(0, 1)};
  EXPECT_THROW(engine->forward({&past_end, 1}, logits), Error);  // the context is full
}

TEST(InferenceCpu, PrefillChunksAndMixedCallsMatchUncached) {
  const ModelConfig c = tiny_config(300);
  const auto params = random_params(c, 12);
  const int64_t V = c.vocab_size;
  const auto a = random_tokens(c.context, V, 21);
  const auto b = random_tokens(c.context, V, 22);
  auto model = uncached_model(c, params);
  std::vector<float> ua(static_cast<size_t>(c.context * V)), ub(ua.size());
  model->forward_logits(a, 1, c.context, ua);
  model->forward_logits(b, 1, c.context, ub);

  auto engine = inference_create_cpu(c, params, {.max_slots = 3, .threads = 2});
  // Slot 2 takes a in chunks of 17, 1, 16, 30 (to the full context), slot 0 takes b in
  // chunks of 1, 17, 1, 1, 44, in the same calls: prefill beside decode.
  const std::vector<std::pair<int64_t, int64_t>> cuts = {{17, 1}, {1, 17}, {16, 1}, {30, 1}};
  int64_t at_a = 0, at_b = 0;
  for (auto [na, nb] : cuts) {
    const SlotChunk chunks[2] = {{2, std::span<const TokenId>(a).subspan(at_a, na)},
                                 {0, std::span<const TokenId>(b).subspan(at_b, nb)}};
    std::vector<float> logits(static_cast<size_t>(2 * V));
    engine->forward(chunks, logits);
    at_a += na, at_b += nb;
    EXPECT_LT(relative_error(std::span<const float>(logits.data(), V),
                                           std::span<const float>(ua.data() + (at_a - 1) * V, V)),
              kTolerance)
        << "slot 2 at " << at_a;
    EXPECT_LT(relative_error(std::span<const float>(logits.data() + V, V),
                                           std::span<const float>(ub.data() + (at_b - 1) * V, V)),
              kTolerance)
        << "slot 0 at " << at_b;
  }
  // A reset slot starts again from position 0.
  engine->reset(2);
  const SlotChunk again{2, std::span<const TokenId>(b).subspan(0, 17)};
  std::vector<float> logits(static_cast<size_t>(V));
  engine->forward({&again, 1}, logits);
  EXPECT_LT(relative_error(logits, std::span<const float>(ub.data() + 16 * V, V)), kTolerance);
}

// Greedy generation with the cache picks the same tokens as recomputing every logit from
// scratch at every step.
TEST(InferenceCpu, GreedyCachedEqualsUncachedTokenForToken) {
  const ModelConfig c = tiny_config(300);
  for (uint64_t seed : {1, 2, 3}) {
    const auto params = random_params(c, 100 + seed);
    auto model = uncached_model(c, params);
    std::vector<TokenId> uncached = random_tokens(5 + static_cast<int64_t>(seed), c.vocab_size, 40 + seed);
    const std::vector<TokenId> prompt = uncached;
    while (static_cast<int64_t>(uncached.size()) < c.context) {
      const int64_t T = static_cast<int64_t>(uncached.size());
      std::vector<float> logits(static_cast<size_t>(T * c.vocab_size));
      model->forward_logits(uncached, 1, T, logits);
      const float* last = logits.data() + (T - 1) * c.vocab_size;
      uncached.push_back(static_cast<TokenId>(std::max_element(last, last + c.vocab_size) - last));
    }
    auto engine = inference_create_cpu(c, params, {.max_slots = 1});
    std::vector<TokenId> cached = prompt;
    std::vector<float> logits(static_cast<size_t>(c.vocab_size));
    SlotChunk chunk{0, prompt};
    while (true) {
      engine->forward({&chunk, 1}, logits);
      cached.push_back(static_cast<TokenId>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
      if (static_cast<int64_t>(cached.size()) == c.context) break;
      chunk.tokens = std::span<const TokenId>(cached).subspan(cached.size() - 1, 1);
    }
    EXPECT_EQ(cached, uncached) << "seed " << seed;
  }
}

TEST(InferenceCpu, RejectsBadInput) {
  const ModelConfig c = tiny_config(300);
  const auto params = random_params(c, 1);
  EXPECT_THROW(inference_create_cpu(c, std::span<const float>(params).subspan(1), {}), Error);
  EXPECT_THROW(inference_create_cpu(c, params, {.max_slots = 0}), Error);
  EXPECT_THROW(inference_create_cpu(c, params, {.max_context = c.context + 1}), Error);
  auto engine = inference_create_cpu(c, params, {.max_slots = 2});
  const std::vector<TokenId> bad = {1, 300};
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  const SlotChunk out_of_vocab{0, bad};
  EXPECT_THROW(engine->forward({&out_of_vocab, 1}, logits), Error);
  const std::vector<TokenId> ok = {1};
  const SlotChunk no_slot{2, ok};
  EXPECT_THROW(engine->forward({&no_slot, 1}, logits), Error);
  const SlotChunk twice[2] = {{0, ok}, {0, ok}};
  std::vector<float> two(static_cast<size_t>(2 * c.vocab_size));
  EXPECT_THROW(engine->forward(twice, two), Error);
  const SlotChunk one{0, ok};
  EXPECT_THROW(engine->forward({&one, 1}, two), Error);  // logits of the wrong size
}

// The one-row decode attention against the attention reference (one query row attending
// to n keys), for several slots of different lengths in one call.
TEST(AttentionDecodeCpu, MatchesReferenceAtAwkwardLengths) {
  const int64_t NH = 3, HD = 64, C = NH * HD, T_max = 1000, S = 4;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<size_t>(S * T_max * C)), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  for (const std::vector<int64_t>& lengths :
       {std::vector<int64_t>{1}, {17, 1, 511}, {512, 1000, 2, 17}, {999, 3}}) {
    const int64_t rows = static_cast<int64_t>(lengths.size());
    std::vector<int64_t> slots;
    for (int64_t r = 0; r < rows; ++r) slots.push_back((r * 3 + 1) % S);  // distinct, out of order
    std::vector<float> q(static_cast<size_t>(rows * C)), o(q.size());
    for (auto& x : q) x = 2.0f * normal(rng);
    DecodeAttentionParams d;
    d.q = q.data(), d.k = k.data(), d.v = v.data(), d.o = o.data();
    d.rows = rows, d.heads = NH, d.head_dim = HD, d.row_stride = C, d.slot_stride = T_max * C;
    d.slots = slots.data(), d.lengths = lengths.data();
    attention_decode_cpu(d);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> want(static_cast<size_t>(C)), lse(static_cast<size_t>(NH));
      AttentionParams p;
      p.q = q.data() + r * C;
      p.k = k.data() + slots[r] * T_max * C;
      p.v = v.data() + slots[r] * T_max * C;
      p.o = want.data();
      p.lse = lse.data();
      p.batch = 1, p.seqlen_q = 1, p.seqlen_k = static_cast<int>(lengths[r]);
      p.heads_q = p.heads_kv = NH, p.head_dim = HD;
      attention_set_dense_strides(p);
      p.k_row_stride = p.v_row_stride = C;  // the cache's rows
      p.k_batch_stride = p.v_batch_stride = T_max * C;
      attention_forward_reference(p);
      EXPECT_LT(relative_error(std::span<const float>(o.data() + r * C, C), want), 1e-5)
          << "length " << lengths[r];
    }
  }
  DecodeAttentionParams empty;
  const int64_t zero = 0, slot = 0;
  std::vector<float> q(static_cast<size_t>(C)), o(q.size());
  empty.q = q.data(), empty.k = k.data(), empty.v = v.data(), empty.o = o.data();
  empty.rows = 1, empty.heads = NH, empty.head_dim = HD, empty.row_stride = C, empty.slot_stride = T_max * C;
  empty.slots = &slot, empty.lengths = &zero;
  EXPECT_THROW(attention_decode_cpu(empty), Error);  // a row with no key
}

// --device: explicit choices pass, auto takes cuda only where the CUDA engine can run the
// model, anything else is refused naming the choices.
TEST(InferenceDevice, ResolvesChoices) {
  const ModelConfig c = tiny_config(300);
  EXPECT_EQ(inference_resolve_device("cpu", &c), "cpu");
  EXPECT_EQ(inference_resolve_device("cuda", &c), "cuda");
  EXPECT_EQ(inference_resolve_device("auto", &c), inference_cuda_supports(c) ? "cuda" : "cpu");
  if (!inference_cuda_available()) {
    EXPECT_EQ(inference_resolve_device("auto"), "cpu");
  }
  try {
    inference_resolve_device("gpu");
    ADD_FAILURE() << "no error for an unknown device";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cpu, cuda, auto"), std::string::npos) << e.what();
  }
  auto engine = inference_create("auto", c, random_params(c, 1), {.max_slots = 1, .threads = 1});
  EXPECT_EQ(engine->max_slots(), 1);
}

// The flash-decoding algorithm (blocks of keys combined through their log-sum-exp), the
// CUDA decode kernel's reference, equals the one-pass decode attention at every split size,
// including splits larger than the cache and ones that leave a one-key last block.
TEST(AttentionDecodeSplitReference, EqualsOnePassAttention) {
  const int64_t NH = 2, HD = 32, C = NH * HD, T_max = 520, S = 3;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<size_t>(S * T_max * C)), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  const std::vector<int64_t> lengths = {1, 17, 511, 512}, slots = {2, 0, 1, 2};
  std::vector<float> q(static_cast<size_t>(4 * C)), want(q.size()), got(q.size());
  for (auto& x : q) x = 3.0f * normal(rng);
  DecodeAttentionParams d;
  d.q = q.data(), d.k = k.data(), d.v = v.data(), d.o = want.data();
  d.rows = 4, d.heads = NH, d.head_dim = HD, d.row_stride = C, d.slot_stride = T_max * C;
  d.slots = slots.data(), d.lengths = lengths.data();
  attention_decode_cpu(d);
  d.o = got.data();
  for (int64_t split : {1, 8, 32, 128, 511, 1024}) {
    std::fill(got.begin(), got.end(), -7.0f);
    attention_decode_split_reference(d, split);
    EXPECT_LT(relative_error(std::span<const float>(got), std::span<const float>(want)), 1e-5) << "split " << split;
  }
  EXPECT_THROW(attention_decode_split_reference(d, 0), Error);
}

}  // namespace
}  // namespace flashgpt

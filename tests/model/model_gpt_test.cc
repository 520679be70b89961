// The whole model: the double reference's gradient against finite differences, the fp32
// CPU backend against the double reference (loss, logits, every gradient, dropout
// included), gradient accumulation and scaling, determinism across thread counts, AdamW,
// bad input, and a tiny model overfitting one batch.
#include "model/gpt_reference.h"
#include "model/model_test_support.h"
#include "model/param_layout.h"

#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>

namespace flashgpt::model {
namespace {

using testing::kRelativeToMax;
using testing::op_error;
using testing::random_tokens;
using testing::random_vector;

// A model small enough for finite differences: V 70 (Vp 128: 58 padding rows), head dim
// 32 (the smallest the attention kernels take), d_ff 96.
ModelConfig test_config(float dropout) {
  ModelConfig c;
  c.preset = "custom";
  c.vocab_size = 70;
  c.padded_vocab_size = model_padded_vocab(c.vocab_size);
  c.context = 8;
  c.d_model = 64;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_ff = 96;
  c.dropout = dropout;
  model_config_validate(c);
  return c;
}

// Parameters farther from their initial values than model_init_params leaves them, so
// that LayerNorm weights, biases and attention patterns all matter: weights N(0, 0.15),
// biases N(0, 0.05), LayerNorm weights N(1, 0.1); wte's padding rows 0.
std::vector<float> random_params(const ModelConfig& c, uint64_t seed) {
  const ParamLayout layout(c);
  std::vector<float> p(static_cast<size_t>(layout.total()));
  for (const ParamSpec& s : layout.specs()) {
    const bool ln_weight = s.kind == ParamKind::ln1_w || s.kind == ParamKind::ln2_w || s.kind == ParamKind::lnf_w;
    const double mean = ln_weight ? 1.0 : 0.0, stddev = ln_weight ? 0.1 : s.shape.size() >= 2 ? 0.15 : 0.05;
    const auto v = random_vector<float>(s.numel, seed + static_cast<uint64_t>(s.kind), stddev, mean);
    std::copy(v.begin(), v.end(), p.begin() + s.offset);
  }
  const ParamSpec& wte = layout.specs()[0];
  std::fill(p.begin() + wte.offset + c.vocab_size * c.d_model, p.begin() + wte.offset + wte.numel, 0.0f);
  return p;
}

struct Batch {
  int64_t B, T;
  std::vector<TokenId> windows;  // (B, T + 1)
  std::vector<int32_t> inputs;   // (B, T)
  std::vector<int32_t> targets;  // (B, T)
};

Batch random_batch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Batch b{B, T, {}, {}, {}};
  const auto ids = random_tokens(B * (T + 1), V, seed);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t <= T; ++t) {
      const int32_t id = ids[static_cast<size_t>(i * (T + 1) + t)];
      b.windows.push_back(static_cast<TokenId>(id));
      if (t < T) b.inputs.push_back(id);
      if (t > 0) b.targets.push_back(id);
    }
  return b;
}

double reference_loss(const ModelConfig& c, const std::vector<double>& params, std::vector<double>* grads,
                      const Batch& b, StepRng rng, bool dropout, double loss_scale = 1.0,
                      std::vector<double>* logits = nullptr) {
  return reference::gpt_forward_backward<double>(c, params.data(), grads != nullptr ? grads->data() : nullptr,
                                                 b.inputs.data(), b.targets.data(), b.B, b.T, rng, dropout, loss_scale,
                                                 logits != nullptr ? logits->data() : nullptr);
}

// The double reference's whole-model gradient against central finite differences, a few
// random coordinates of every parameter kind, with and without dropout (the masks are a
// fixed function of the step, so the loss stays differentiable).
void whole_model_fd(float dropout) {
  const ModelConfig c = test_config(dropout);
  const ParamLayout layout(c);
  const auto pf = random_params(c, 100);
  std::vector<double> params(pf.begin(), pf.end()), grads(params.size(), 0.0);
  const Batch batch = random_batch(2, 5, c.vocab_size, 101);
  const StepRng rng{555, 9};
  reference_loss(c, params, &grads, batch, rng, dropout > 0, 1.0);
  auto f = [&] { return reference_loss(c, params, nullptr, batch, rng, dropout > 0); };
  for (const ParamSpec& s : layout.specs()) {
    // wte: only real rows (the padding rows are checked to stay 0 below).
    const int64_t n = s.kind == ParamKind::wte ? c.vocab_size * c.d_model : s.numel;
    auto indices = testing::sample_indices(n, 4, 200 + static_cast<uint64_t>(s.kind));
    for (auto& i : indices) i += s.offset;
    testing::expect_gradient_matches_fd(s.name.c_str(), params, grads, f, indices);
  }
  const ParamSpec& wte = layout.specs()[0];
  for (int64_t i = c.vocab_size * c.d_model; i < wte.numel; ++i) ASSERT_EQ(grads[wte.offset + i], 0.0);
}

TEST(ModelGptFd, WholeModelGradient) { whole_model_fd(0.0f); }
TEST(ModelGptFd, WholeModelGradientWithDropout) { whole_model_fd(0.1f); }

// The fp32 backend against the double reference on the same weights and batch: loss,
// and every gradient kind relative to its own scale. fp32 through two layers and a
// softmax keeps ~1e-6 relative; 1e-4 allows for the longest sums while any wrong index,
// mask or formula shows as O(1).
void fp32_against_reference(float dropout, int64_t B, int64_t T) {
  SCOPED_TRACE(::testing::Message() << "dropout " << dropout << " B " << B << " T " << T);
  const ModelConfig c = test_config(dropout);
  const ParamLayout layout(c);
  const auto pf = random_params(c, 300);
  const std::vector<double> params(pf.begin(), pf.end());
  const Batch batch = random_batch(B, T, c.vocab_size, 301);
  const StepRng rng{0xfeedface12345678ull, 3};
  std::vector<double> grads_ref(params.size(), 0.0);
  const double loss_ref = reference_loss(c, params, &grads_ref, batch, rng, dropout > 0, 2.0);

  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 4});
  model->params_set(pf);
  model->grads_zero();
  const double loss = model->forward_backward(batch.windows, B, T, rng, 2.0f);
  EXPECT_NEAR(loss, loss_ref, 1e-5 * loss_ref);
  std::vector<float> grads(params.size());
  model->grads_get(grads);
  for (const ParamSpec& s : layout.specs()) {
    const std::vector<float> g(grads.begin() + s.offset, grads.begin() + s.offset + s.numel);
    const std::vector<double> r(grads_ref.begin() + s.offset, grads_ref.begin() + s.offset + s.numel);
    EXPECT_LT(op_error(g, r, kRelativeToMax).value, 1e-4) << s.name;
  }
}

TEST(ModelGptFp32, MatchesReference) {
  fp32_against_reference(0.0f, 2, 8);
  fp32_against_reference(0.0f, 3, 7);  // B < max_batch, T < context
  fp32_against_reference(0.0f, 1, 1);
}

// Dropout at every site (embedding, attention probabilities, both residuals) drops the
// same elements in the fp32 backend as in the reference, which reads the convention of
// model.h directly; a mask off by one element would show here.
TEST(ModelGptFp32, MatchesReferenceWithDropout) {
  fp32_against_reference(0.1f, 2, 8);
  fp32_against_reference(0.3f, 3, 5);
}

TEST(ModelGptFp32, LogitsAndValidationLoss) {
  const ModelConfig c = test_config(0.1f);
  const auto pf = random_params(c, 400);
  const std::vector<double> params(pf.begin(), pf.end());
  const Batch batch = random_batch(3, 6, c.vocab_size, 401);
  std::vector<double> logits_ref(3 * 6 * c.vocab_size);
  const double loss_ref = reference_loss(c, params, nullptr, batch, StepRng{}, false, 1.0, &logits_ref);

  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 3, .max_context = 6});
  model->params_set(pf);
  model->grads_zero();
  std::vector<TokenId> inputs(batch.inputs.begin(), batch.inputs.end());
  std::vector<float> logits(logits_ref.size());
  model->forward_logits(inputs, 3, 6, logits);
  EXPECT_LT(op_error(logits, logits_ref, kRelativeToMax).value, 1e-5);
  // Validation: no dropout although the config has it, and the gradients stay untouched.
  EXPECT_NEAR(model->forward_loss(batch.windows, 3, 6), loss_ref, 1e-5 * loss_ref);
  EXPECT_EQ(model->grads_norm(), 0.0);
}

// Gradients add up over calls, and scale exactly with loss_scale (a power of two scales
// every rounding step exactly).
TEST(ModelGptFp32, GradientsAccumulateAndScale) {
  const ModelConfig c = test_config(0.1f);
  const auto pf = random_params(c, 500);
  const Batch batch = random_batch(2, 8, c.vocab_size, 501);
  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 2});
  model->params_set(pf);
  const size_t n = pf.size();
  std::vector<float> g1(n), g4(n), g11(n);
  model->grads_zero();
  const double l1 = model->forward_backward(batch.windows, 2, 8, StepRng{1, 2}, 1.0f);
  model->grads_get(g1);
  model->grads_zero();
  const double l4 = model->forward_backward(batch.windows, 2, 8, StepRng{1, 2}, 4.0f);
  model->grads_get(g4);
  EXPECT_EQ(l1, l4);  // loss before loss_scale
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(g4[i], 4.0f * g1[i]) << i;
  model->grads_zero();
  model->forward_backward(batch.windows, 2, 8, StepRng{1, 2}, 1.0f);
  model->forward_backward(batch.windows, 2, 8, StepRng{1, 2}, 1.0f);
  model->grads_get(g11);
  // Two passes accumulate in fp32 in another order than one pass doubled, so an element's
  // rounding is that of the partial sums it is made of: bounded against the gradient's scale
  // (the largest |g1|), not against the element, which can be far smaller (the no-BLAS GEMM
  // left a 4e-4 element-relative gap on a near-zero gradient). A missed or doubled pass would
  // be off by the element itself.
  double gmax = 0.0, worst = 0.0;
  for (size_t i = 0; i < n; ++i) gmax = std::max(gmax, static_cast<double>(std::abs(g1[i])));
  for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(g11[i] - 2.0 * g1[i]));
  EXPECT_LT(worst / gmax, 1e-6);
  // Another dropout step draws other masks, so another loss.
  EXPECT_NE(model->forward_backward(batch.windows, 2, 8, StepRng{1, 3}, 1.0f), l1);
}

TEST(ModelGptFp32, GradNormAndZero) {
  const ModelConfig c = test_config(0.0f);
  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 2});
  model->params_set(random_params(c, 600));
  model->grads_zero();
  const Batch batch = random_batch(2, 8, c.vocab_size, 601);
  model->forward_backward(batch.windows, 2, 8, StepRng{}, 1.0f);
  std::vector<float> g(static_cast<size_t>(model_param_count(c)));
  model->grads_get(g);
  double sum = 0.0;
  for (const float x : g) sum += static_cast<double>(x) * x;
  EXPECT_GT(sum, 0.0);
  EXPECT_NEAR(model->grads_norm(), std::sqrt(sum), 1e-12 * std::sqrt(sum));
  model->grads_zero();
  EXPECT_EQ(model->grads_norm(), 0.0);
}

// Loss, gradients and the AdamW update are bit-identical for 1, 2 and 3 threads.
TEST(ModelGptFp32, DeterministicAcrossThreadCounts) {
  const ModelConfig c = test_config(0.1f);
  const auto pf = random_params(c, 700);
  const Batch batch = random_batch(3, 8, c.vocab_size, 701);
  std::vector<std::vector<float>> grads, params;
  std::vector<double> losses, norms;
  for (const int threads : {1, 2, 3}) {
    auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 3, .threads = threads});
    model->params_set(pf);
    model->grads_zero();
    losses.push_back(model->forward_backward(batch.windows, 3, 8, StepRng{11, 12}, 1.0f));
    norms.push_back(model->grads_norm());
    std::vector<float> g(pf.size()), p(pf.size());
    model->grads_get(g);
    model->adamw_step(AdamWConfig{.lr = 1e-3, .weight_decay = 0.1}, 1, 0.5f);
    model->params_get(p);
    grads.push_back(std::move(g));
    params.push_back(std::move(p));
  }
  for (size_t i = 1; i < losses.size(); ++i) {
    EXPECT_EQ(losses[i], losses[0]);
    EXPECT_EQ(norms[i], norms[0]);
    EXPECT_EQ(std::memcmp(grads[i].data(), grads[0].data(), grads[0].size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(params[i].data(), params[0].data(), params[0].size() * sizeof(float)), 0);
  }
}

// AdamW against the formula in double (torch.optim.AdamW: decoupled decay, bias
// correction), two steps, decay only on the ParamSpec::weight_decay tensors.
TEST(ModelGptFp32, AdamWMatchesFormula) {
  const ModelConfig c = test_config(0.0f);
  const ParamLayout layout(c);
  const auto pf = random_params(c, 800);
  const Batch batch = random_batch(2, 8, c.vocab_size, 801);
  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 2});
  model->params_set(pf);
  const AdamWConfig adam{.lr = 2e-3, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  const float grad_scale = 0.5f;
  const size_t n = pf.size();
  std::vector<double> p(pf.begin(), pf.end()), m(n, 0.0), v(n, 0.0), m_tol(n), v_tol(n);
  for (int64_t t = 1; t <= 2; ++t) {
    model->grads_zero();
    model->forward_backward(batch.windows, 2, 8, StepRng{}, 1.0f);
    std::vector<float> g(n);
    model->grads_get(g);
    for (const ParamSpec& s : layout.specs())
      for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
        const double gi = g[i] * static_cast<double>(grad_scale);
        if (s.weight_decay) p[i] *= 1.0 - adam.lr * adam.weight_decay;
        // fp32 rounds each term to ~1e-7; m's two terms may cancel, so the bound is
        // relative to their magnitudes, not to the result.
        m_tol[i] = 1e-6 * (adam.beta1 * std::abs(m[i]) + (1 - adam.beta1) * std::abs(gi)) + 1e-20;
        v_tol[i] = 1e-6 * (adam.beta2 * v[i] + (1 - adam.beta2) * gi * gi) + 1e-30;
        m[i] = adam.beta1 * m[i] + (1 - adam.beta1) * gi;
        v[i] = adam.beta2 * v[i] + (1 - adam.beta2) * gi * gi;
        const double mhat = m[i] / (1 - std::pow(adam.beta1, t)), vhat = v[i] / (1 - std::pow(adam.beta2, t));
        p[i] -= adam.lr * mhat / (std::sqrt(vhat) + adam.eps);
      }
    model->adamw_step(adam, t, grad_scale);
    std::vector<float> got(n), got_m(n), got_v(n);
    model->params_get(got);
    model->adam_state_get(got_m, got_v);
    // The update is lr-sized; fp32 keeps it to ~1e-7 of the parameter.
    for (size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(got[i], p[i], 1e-6 + 1e-6 * std::abs(p[i])) << "t " << t << " element " << i;
      ASSERT_NEAR(got_m[i], m[i], m_tol[i]) << i;
      ASSERT_NEAR(got_v[i], v[i], v_tol[i]) << i;
    }
    model->params_set(std::vector<float>(p.begin(), p.end()));  // continue from the exact values
    model->adam_state_set(std::vector<float>(m.begin(), m.end()), std::vector<float>(v.begin(), v.end()));
  }
  // The padding rows of wte never move.
  std::vector<float> got(n);
  model->params_get(got);
  const ParamSpec& wte = layout.specs()[0];
  for (int64_t i = c.vocab_size * c.d_model; i < wte.numel; ++i) ASSERT_EQ(got[wte.offset + i], 0.0f);
}

template <class F>
void expect_error(F&& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(ModelGptErrors, BadInputIsNamed) {
  const ModelConfig c = test_config(0.0f);
  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 2, .max_context = 6});
  const Batch ok = random_batch(2, 6, c.vocab_size, 900);
  expect_error([&] { model->forward_backward(ok.windows, 3, 6, StepRng{}, 1.0f); }, "batch 3 is outside [1, 2]");
  const Batch long_batch = random_batch(1, 7, c.vocab_size, 901);
  expect_error([&] { model->forward_backward(long_batch.windows, 1, 7, StepRng{}, 1.0f); },
               "sequence length 7 is outside [1, 6]");
  expect_error([&] { model->forward_backward(ok.windows, 2, 5, StepRng{}, 1.0f); }, "windows hold 14 ids");
  Batch bad = ok;
  bad.windows[9] = 70;
  expect_error([&] { model->forward_loss(bad.windows, 2, 6); }, "token id 70 at window 1, position 2");
  expect_error([&] { model->params_set(std::vector<float>(5)); }, "params_set: the buffer holds 5 floats");
  std::vector<float> logits(10);
  expect_error([&] { model->forward_logits(std::vector<TokenId>(12, 1), 2, 6, logits); }, "the output holds 10 floats");
  expect_error([&] { gpt_create_cpu(c, ModelOptions{.max_context = 9}); }, "max_context 9");
  expect_error([&] { model->adamw_step(AdamWConfig{}, 0, 1.0f); }, "1-based");
#if !FLASHGPT_WITH_CUDA
  expect_error([&] { gpt_create(Device::cuda, c, ModelOptions{}); }, "built without CUDA");
#endif
  EXPECT_EQ(gpt_create(Device::cpu, c, ModelOptions{})->device(), Device::cpu);
}

// A tiny model memorises one batch of random tokens. Targets are uniform over 256 ids,
// so the initial loss is about ln 256 = 5.5, and no predictor that ignores the context
// can go below the entropy of the batch's own target distribution (about 4.6 nats for
// 128 draws from 256 ids). A loss under 0.5 (the target gets ~60% probability on
// average) can only come from attending to the earlier tokens and positions, i.e. from
// a model whose forward and backward are both right.
TEST(ModelGptTraining, TinyModelOverfitsOneBatch) {
  ModelConfig c = model_preset("tiny", 256);
  c.dropout = 0.0f;
  c.context = 32;
  // One thread: ctest runs two tests at once on CI's two cores, and a team of threads that
  // shares its cores spends a tiny model's step waiting at barriers.
  auto model = gpt_create_cpu(c, ModelOptions{.max_batch = 4, .threads = 1});
  std::vector<float> p(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, 1, p);
  model->params_set(p);
  const Batch batch = random_batch(4, 32, c.vocab_size, 1000);
  const AdamWConfig adam{.lr = 3e-3};
  double first = 0.0, loss = 0.0;
  for (int64_t step = 1; step <= 100; ++step) {
    model->grads_zero();
    loss = model->forward_backward(batch.windows, 4, 32, StepRng{}, 1.0f);
    if (step == 1) first = loss;
    model->adamw_step(adam, step, 1.0f);
  }
  std::printf("tiny model, one batch of 4 x 32: loss %.4f -> %.4f in 100 steps\n", first, loss);
  EXPECT_NEAR(first, std::log(256.0), 0.2);
  EXPECT_LT(loss, 0.5) << "started at " << first;
}

}  // namespace
}  // namespace flashgpt::model

// The backend-independent half of model.h: presets, validation, the parameter layout and
// its counts, FLOPs, and the Philox initialisation.
#include "model/param_layout.h"

#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>

namespace flashgpt {
namespace {

template <class F>
void expect_error(F&& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, Presets) {
  EXPECT_EQ(model_padded_vocab(100277), 100352);
  EXPECT_EQ(model_padded_vocab(50257), 50304);
  EXPECT_EQ(model_padded_vocab(128), 128);
  EXPECT_EQ(model_padded_vocab(1), 128);
  const ModelConfig seed = model_preset("seed", 100277);
  EXPECT_EQ(seed.preset, "seed");
  EXPECT_EQ(seed.vocab_size, 100277);
  EXPECT_EQ(seed.padded_vocab_size, 100352);
  EXPECT_EQ(seed.context, 512);
  EXPECT_EQ(seed.d_model, 768);
  EXPECT_EQ(seed.n_layer, 12);
  EXPECT_EQ(seed.n_head, 12);
  EXPECT_EQ(seed.d_ff, 3072);
  EXPECT_FLOAT_EQ(seed.dropout, 0.1f);
  for (const auto& name : model_preset_names()) {
    const ModelConfig c = model_preset(name, 1000);
    EXPECT_NO_THROW(model_config_validate(c)) << name;
    EXPECT_EQ(c.preset, name);
  }
  EXPECT_EQ(model_preset("tiny", 1000).head_dim(), 32);
  EXPECT_EQ(model_preset("small", 1000).head_dim(), 64);
  expect_error([] { model_preset("huge", 1000); }, "unknown model preset 'huge' (choose one of: seed, small, tiny)");
  expect_error([] { model_preset("tiny", 0); }, "vocab_size must be positive");
}

TEST(ModelConfig, ValidationNamesTheProblem) {
  const ModelConfig ok = model_preset("tiny", 1000);
  auto with = [&](auto change) {
    ModelConfig c = ok;
    change(c);
    return c;
  };
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.padded_vocab_size = 1000; })); },
               "padded_vocab_size 1000 does not match vocab_size 1000");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.context = 0; })); }, "context must be");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.d_model = -64; })); },
               "d_model must be positive");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.n_layer = 0; })); },
               "n_layer must be positive");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.n_head = 0; })); }, "n_head must be positive");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.d_ff = 0; })); }, "d_ff must be positive");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.n_head = 3; })); },
               "d_model 64 is not a multiple of n_head 3");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.n_head = 4; })); },
               "head dim d_model / n_head = 64 / 4 = 16 is not supported");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.dropout = 1.0f; })); },
               "dropout must be in [0, 1), got 1");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.dropout = -0.1f; })); },
               "dropout must be in [0, 1)");
  expect_error([&] { model_config_validate(with([](ModelConfig& c) { c.dropout = NAN; })); },
               "dropout must be in [0, 1)");
}

TEST(ModelConfig, ParamSpecsArePackedInEnumOrder) {
  const ModelConfig c = model_preset("small", 1000);
  const auto specs = model_param_specs(c);
  ASSERT_EQ(specs.size(), static_cast<size_t>(kParamKinds));
  const char* names[kParamKinds] = {"wte",  "wpe",       "ln1_w", "ln1_b", "qkv_w", "qkv_b",     "attn_proj_w", "attn_proj_b",
                                    "ln2_w", "ln2_b", "fc_w",  "fc_b",  "fc_proj_w", "fc_proj_b", "lnf_w", "lnf_b"};
  const int64_t V = 1024, T = 256, C = 256, L = 4, F = 1024;
  const std::vector<std::vector<int64_t>> shapes = {{V, C}, {T, C},     {L, C}, {L, C}, {L, 3 * C, C}, {L, 3 * C},
                                                    {L, C, C}, {L, C}, {L, C}, {L, C}, {L, F, C},     {L, F},
                                                    {L, C, F}, {L, C}, {C},    {C}};
  int64_t offset = 0;
  for (int k = 0; k < kParamKinds; ++k) {
    const ParamSpec& s = specs[static_cast<size_t>(k)];
    EXPECT_EQ(static_cast<int>(s.kind), k);
    EXPECT_EQ(s.name, names[k]);
    EXPECT_EQ(s.shape, shapes[static_cast<size_t>(k)]) << s.name;
    EXPECT_EQ(s.offset, offset) << s.name;
    int64_t numel = 1;
    for (const int64_t d : s.shape) numel *= d;
    EXPECT_EQ(s.numel, numel) << s.name;
    const bool matrix = s.kind == ParamKind::wte || s.kind == ParamKind::wpe || s.kind == ParamKind::qkv_w ||
                        s.kind == ParamKind::attn_proj_w || s.kind == ParamKind::fc_w ||
                        s.kind == ParamKind::fc_proj_w;
    EXPECT_EQ(s.weight_decay, matrix) << s.name;
    offset += numel;
  }
  EXPECT_EQ(model_param_count(c), offset);
  // Layer l of a stacked kind sits l * (numel / L) floats after the kind's offset.
  const model::ParamLayout layout(c);
  EXPECT_EQ(layout.offset(ParamKind::fc_w, 3), specs[10].offset + 3 * F * C);
  EXPECT_EQ(layout.offset(ParamKind::lnf_b), specs[15].offset);
}

// GPT-2 small at context 1024: 124,439,808 parameters as the paper's count (unpadded
// 50257 vocabulary), 124,475,904 with the vocabulary padded to 50304 (llm.c's figure).
TEST(ModelConfig, CountsMatchGpt2Small) {
  ModelConfig c = model_preset("seed", 50257);
  c.context = 1024;
  EXPECT_EQ(model_param_count_unpadded(c), 124439808);
  EXPECT_EQ(model_param_count(c), 124475904);
  // 6 N without wpe, plus 12 L T C.
  const double n = 124439808.0 - 1024.0 * 768.0;
  EXPECT_DOUBLE_EQ(model_train_flops_per_token(c, 1024), 6.0 * n + 12.0 * 12 * 1024 * 768);
  EXPECT_DOUBLE_EQ(model_train_flops_per_token(c, 512), 6.0 * n + 12.0 * 12 * 512 * 768);
}

// GPT-2 initialisation: the statistics of each kind, constants exact, padding rows zero,
// and the same bits for any thread count; another seed gives other values, and a kind's
// values do not depend on the size of another (here: the vocabulary).
TEST(ModelInit, StatisticsAndDeterminism) {
  const ModelConfig c = model_preset("small", 1000);
  const auto specs = model_param_specs(c);
  std::vector<float> p(static_cast<size_t>(model_param_count(c)));
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  model_init_params(c, 42, p);
  for (const int threads : {2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> q(p.size());
    model_init_params(c, 42, q);
    EXPECT_EQ(std::memcmp(p.data(), q.data(), p.size() * sizeof(float)), 0) << threads << " threads";
  }
  omp_set_num_threads(saved);
  const double residual_std = 0.02 / std::sqrt(2.0 * c.n_layer);
  for (const ParamSpec& s : specs) {
    const float* x = p.data() + s.offset;
    const int64_t n = s.kind == ParamKind::wte ? c.vocab_size * c.d_model : s.numel;
    double expected_std = 0.0, constant = 0.0;
    switch (s.kind) {
      case ParamKind::wte:
      case ParamKind::wpe:
      case ParamKind::qkv_w:
      case ParamKind::fc_w: expected_std = 0.02; break;
      case ParamKind::attn_proj_w:
      case ParamKind::fc_proj_w: expected_std = residual_std; break;
      case ParamKind::ln1_w:
      case ParamKind::ln2_w:
      case ParamKind::lnf_w: constant = 1.0; break;
      default: break;
    }
    if (expected_std == 0.0) {
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(x[i], static_cast<float>(constant)) << s.name << " " << i;
      continue;
    }
    double sum = 0.0, sum2 = 0.0, sum4 = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      sum += x[i];
      sum2 += static_cast<double>(x[i]) * x[i];
      sum4 += std::pow(static_cast<double>(x[i]) / expected_std, 4);
    }
    const double mean = sum / n, stddev = std::sqrt(sum2 / n - mean * mean);
    // mean: standard error std / sqrt(n); std: standard error about std / sqrt(2 n).
    EXPECT_NEAR(mean, 0.0, 6 * expected_std / std::sqrt(static_cast<double>(n))) << s.name;
    EXPECT_NEAR(stddev, expected_std, 6 * expected_std / std::sqrt(2.0 * n)) << s.name;
    EXPECT_NEAR(sum4 / n, 3.0, 0.1) << s.name << ": the fourth moment of a normal is 3";
  }
  const ParamSpec& wte = specs[0];
  for (int64_t i = c.vocab_size * c.d_model; i < wte.numel; ++i) ASSERT_EQ(p[wte.offset + i], 0.0f);

  std::vector<float> other(p.size());
  model_init_params(c, 43, other);
  EXPECT_NE(other[specs[4].offset], p[specs[4].offset]);
  const ModelConfig c2 = model_preset("small", 5000);
  const auto specs2 = model_param_specs(c2);
  std::vector<float> p2(static_cast<size_t>(model_param_count(c2)));
  model_init_params(c2, 42, p2);
  EXPECT_EQ(std::memcmp(p.data() + specs[4].offset, p2.data() + specs2[4].offset, specs[4].numel * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(p.data(), p2.data(), 1000 * c.d_model * sizeof(float)), 0) << "wte's first rows";

  expect_error([&] { model_init_params(c, 1, std::span<float>(p.data(), p.size() - 1)); },
               "model_init_params: the buffer holds");
}

}  // namespace
}  // namespace flashgpt

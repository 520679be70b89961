// The model's configuration, presets, parameter layout, counts and initialisation: the
// backend-independent half of model.h.
#include <flashgpt/attention.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>
#include <flashgpt/philox.h>
#include <fmt/ranges.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace flashgpt {

int64_t model_padded_vocab(int64_t vocab_size) {
  return (vocab_size + kVocabPadMultiple - 1) / kVocabPadMultiple * kVocabPadMultiple;
}

namespace {

struct Preset {
  const char* name;
  int64_t context, d_model, n_layer, n_head, d_ff;
  float dropout;
};

// Head dims: seed 64, small 64, tiny 32 (all supported by the CPU and CUDA attention).
constexpr Preset kPresets[] = {
    {"seed", 512, 768, 12, 12, 3072, 0.1f},
    {"small", 256, 256, 4, 4, 1024, 0.1f},
    {"tiny", 64, 64, 2, 2, 256, 0.1f},
};

bool head_dim_supported(int64_t d) {
  return std::find(kAttentionHeadDims.begin(), kAttentionHeadDims.end(), d) != kAttentionHeadDims.end();
}

}  // namespace

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  return names;
}

ModelConfig model_preset(std::string_view name, int64_t vocab_size) {
  for (const auto& p : kPresets) {
    if (name != p.name) continue;
    ModelConfig c;
    c.preset = p.name;
    c.vocab_size = vocab_size;
    c.padded_vocab_size = model_padded_vocab(vocab_size);
    c.context = p.context;
    c.d_model = p.d_model;
    c.n_layer = p.n_layer;
    c.n_head = p.n_head;
    c.d_ff = p.d_ff;
    c.dropout = p.dropout;
    model_config_validate(c);
    return c;
  }
  FLASHGPT_FAIL("unknown model preset '{}' (choose one of: {})", name, fmt::join(model_preset_names(), ", "));
}

void model_config_validate(const ModelConfig& c) {
  FLASHGPT_CHECK(c.vocab_size > 0, "model config: vocab_size must be positive, got {}", c.vocab_size);
  // Token ids are uint32 and the attention kernels index rows with int.
  FLASHGPT_CHECK(c.vocab_size < (int64_t{1} << 31), "model config: vocab_size {} is too large (at most 2^31 - 1)",
                 c.vocab_size);
  FLASHGPT_CHECK(c.padded_vocab_size == model_padded_vocab(c.vocab_size),
                 "model config: padded_vocab_size {} does not match vocab_size {} rounded up to a multiple of {} "
                 "(expected {})",
                 c.padded_vocab_size, c.vocab_size, kVocabPadMultiple, model_padded_vocab(c.vocab_size));
  FLASHGPT_CHECK(c.context > 0 && c.context < (int64_t{1} << 30), "model config: context must be in [1, 2^30), got {}",
                 c.context);
  FLASHGPT_CHECK(c.d_model > 0, "model config: d_model must be positive, got {}", c.d_model);
  FLASHGPT_CHECK(c.n_layer > 0, "model config: n_layer must be positive, got {}", c.n_layer);
  FLASHGPT_CHECK(c.n_head > 0, "model config: n_head must be positive, got {}", c.n_head);
  FLASHGPT_CHECK(c.d_ff > 0, "model config: d_ff must be positive, got {}", c.d_ff);
  FLASHGPT_CHECK(c.d_model % c.n_head == 0, "model config: d_model {} is not a multiple of n_head {}", c.d_model,
                 c.n_head);
  FLASHGPT_CHECK(head_dim_supported(c.head_dim()),
                 "model config: head dim d_model / n_head = {} / {} = {} is not supported by the attention kernels "
                 "(supported: {})",
                 c.d_model, c.n_head, c.head_dim(), fmt::join(kAttentionHeadDims, ", "));
  FLASHGPT_CHECK(std::isfinite(c.dropout) && c.dropout >= 0.0f && c.dropout < 1.0f,
                 "model config: dropout must be in [0, 1), got {}", c.dropout);
}

std::vector<ParamSpec> model_param_specs(const ModelConfig& c) {
  const int64_t V = c.padded_vocab_size, T = c.context, C = c.d_model, L = c.n_layer, F = c.d_ff;
  struct Entry {
    ParamKind kind;
    const char* name;
    std::vector<int64_t> shape;
    bool decay;
  };
  const Entry entries[kParamKinds] = {
      {ParamKind::wte, "wte", {V, C}, true},
      {ParamKind::wpe, "wpe", {T, C}, true},
      {ParamKind::ln1_w, "ln1_w", {L, C}, false},
      {ParamKind::ln1_b, "ln1_b", {L, C}, false},
      {ParamKind::qkv_w, "qkv_w", {L, 3 * C, C}, true},
      {ParamKind::qkv_b, "qkv_b", {L, 3 * C}, false},
      {ParamKind::attn_proj_w, "attn_proj_w", {L, C, C}, true},
      {ParamKind::attn_proj_b, "attn_proj_b", {L, C}, false},
      {ParamKind::ln2_w, "ln2_w", {L, C}, false},
      {ParamKind::ln2_b, "ln2_b", {L, C}, false},
      {ParamKind::fc_w, "fc_w", {L, F, C}, true},
      {ParamKind::fc_b, "fc_b", {L, F}, false},
      {ParamKind::fc_proj_w, "fc_proj_w", {L, C, F}, true},
      {ParamKind::fc_proj_b, "fc_proj_b", {L, C}, false},
      {ParamKind::lnf_w, "lnf_w", {C}, false},
      {ParamKind::lnf_b, "lnf_b", {C}, false},
  };
  std::vector<ParamSpec> specs;
  specs.reserve(kParamKinds);
  int64_t offset = 0;
  for (const auto& e : entries) {
    ParamSpec s;
    s.kind = e.kind;
    s.name = e.name;
    s.shape = e.shape;
    s.numel = 1;
    for (const int64_t d : e.shape) s.numel *= d;
    s.offset = offset;
    s.weight_decay = e.decay;
    offset += s.numel;
    specs.push_back(std::move(s));
  }
  return specs;
}

int64_t model_param_count(const ModelConfig& c) {
  const auto specs = model_param_specs(c);
  return specs.back().offset + specs.back().numel;
}

int64_t model_param_count_unpadded(const ModelConfig& c) {
  return model_param_count(c) - (c.padded_vocab_size - c.vocab_size) * c.d_model;
}

double model_train_flops_per_token(const ModelConfig& c, int64_t context) {
  const double n = static_cast<double>(model_param_count_unpadded(c) - c.context * c.d_model);
  return 6.0 * n + 12.0 * static_cast<double>(c.n_layer) * static_cast<double>(context) * static_cast<double>(c.d_model);
}

namespace {

// Element j of a normally initialised tensor of kind k: a standard normal by Box-Muller
// from the Philox call with counter {j / 2 (low, high words), k, 0} under the key (seed
// low, seed high); even j takes words (x, y), odd j (z, w), as u1 = (a + 0.5) / 2^32 and
// u2 = (b + 0.5) / 2^32 in (0, 1), z = sqrt(-2 ln u1) cos(2 pi u2), in double. The value of
// an element depends only on (seed, kind, j): not on the thread count, the backend, or the
// sizes of the other tensors.
double init_standard_normal(uint64_t seed, int kind, int64_t j) {
  const uint64_t pair = static_cast<uint64_t>(j) >> 1;
  const Philox4x32 r = philox4x32_10(
      {static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), static_cast<uint32_t>(kind), 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t a = (j & 1) ? r.z : r.x, b = (j & 1) ? r.w : r.y;
  constexpr double kInv2p32 = 1.0 / 4294967296.0;
  const double u1 = (static_cast<double>(a) + 0.5) * kInv2p32, u2 = (static_cast<double>(b) + 0.5) * kInv2p32;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

}  // namespace

void model_init_params(const ModelConfig& c, uint64_t seed, std::span<float> params) {
  model_config_validate(c);
  const auto specs = model_param_specs(c);
  const int64_t total = specs.back().offset + specs.back().numel;
  FLASHGPT_CHECK(static_cast<int64_t>(params.size()) == total,
                 "model_init_params: the buffer holds {} floats but the model has {} parameters", params.size(), total);
  const double std_weight = 0.02;
  const double std_residual = 0.02 / std::sqrt(2.0 * static_cast<double>(c.n_layer));
  for (const auto& s : specs) {
    float* p = params.data() + s.offset;
    const int kind = static_cast<int>(s.kind);
    double stddev = 0.0;  // 0: a constant
    float constant = 0.0f;
    switch (s.kind) {
      case ParamKind::wte:
      case ParamKind::wpe:
      case ParamKind::qkv_w:
      case ParamKind::fc_w: stddev = std_weight; break;
      case ParamKind::attn_proj_w:
      case ParamKind::fc_proj_w: stddev = std_residual; break;
      case ParamKind::ln1_w:
      case ParamKind::ln2_w:
      case ParamKind::lnf_w: constant = 1.0f; break;
      default: constant = 0.0f; break;
    }
    // wte's padding rows (V <= v < Vp) stay 0: they are never predicted nor looked up.
    const int64_t n = s.kind == ParamKind::wte ? c.vocab_size * c.d_model : s.numel;
    if (stddev > 0.0) {
#pragma omp parallel for schedule(static) if(parallel : model::parallel_worth(n))
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<float>(stddev * init_standard_normal(seed, kind, j));
    } else {
      for (int64_t j = 0; j < n; ++j) p[j] = constant;
    }
    for (int64_t j = n; j < s.numel; ++j) p[j] = 0.0f;
  }
}

GptModel::FlatBuffers GptModel::flat_buffers() {
  FLASHGPT_FAIL("this model backend does not expose its parameter and gradient buffers: it cannot be trained on "
                "several ranks");
}

void GptModel::adam_state_shard(int64_t begin, int64_t end) {
  FLASHGPT_CHECK(begin == 0 && end == model_param_count(config()),
                 "this model backend keeps the AdamW moments of all {} parameters: it cannot keep [{}, {}) alone "
                 "(ZeRO-1's memory saving)", model_param_count(config()), begin, end);
}

GptModel::MemoryReport GptModel::memory_report() const {
  FLASHGPT_FAIL("this model backend does not report its memory");
}

void GptModel::adamw_step_range(const AdamWConfig&, int64_t, float, int64_t, int64_t) {
  FLASHGPT_FAIL("this model backend cannot update a range of its parameters: no ZeRO-1 optimizer sharding");
}

}  // namespace flashgpt

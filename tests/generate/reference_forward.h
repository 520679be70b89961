// A plain-loop, double-accumulating forward of model.h's GPT over the flat parameter
// buffer, with no cache: the logits of every position of one sequence, recomputed from
// scratch. Obviously right and slow; the generate tests check the cached engine against it
// (and, independently, against the CPU backend's GptModel::forward_logits).
#pragma once

#include <flashgpt/model.h>

#include <cmath>
#include <span>
#include <vector>

namespace flashgpt::testing {

// logits: (T, V) for tokens (T).
inline std::vector<double> reference_logits(const ModelConfig& cfg, std::span<const float> params,
                                            std::span<const TokenId> tokens) {
  const int64_t T = static_cast<int64_t>(tokens.size()), C = cfg.d_model, F = cfg.d_ff, V = cfg.vocab_size;
  const int64_t NH = cfg.n_head, HD = cfg.head_dim();
  std::vector<int64_t> off(kParamKinds);
  for (const ParamSpec& s : model_param_specs(cfg)) off[static_cast<int>(s.kind)] = s.offset;
  auto P = [&](ParamKind k) { return params.data() + off[static_cast<int>(k)]; };
  auto layernorm = [&](const std::vector<double>& x, const float* w, const float* b) {
    std::vector<double> y(x.size());
    for (int64_t t = 0; t < T; ++t) {
      double mean = 0, var = 0;
      for (int64_t c = 0; c < C; ++c) mean += x[t * C + c];
      mean /= C;
      for (int64_t c = 0; c < C; ++c) var += (x[t * C + c] - mean) * (x[t * C + c] - mean);
      const double rstd = 1.0 / std::sqrt(var / C + kLayerNormEps);
      for (int64_t c = 0; c < C; ++c) y[t * C + c] = (x[t * C + c] - mean) * rstd * w[c] + b[c];
    }
    return y;
  };
  auto linear = [&](const std::vector<double>& x, int64_t in, const float* w, const float* b, int64_t out) {
    std::vector<double> y(static_cast<size_t>(T * out));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t o = 0; o < out; ++o) {
        double acc = b ? b[o] : 0.0;
        for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * w[o * in + i];
        y[t * out + o] = acc;
      }
    }
    return y;
  };
  std::vector<double> x(static_cast<size_t>(T * C));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < C; ++c) x[t * C + c] = double{P(ParamKind::wte)[tokens[t] * C + c]} + P(ParamKind::wpe)[t * C + c];
  }
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    auto h = layernorm(x, P(ParamKind::ln1_w) + l * C, P(ParamKind::ln1_b) + l * C);
    auto qkv = linear(h, C, P(ParamKind::qkv_w) + l * 3 * C * C, P(ParamKind::qkv_b) + l * 3 * C, 3 * C);
    std::vector<double> att(static_cast<size_t>(T * C));
    for (int64_t hd = 0; hd < NH; ++hd) {
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(static_cast<size_t>(i + 1));
        double m = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < HD; ++d) dot += qkv[i * 3 * C + hd * HD + d] * qkv[j * 3 * C + C + hd * HD + d];
          s[j] = dot / std::sqrt(double(HD));
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - m));
        for (int64_t d = 0; d < HD; ++d) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += s[j] * qkv[j * 3 * C + 2 * C + hd * HD + d];
          att[i * C + hd * HD + d] = acc / sum;
        }
      }
    }
    auto proj = linear(att, C, P(ParamKind::attn_proj_w) + l * C * C, P(ParamKind::attn_proj_b) + l * C, C);
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    h = layernorm(x, P(ParamKind::ln2_w) + l * C, P(ParamKind::ln2_b) + l * C);
    auto ff = linear(h, C, P(ParamKind::fc_w) + l * F * C, P(ParamKind::fc_b) + l * F, F);
    for (auto& v : ff) v = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    auto down = linear(ff, F, P(ParamKind::fc_proj_w) + l * C * F, P(ParamKind::fc_proj_b) + l * C, C);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  auto h = layernorm(x, P(ParamKind::lnf_w), P(ParamKind::lnf_b));
  return linear(h, C, P(ParamKind::wte), nullptr, V);
}

}  // namespace flashgpt::testing

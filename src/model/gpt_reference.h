// The whole model as a chain of the plain-loop reference layers (layers_reference.h),
// templated on the scalar type: in double it is what the tests differentiate by finite
// differences and what the fp32 backend's loss, logits and gradients are compared with,
// dropout included (the same Philox masks, model.h). Allocates freely; tests only.
#pragma once

#include "layers_reference.h"
#include "param_layout.h"

#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <vector>

namespace flashgpt::model::reference {

// The attention stream of layer l (model.h).
inline DropoutRng attention_dropout_rng(StepRng rng, int64_t n_layer, int64_t layer) {
  return DropoutRng{rng.seed ^ 0x5bd1e995u, rng.step * static_cast<uint64_t>(n_layer) + static_cast<uint64_t>(layer)};
}

// Returns the mean cross-entropy of targets (B, T) given inputs (B, T). With grads
// non-null adds the gradient of mean_loss * loss_scale into grads (model_param_count).
// With logits non-null writes (B, T, V) logits. `dropout` false runs without dropout.
template <class S>
S gpt_forward_backward(const ModelConfig& cfg, const S* params, S* grads, const int32_t* inputs,
                       const int32_t* targets, int64_t B, int64_t T, StepRng rng, bool dropout, S loss_scale,
                       S* logits = nullptr) {
  const ParamLayout layout(cfg);
  const int64_t C = cfg.d_model, L = cfg.n_layer, NH = cfg.n_head, F = cfg.d_ff, V = cfg.vocab_size;
  const int64_t N = B * T;
  auto p = [&](ParamKind k, int64_t l = 0) { return layout.at(params, k, l); };
  auto g = [&](ParamKind k, int64_t l = 0) { return grads + (p(k, l) - params); };
  const uint32_t threshold = dropout ? dropout_threshold(cfg.dropout) : 0u;
  const float attn_dropout = dropout ? cfg.dropout : 0.0f;
  const DropoutRng site_rng{rng.seed, rng.step};
  using Vec = std::vector<S>;
  auto vec = [](int64_t n) { return Vec(static_cast<size_t>(n), S(0)); };

  // Forward; res[l] is the residual stream entering layer l (B, T, C).
  std::vector<Vec> res(static_cast<size_t>(L + 1)), res2(L), ln1(L), qkv(L), att(L), ln2(L), fch(L), fcg(L);
  res[0] = vec(N * C);
  encoder_forward<S>(res[0].data(), inputs, p(ParamKind::wte), p(ParamKind::wpe), B, T, C);
  {
    Vec x = res[0];
    residual_dropout_forward<S>(res[0].data(), nullptr, x.data(), N, C, site_rng, 0, threshold);
  }
  for (int64_t l = 0; l < L; ++l) {
    ln1[l] = vec(N * C);
    layernorm_forward<S>(ln1[l].data(), res[l].data(), p(ParamKind::ln1_w, l), p(ParamKind::ln1_b, l), N, C);
    qkv[l] = vec(N * 3 * C);
    matmul_forward<S>(qkv[l].data(), ln1[l].data(), p(ParamKind::qkv_w, l), p(ParamKind::qkv_b, l), N, C, 3 * C);
    att[l] = vec(N * C);
    attention_forward<S>(att[l].data(), qkv[l].data(), B, T, C, NH, attn_dropout, attention_dropout_rng(rng, L, l));
    Vec proj = vec(N * C);
    matmul_forward<S>(proj.data(), att[l].data(), p(ParamKind::attn_proj_w, l), p(ParamKind::attn_proj_b, l), N, C, C);
    res2[l] = vec(N * C);
    residual_dropout_forward<S>(res2[l].data(), res[l].data(), proj.data(), N, C, site_rng, 1 + 2 * l, threshold);
    ln2[l] = vec(N * C);
    layernorm_forward<S>(ln2[l].data(), res2[l].data(), p(ParamKind::ln2_w, l), p(ParamKind::ln2_b, l), N, C);
    fch[l] = vec(N * F);
    matmul_forward<S>(fch[l].data(), ln2[l].data(), p(ParamKind::fc_w, l), p(ParamKind::fc_b, l), N, C, F);
    fcg[l] = vec(N * F);
    gelu_forward<S>(fcg[l].data(), fch[l].data(), N * F);
    Vec fp = vec(N * C);
    matmul_forward<S>(fp.data(), fcg[l].data(), p(ParamKind::fc_proj_w, l), p(ParamKind::fc_proj_b, l), N, F, C);
    res[l + 1] = vec(N * C);
    residual_dropout_forward<S>(res[l + 1].data(), res2[l].data(), fp.data(), N, C, site_rng, 2 + 2 * l, threshold);
  }
  Vec lnf = vec(N * C);
  layernorm_forward<S>(lnf.data(), res[L].data(), p(ParamKind::lnf_w), p(ParamKind::lnf_b), N, C);
  if (logits != nullptr) classifier_logits<S>(logits, lnf.data(), p(ParamKind::wte), N, C, V);
  if (grads == nullptr) {
    return classifier_forward_backward<S>(nullptr, nullptr, lnf.data(), p(ParamKind::wte), targets, N, C, V, S(0)) /
           static_cast<S>(N);
  }

  // Backward.
  Vec dlnf = vec(N * C), dres = vec(N * C);
  const S loss = classifier_forward_backward<S>(dlnf.data(), g(ParamKind::wte), lnf.data(), p(ParamKind::wte), targets,
                                                N, C, V, loss_scale / static_cast<S>(N)) /
                 static_cast<S>(N);
  layernorm_backward<S>(dres.data(), g(ParamKind::lnf_w), g(ParamKind::lnf_b), dlnf.data(), res[L].data(),
                        p(ParamKind::lnf_w), N, C);
  for (int64_t l = L - 1; l >= 0; --l) {
    Vec dfp = vec(N * C), dfcg = vec(N * F), dfch = vec(N * F), dln2 = vec(N * C);
    dropout_backward<S>(dfp.data(), dres.data(), N, C, site_rng, 2 + 2 * l, threshold);
    matmul_backward<S>(dfcg.data(), g(ParamKind::fc_proj_w, l), g(ParamKind::fc_proj_b, l), dfp.data(),
                       fcg[l].data(), p(ParamKind::fc_proj_w, l), N, F, C);
    gelu_backward<S>(dfch.data(), fch[l].data(), dfcg.data(), N * F);
    matmul_backward<S>(dln2.data(), g(ParamKind::fc_w, l), g(ParamKind::fc_b, l), dfch.data(), ln2[l].data(),
                       p(ParamKind::fc_w, l), N, C, F);
    layernorm_backward<S>(dres.data(), g(ParamKind::ln2_w, l), g(ParamKind::ln2_b, l), dln2.data(), res2[l].data(),
                          p(ParamKind::ln2_w, l), N, C);
    Vec dproj = vec(N * C), datt = vec(N * C), dqkv = vec(N * 3 * C), dln1 = vec(N * C);
    dropout_backward<S>(dproj.data(), dres.data(), N, C, site_rng, 1 + 2 * l, threshold);
    matmul_backward<S>(datt.data(), g(ParamKind::attn_proj_w, l), g(ParamKind::attn_proj_b, l), dproj.data(),
                       att[l].data(), p(ParamKind::attn_proj_w, l), N, C, C);
    attention_backward<S>(dqkv.data(), datt.data(), qkv[l].data(), B, T, C, NH, attn_dropout,
                          attention_dropout_rng(rng, L, l));
    matmul_backward<S>(dln1.data(), g(ParamKind::qkv_w, l), g(ParamKind::qkv_b, l), dqkv.data(), ln1[l].data(),
                       p(ParamKind::qkv_w, l), N, C, 3 * C);
    layernorm_backward<S>(dres.data(), g(ParamKind::ln1_w, l), g(ParamKind::ln1_b, l), dln1.data(), res[l].data(),
                          p(ParamKind::ln1_w, l), N, C);
  }
  Vec dx0 = vec(N * C);
  dropout_backward<S>(dx0.data(), dres.data(), N, C, site_rng, 0, threshold);
  encoder_backward<S>(g(ParamKind::wte), g(ParamKind::wpe), dx0.data(), inputs, B, T, C);
  return loss;
}

}  // namespace flashgpt::model::reference

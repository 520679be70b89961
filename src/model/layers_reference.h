// Plain-loop references of the GPT layers (layers_cpu.h), templated on the scalar type:
// in double they are the ground truth the fp32 layers are tested against and the
// functions the tests differentiate by central finite differences. No OpenMP, no BLAS,
// no tiling; the attention materialises P. Same shapes and dropout conventions as
// layers_cpu.h, except that every output of a backward here accumulates ("+="), so a
// test zeroes the gradients first.
#pragma once

#include <flashgpt/model.h>
#include <flashgpt/philox.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace flashgpt::model::reference {

template <class S>
void encoder_forward(S* out, const int32_t* tokens, const S* wte, const S* wpe, int64_t B, int64_t T, int64_t C) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        out[(b * T + t) * C + c] = wte[tokens[b * T + t] * C + c] + wpe[t * C + c];
}

template <class S>
void encoder_backward(S* dwte, S* dwpe, const S* dout, const int32_t* tokens, int64_t B, int64_t T, int64_t C) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        dwte[tokens[b * T + t] * C + c] += dout[(b * T + t) * C + c];
        dwpe[t * C + c] += dout[(b * T + t) * C + c];
      }
}

template <class S>
void layernorm_forward(S* out, const S* inp, const S* w, const S* b, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const S* x = inp + n * C;
    S mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += x[c];
    mean /= static_cast<S>(C);
    for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
    var /= static_cast<S>(C);
    const S rstd = S(1) / std::sqrt(var + static_cast<S>(kLayerNormEps));
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = (x[c] - mean) * rstd * w[c] + b[c];
  }
}

template <class S>
void layernorm_backward(S* dinp, S* dw, S* db, const S* dout, const S* inp, const S* w, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const S* x = inp + n * C;
    const S* g = dout + n * C;
    S mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += x[c];
    mean /= static_cast<S>(C);
    for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
    var /= static_cast<S>(C);
    const S rstd = S(1) / std::sqrt(var + static_cast<S>(kLayerNormEps));
    S mean_dnorm = 0, mean_dnorm_norm = 0;
    for (int64_t c = 0; c < C; ++c) {
      mean_dnorm += g[c] * w[c];
      mean_dnorm_norm += g[c] * w[c] * (x[c] - mean) * rstd;
    }
    mean_dnorm /= static_cast<S>(C);
    mean_dnorm_norm /= static_cast<S>(C);
    for (int64_t c = 0; c < C; ++c) {
      const S norm = (x[c] - mean) * rstd;
      dinp[n * C + c] += rstd * (g[c] * w[c] - mean_dnorm - norm * mean_dnorm_norm);
      dw[c] += g[c] * norm;
      db[c] += g[c];
    }
  }
}

template <class S>
void matmul_forward(S* out, const S* inp, const S* w, const S* b, int64_t N, int64_t IC, int64_t OC) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      S acc = b != nullptr ? b[o] : S(0);
      for (int64_t i = 0; i < IC; ++i) acc += inp[n * IC + i] * w[o * IC + i];
      out[n * OC + o] = acc;
    }
}

template <class S>
void matmul_backward(S* dinp, S* dw, S* db, const S* dout, const S* inp, const S* w, int64_t N, int64_t IC,
                     int64_t OC) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      const S g = dout[n * OC + o];
      for (int64_t i = 0; i < IC; ++i) {
        dinp[n * IC + i] += g * w[o * IC + i];
        dw[o * IC + i] += g * inp[n * IC + i];
      }
      if (db != nullptr) db[o] += g;
    }
}

template <class S>
S gelu(S x) {
  const S k = std::sqrt(S(2) / S(3.14159265358979323846));
  return S(0.5) * x * (S(1) + std::tanh(k * (x + S(0.044715) * x * x * x)));
}

template <class S>
void gelu_forward(S* out, const S* inp, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu(inp[i]);
}

template <class S>
void gelu_backward(S* dinp, const S* inp, const S* dout, int64_t n) {
  const S k = std::sqrt(S(2) / S(3.14159265358979323846));
  for (int64_t i = 0; i < n; ++i) {
    const S x = inp[i];
    const S th = std::tanh(k * (x + S(0.044715) * x * x * x));
    dinp[i] += dout[i] * (S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th * th) * k * (S(1) + S(3) * S(0.044715) * x * x));
  }
}

// The multiplier of element (n, c) at a dropout site: 0 or dropout_keep_scale.
template <class S>
S dropout_factor(DropoutRng rng, int64_t site, int64_t n, int64_t c, uint32_t threshold) {
  if (!dropout_enabled(threshold)) return S(1);
  return dropout_keep(rng, site, n, c, threshold) ? static_cast<S>(dropout_keep_scale(threshold)) : S(0);
}

// out = x + dropout(y); x null: out = dropout(y).
template <class S>
void residual_dropout_forward(S* out, const S* x, const S* y, int64_t N, int64_t C, DropoutRng rng, int64_t site,
                              uint32_t threshold) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      out[n * C + c] = (x != nullptr ? x[n * C + c] : S(0)) + dropout_factor<S>(rng, site, n, c, threshold) * y[n * C + c];
}

// dy += dout * factor (the x branch's gradient is dout itself).
template <class S>
void dropout_backward(S* dy, const S* dout, int64_t N, int64_t C, DropoutRng rng, int64_t site, uint32_t threshold) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) dy[n * C + c] += dropout_factor<S>(rng, site, n, c, threshold) * dout[n * C + c];
}

// Causal attention over qkv (B, T, 3C), P materialised per row, dropout on P with the
// attention stream: element (i, j) of head h of sequence b is kept when
// dropout_keep(rng, b NH + h, i, j, threshold).
template <class S>
void attention_forward(S* out, const S* qkv, int64_t B, int64_t T, int64_t C, int64_t NH, float dropout,
                       DropoutRng rng) {
  const int64_t HD = C / NH;
  const uint32_t threshold = dropout_threshold(dropout);
  const S scale = S(1) / std::sqrt(static_cast<S>(HD));
  std::vector<S> p(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const S* q = qkv + (b * T + i) * 3 * C + h * HD;
        S max = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const S* k = qkv + (b * T + j) * 3 * C + C + h * HD;
          S s = 0;
          for (int64_t d = 0; d < HD; ++d) s += q[d] * k[d];
          p[j] = s * scale;
          max = std::max(max, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - max));
        S* o = out + (b * T + i) * C + h * HD;
        for (int64_t d = 0; d < HD; ++d) o[d] = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const S pd = p[j] / sum * dropout_factor<S>(rng, b * NH + h, i, j, threshold);
          const S* v = qkv + (b * T + j) * 3 * C + 2 * C + h * HD;
          for (int64_t d = 0; d < HD; ++d) o[d] += pd * v[d];
        }
      }
}

template <class S>
void attention_backward(S* dqkv, const S* dout, const S* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                        float dropout, DropoutRng rng) {
  const int64_t HD = C / NH;
  const uint32_t threshold = dropout_threshold(dropout);
  const S scale = S(1) / std::sqrt(static_cast<S>(HD));
  std::vector<S> p(static_cast<size_t>(T)), dp(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const S* q = qkv + (b * T + i) * 3 * C + h * HD;
        const S* g = dout + (b * T + i) * C + h * HD;
        S max = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const S* k = qkv + (b * T + j) * 3 * C + C + h * HD;
          S s = 0;
          for (int64_t d = 0; d < HD; ++d) s += q[d] * k[d];
          p[j] = s * scale;
          max = std::max(max, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - max));
        S dot = 0;  // sum_j P_ij dP_ij
        for (int64_t j = 0; j <= i; ++j) {
          p[j] /= sum;
          const S factor = dropout_factor<S>(rng, b * NH + h, i, j, threshold);
          const S* v = qkv + (b * T + j) * 3 * C + 2 * C + h * HD;
          S* dv = dqkv + (b * T + j) * 3 * C + 2 * C + h * HD;
          S dpd = 0;
          for (int64_t d = 0; d < HD; ++d) {
            dpd += g[d] * v[d];
            dv[d] += p[j] * factor * g[d];
          }
          dp[j] = dpd * factor;
          dot += p[j] * dp[j];
        }
        S* dq = dqkv + (b * T + i) * 3 * C + h * HD;
        for (int64_t j = 0; j <= i; ++j) {
          const S ds = p[j] * (dp[j] - dot) * scale;
          const S* k = qkv + (b * T + j) * 3 * C + C + h * HD;
          S* dk = dqkv + (b * T + j) * 3 * C + C + h * HD;
          for (int64_t d = 0; d < HD; ++d) {
            dq[d] += ds * k[d];
            dk[d] += ds * q[d];
          }
        }
      }
}

// Logits of the first V rows of wte: logits (N, V) = inp (N, C) wte[0:V]^T.
template <class S>
void classifier_logits(S* logits, const S* inp, const S* wte, int64_t N, int64_t C, int64_t V) {
  matmul_forward<S>(logits, inp, wte, nullptr, N, C, V);
}

// Returns sum_n loss_n; with dinp non-null adds the gradient of dloss * sum_n loss_n to
// dinp (N, C) and dwte (Vp, C).
template <class S>
S classifier_forward_backward(S* dinp, S* dwte, const S* inp, const S* wte, const int32_t* targets, int64_t N,
                              int64_t C, int64_t V, S dloss) {
  std::vector<S> logits(static_cast<size_t>(N * V));
  classifier_logits<S>(logits.data(), inp, wte, N, C, V);
  S total = 0;
  for (int64_t n = 0; n < N; ++n) {
    S* row = logits.data() + n * V;
    S max = row[0], sum = 0;
    for (int64_t v = 0; v < V; ++v) max = std::max(max, row[v]);
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - max);
    const S lse = max + std::log(sum);
    total += lse - row[targets[n]];
    if (dinp == nullptr) continue;
    for (int64_t v = 0; v < V; ++v) {
      const S g = (std::exp(row[v] - lse) - (v == targets[n] ? S(1) : S(0))) * dloss;
      for (int64_t c = 0; c < C; ++c) {
        dinp[n * C + c] += g * wte[v * C + c];
        dwte[v * C + c] += g * inp[n * C + c];
      }
    }
  }
  return total;
}

}  // namespace flashgpt::model::reference

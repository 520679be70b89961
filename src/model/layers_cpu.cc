// The fp32 CPU layers (layers_cpu.h).
#include "layers_cpu.h"

#include "gemm_cpu.h"
#include "parallel.h"
#include "rows_cpu.h"

#include <flashgpt/attention_cpu.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace flashgpt::model {

namespace {

// Reductions over rows (parameter gradients) run one task per block of channels, each
// summing its rows in row order: no atomics, no per-thread copies, and the same sums for
// every thread count. 16 floats is one cache line.
constexpr int64_t kChannelBlock = 16;

int64_t channel_blocks(int64_t C) { return (C + kChannelBlock - 1) / kChannelBlock; }

}  // namespace

void encoder_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                     int64_t C) {
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(B * T * C))
  for (int64_t n = 0; n < B * T; ++n) {
    const float* e = wte + static_cast<int64_t>(tokens[n]) * C;  // (C)
    const float* p = wpe + (n % T) * C;                          // (C)
    float* o = out + n * C;                                      // (C)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = e[c] + p[c];
  }
}

void encoder_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B, int64_t T,
                      int64_t C) {
  // dwte: the same token may appear in many rows, so rows are summed in order per channel block.
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(B * T * C))
  for (int64_t blk = 0; blk < channel_blocks(C); ++blk) {
    const int64_t c0 = blk * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
    for (int64_t n = 0; n < B * T; ++n) {
      float* d = dwte + static_cast<int64_t>(tokens[n]) * C;
      const float* g = dout + n * C;
      for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
    }
  }
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(B * T * C))
  for (int64_t t = 0; t < T; ++t) {
    float* d = dwpe + t * C;
    for (int64_t b = 0; b < B; ++b) {
      const float* g = dout + (b * T + t) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) d[c] += g[c];
    }
  }
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                       int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;  // (C)
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += x[c];
    const float m = sum / static_cast<float>(C);
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) var += (x[c] - m) * (x[c] - m);
    const float s = 1.0f / std::sqrt(var / static_cast<float>(C) + kLayerNormEps);
    float* o = out + n * C;  // (C)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = (x[c] - m) * s * w[c] + b[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int64_t N, int64_t C) {
  // dinp = rstd (dnorm - mean(dnorm) - norm mean(dnorm norm)), dnorm = dout w.
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;   // (C)
    const float* g = dout + n * C;  // (C)
    const float m = mean[n], s = rstd[n];
    float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
#pragma omp simd reduction(+ : sum_dnorm, sum_dnorm_norm)
    for (int64_t c = 0; c < C; ++c) {
      const float dnorm = g[c] * w[c];
      sum_dnorm += dnorm;
      sum_dnorm_norm += dnorm * (x[c] - m) * s;
    }
    const float mean_dnorm = sum_dnorm / static_cast<float>(C);
    const float mean_dnorm_norm = sum_dnorm_norm / static_cast<float>(C);
    float* d = dinp + n * C;  // (C)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float norm = (x[c] - m) * s;
      d[c] += s * (g[c] * w[c] - mean_dnorm - norm * mean_dnorm_norm);
    }
  }
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t blk = 0; blk < channel_blocks(C); ++blk) {
    const int64_t c0 = blk * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
    float acc_w[kChannelBlock] = {}, acc_b[kChannelBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* x = inp + n * C;
      const float* g = dout + n * C;
      const float m = mean[n], s = rstd[n];
      for (int64_t c = c0; c < c1; ++c) {
        acc_w[c - c0] += g[c] * (x[c] - m) * s;
        acc_b[c - c0] += g[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dw[c] += acc_w[c - c0];
      db[c] += acc_b[c - c0];
    }
  }
}

void matmul_forward(float* out, const float* inp, const float* w, const float* b, int64_t N, int64_t IC,
                    int64_t OC) {
  if (b != nullptr) {
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * OC))
    for (int64_t n = 0; n < N; ++n) std::memcpy(out + n * OC, b, static_cast<size_t>(OC) * sizeof(float));
  }
  // out (N, OC) = inp (N, IC) w^T (IC, OC) [+ out holding the bias].
  gemm_cpu(Trans::no, Trans::yes, N, OC, IC, 1.0f, inp, IC, w, IC, b != nullptr ? 1.0f : 0.0f, out, OC);
}

void matmul_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                     int64_t N, int64_t IC, int64_t OC) {
  // dinp (N, IC) = dout (N, OC) w (OC, IC).
  gemm_cpu(Trans::no, Trans::no, N, IC, OC, 1.0f, dout, OC, w, IC, 0.0f, dinp, IC);
  // dw (OC, IC) += dout^T (OC, N) inp (N, IC).
  gemm_cpu(Trans::yes, Trans::no, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw, IC);
  if (db == nullptr) return;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * OC))
  for (int64_t blk = 0; blk < channel_blocks(OC); ++blk) {
    const int64_t c0 = blk * kChannelBlock, c1 = std::min(OC, c0 + kChannelBlock);
    float acc[kChannelBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* g = dout + n * OC;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += g[c];
    }
    for (int64_t c = c0; c < c1; ++c) db[c] += acc[c - c0];
  }
}

void gelu_forward(float* out, const float* inp, int64_t n) { gelu_forward_cpu(out, inp, n); }

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) { gelu_backward_cpu(dinp, inp, dout, n); }

namespace {

// out[c] = x[c] + mask(n, c) * scale * y[c] for one row, 16 columns per Philox call; with
// x null: out[c] = mask * scale * y[c].
void dropout_row(float* out, const float* x, const float* y, int64_t n, int64_t C, const DropoutSite& site,
                 float scale) {
  for (int64_t g = 0; g * kDropoutColsPerCall < C; ++g) {
    const Philox4x32 words = dropout_random_words(site.rng, site.site, n, g);
    const int64_t c0 = g * kDropoutColsPerCall, c1 = std::min(C, c0 + kDropoutColsPerCall);
    for (int64_t c = c0; c < c1; ++c) {
      const bool keep = dropout_keep_byte(dropout_byte(words, static_cast<int>(c - c0)), site.threshold);
      const float v = keep ? y[c] * scale : 0.0f;
      out[c] = x != nullptr ? x[c] + v : v;
    }
  }
}

}  // namespace

void dropout_forward(float* x, int64_t N, int64_t C, const DropoutSite& site) {
  if (!dropout_enabled(site.threshold)) return;
  const float scale = static_cast<float>(dropout_keep_scale(site.threshold));
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t n = 0; n < N; ++n) dropout_row(x + n * C, nullptr, x + n * C, n, C, site, scale);
}

void residual_dropout_forward(float* out, const float* x, const float* y, int64_t N, int64_t C,
                              const DropoutSite& site) {
  if (!dropout_enabled(site.threshold)) {
#pragma omp parallel for simd schedule(static) if(parallel : parallel_worth(N * C))
    for (int64_t i = 0; i < N * C; ++i) out[i] = x[i] + y[i];
    return;
  }
  const float scale = static_cast<float>(dropout_keep_scale(site.threshold));
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t n = 0; n < N; ++n) dropout_row(out + n * C, x + n * C, y + n * C, n, C, site, scale);
}

void dropout_backward(float* dy, const float* dout, int64_t N, int64_t C, const DropoutSite& site) {
  if (!dropout_enabled(site.threshold)) {
    if (dy != dout) std::memcpy(dy, dout, static_cast<size_t>(N * C) * sizeof(float));
    return;
  }
  const float scale = static_cast<float>(dropout_keep_scale(site.threshold));
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(N * C))
  for (int64_t n = 0; n < N; ++n) dropout_row(dy + n * C, nullptr, dout + n * C, n, C, site, scale);
}

namespace {

// q, k, v read in place from qkv (B, T, 3C) through strides; out and dout dense (B, T, C).
AttentionParams attention_params(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t C,
                                 int64_t NH, float dropout, DropoutRng rng) {
  FLASHGPT_CHECK(B <= std::numeric_limits<int>::max() && T <= std::numeric_limits<int>::max(),
                 "attention: batch {} or sequence length {} exceeds the kernel's int range", B, T);
  AttentionParams p;
  p.q = qkv;
  p.k = qkv + C;
  p.v = qkv + 2 * C;
  p.o = out;
  p.lse = lse;
  p.dtype = DType::f32;
  p.batch = static_cast<int>(B);
  p.seqlen_q = p.seqlen_k = static_cast<int>(T);
  p.heads_q = p.heads_kv = static_cast<int>(NH);
  p.head_dim = static_cast<int>(C / NH);
  const int64_t hd = C / NH;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = T * 3 * C;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = 3 * C;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = hd;
  p.o_batch_stride = p.do_batch_stride = T * C;
  p.o_row_stride = p.do_row_stride = C;
  p.o_head_stride = p.do_head_stride = hd;
  p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = T * 3 * C;
  p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = 3 * C;
  p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = hd;
  p.lse_batch_stride = NH * T;
  p.lse_head_stride = T;
  p.mask = Mask::causal;
  p.dropout_p = dropout;
  p.rng = rng;
  return p;
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                       float dropout, DropoutRng rng) {
  attention_forward_cpu(attention_params(qkv, out, lse, B, T, C, NH, dropout, rng));
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH, float dropout, DropoutRng rng) {
  AttentionParams p = attention_params(qkv, const_cast<float*>(out), const_cast<float*>(lse), B, T, C, NH, dropout, rng);
  p.d_o = dout;
  p.dq = dqkv;
  p.dk = dqkv + C;
  p.dv = dqkv + 2 * C;
  attention_backward_cpu(p);
}

namespace {

// The classifier runs over slabs of kVocabSlab vocabulary columns, so that each slab's
// logits (rows x kVocabSlab) are still in L2 when its softmax statistics, its gradient and
// its two backward products read them. The gradient w.r.t. the classifier's input sums
// over the slabs: kDinpGroups groups of consecutive slabs each sum into their own partial,
// and the partials are added in group order, so no split depends on the thread count.
constexpr int64_t kVocabSlab = 256;
constexpr int64_t kDinpGroups = 16;

int64_t vocab_slabs(int64_t V) { return (V + kVocabSlab - 1) / kVocabSlab; }

}  // namespace

int64_t classifier_scratch_floats(int64_t chunk_rows, int64_t C, int64_t V) {
  // logits, the per-(row, slab) max and sum, lse and target logit per row, dinp partials.
  return chunk_rows * V + 2 * chunk_rows * vocab_slabs(V) + 2 * chunk_rows + kDinpGroups * chunk_rows * C;
}

double classifier_forward_backward(float* dinp, float* dwte, float* losses, float* scratch, const float* inp,
                                   const float* wte, const int32_t* targets, int64_t N, int64_t C, int64_t V,
                                   float dloss, int64_t chunk_rows) {
  FLASHGPT_CHECK(chunk_rows > 0, "classifier: chunk_rows must be positive, got {}", chunk_rows);
  const bool backward = dinp != nullptr;
  const int64_t R = std::min(chunk_rows, N), S = vocab_slabs(V);
  float* logits = scratch;                    // (rows, V): logits, then exp(logit - slab max), then dlogits
  float* slab_max = logits + R * V;           // (rows, S)
  float* slab_sum = slab_max + R * S;         // (rows, S): sum of exp(logit - slab max)
  float* lse = slab_sum + R * S;              // (rows)
  float* target_logit = lse + R;              // (rows)
  float* dinp_part = target_logit + R;        // (kDinpGroups, rows, C)
  const SlabKernels k = slab_kernels();
  gemm_cpu_prepare();  // before gemm_cpu_serial's calls inside the parallel regions
  const bool slabs_parallel = parallel_worth(R * V);
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - r0);
    const float* x = inp + r0 * C;  // (rows, C)
    const int32_t* tg = targets + r0;
    // Per slab: logits[:, v0:v1] (rows, vn) = x (rows, C) wte[v0:v1]^T (C, vn), then each
    // row's max and sum of exponentials over the slab while the slab is in cache. Slabs
    // and groups are handed out dynamically: on shared cores a thread that loses its core
    // would hold the other at the barrier with a static share, and no result depends on
    // which thread computes a slab.
#pragma omp parallel for schedule(dynamic) if(parallel : slabs_parallel)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t v0 = s * kVocabSlab, vn = std::min(kVocabSlab, V - v0);
      gemm_cpu_serial(Trans::no, Trans::yes, rows, vn, C, 1.0f, x, C, wte + v0 * C, C, 0.0f, logits + v0, V);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = logits + r * V + v0;
        if (tg[r] >= v0 && tg[r] < v0 + vn) target_logit[r] = row[tg[r] - v0];
        slab_sum[r * S + s] = k.exp_slab(row, vn, &slab_max[r * S + s]);
      }
    }
    // Per row: lse over the slabs in order, in double.
    for (int64_t r = 0; r < rows; ++r) {
      const float* m = slab_max + r * S;
      const float* e = slab_sum + r * S;
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) max = std::max(max, m[s]);
      double sum = 0.0;
      for (int64_t s = 0; s < S; ++s) sum += static_cast<double>(e[s]) * std::exp(static_cast<double>(m[s] - max));
      const double l = static_cast<double>(max) + std::log(sum);
      lse[r] = static_cast<float>(l);
      losses[r0 + r] = static_cast<float>(l - static_cast<double>(target_logit[r]));
    }
    if (!backward) continue;
    // Per slab: dlogits = (exp(logit - max) exp(max - lse) - onehot) dloss, then
    // dwte[v0:v1] (vn, C) += dlogits^T (vn, rows) x (rows, C) and the slab's group partial
    // of dinp (rows, C) += dlogits (rows, vn) wte[v0:v1] (vn, C).
    const int64_t groups = std::min(kDinpGroups, S);
#pragma omp parallel for schedule(dynamic) if(parallel : slabs_parallel)
    for (int64_t g = 0; g < groups; ++g) {
      float* part = dinp_part + g * R * C;
      for (int64_t s = g * S / groups; s < (g + 1) * S / groups; ++s) {
        const int64_t v0 = s * kVocabSlab, vn = std::min(kVocabSlab, V - v0);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = logits + r * V + v0;
          k.scale(row, vn, std::exp(slab_max[r * S + s] - lse[r]) * dloss);
          if (tg[r] >= v0 && tg[r] < v0 + vn) row[tg[r] - v0] -= dloss;
        }
        gemm_cpu_serial(Trans::yes, Trans::no, vn, C, rows, 1.0f, logits + v0, V, x, C, 1.0f, dwte + v0 * C, C);
        gemm_cpu_serial(Trans::no, Trans::no, rows, C, vn, 1.0f, logits + v0, V, wte + v0 * C, C,
                        s == g * S / groups ? 0.0f : 1.0f, part, C);
      }
    }
    // dinp[r0:] = the group partials added in group order.
    float* d = dinp + r0 * C;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(groups * rows * C))
    for (int64_t r = 0; r < rows; ++r) {
      float* out = d + r * C;
      std::memcpy(out, dinp_part + r * C, static_cast<size_t>(C) * sizeof(float));
      for (int64_t g = 1; g < groups; ++g) {
        const float* p = dinp_part + g * R * C + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += p[c];
      }
    }
  }
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) total += losses[n];
  return total;
}

}  // namespace flashgpt::model

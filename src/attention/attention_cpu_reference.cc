// The reference attention: plain loops that materialize S = scale * Q K^T and P =
// softmax(S) for one (sequence, head) at a time, with every sum in double. It is the
// oracle of the tiled CPU path and of the CUDA kernels, so it favours the textbook
// formulas over speed: the backward uses the softmax Jacobian directly,
//   dP~ = dO V^T (dropped and scaled like P),  dS_ij = P_ij (dP~_ij - sum_k P_ik dP~_ik),
// and never the D = rowsum(dO * O) shortcut that the tiled version takes.
// Rows of one head are independent, so they are split across OpenMP threads; the work
// of each row is sequential, so the result does not depend on the thread count.
#include "attention_cpu_reference.h"

#include "attention_cpu_common.h"

#include <flashgpt/attention_cpu.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flashgpt {
namespace {

using attention_cpu::AttentionTensors;
using attention_cpu::CpuSequence;

constexpr int kMaxHeadDim = 256;  // attention_validate admits no larger head_dim
// Below this many multiply-adds per (sequence, head) a parallel region costs more than it
// saves (and under load, waiting for a descheduled thread costs milliseconds).
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

template <typename A, typename B>
double dot_double(const A* a, const B* b, int n) {
  double acc = 0.0;
  for (int c = 0; c < n; ++c) acc += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  return acc;
}

// The dropout multiplier of P[row, col]: 0 when dropped, 256 / (256 - t) when kept
// (t = round(p * 256), philox.h).
struct ReferenceDropout {
  bool enabled;
  uint32_t threshold;
  double keep_scale;
  DropoutRng rng;
  double multiplier(int64_t batch_head, int64_t row, int64_t col) const {
    if (!enabled) return 1.0;
    return dropout_keep(rng, batch_head, row, col, threshold) ? keep_scale : 0.0;
  }
};

ReferenceDropout reference_dropout(const AttentionParams& p) {
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  return {dropout_enabled(threshold), threshold, dropout_keep_scale(threshold), p.rng};
}

// Writes scale * q_row . K^T into s[0 .. key_end) and turns it into the pre-dropout
// softmax in place. Returns the row's log-sum-exp, +inf when the row sees no key.
template <typename T>
double reference_softmax_row(const T* q_row, const AttentionTensors<T>& t, const CpuSequence& seq, int head_kv,
                             int key_end, int d, double scale, double* s) {
  if (key_end == 0) return std::numeric_limits<double>::infinity();
  double row_max = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < key_end; ++j) {
    s[j] = scale * dot_double(q_row, t.k.at(seq.batch, seq.k_row0 + j, head_kv), d);
    row_max = std::max(row_max, s[j]);
  }
  double row_sum = 0.0;
  for (int j = 0; j < key_end; ++j) row_sum += std::exp(s[j] - row_max);
  for (int j = 0; j < key_end; ++j) s[j] = std::exp(s[j] - row_max) / row_sum;
  return row_max + std::log(row_sum);
}

template <typename T>
void reference_forward(const AttentionParams& p) {
  const AttentionTensors<T> t = attention_cpu::attention_tensors<T>(p);
  const double scale = attention_softmax_scale(p);
  const ReferenceDropout drop = reference_dropout(p);
  const int d = p.head_dim, group = p.heads_q / p.heads_kv;
  // (seqlen_q, seqlen_k): S, then P in place, of the current (sequence, head).
  std::vector<double> probs(static_cast<size_t>(attention_reference_workspace_bytes(p, AttentionPass::forward)) /
                            sizeof(double));
  for (int b = 0; b < p.batch; ++b) {
    const CpuSequence seq = attention_cpu::cpu_sequence(p, b);
    for (int h = 0; h < p.heads_q; ++h) {
      const int head_kv = h / group;
      const int64_t batch_head = int64_t{b} * p.heads_q + h;
      float* lse = p.lse + seq.lse_offset + h * p.lse_head_stride;
      const bool parallel = int64_t{seq.len_q} * seq.len_k * d >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (parallel)
      for (int i = 0; i < seq.len_q; ++i) {
        double* s = probs.data() + static_cast<size_t>(i) * seq.len_k;  // (len_k)
        const int key_end = seq.key_end(i);
        const double row_lse =
            reference_softmax_row(t.q.at(seq.batch, seq.q_row0 + i, h), t, seq, head_kv, key_end, d, scale, s);
        double out[kMaxHeadDim] = {};  // (D): O_i = sum_j dropout(P_ij) V_j
        for (int j = 0; j < key_end; ++j) {
          const double pj = s[j] * drop.multiplier(batch_head, i, j);
          const T* v_row = t.v.at(seq.batch, seq.k_row0 + j, head_kv);
          for (int c = 0; c < d; ++c) out[c] += pj * static_cast<double>(v_row[c]);
        }
        T* o_row = t.o.at(seq.batch, seq.q_row0 + i, h);
        for (int c = 0; c < d; ++c) o_row[c] = static_cast<T>(out[c]);
        lse[i] = static_cast<float>(row_lse);
      }
    }
  }
}

template <typename T>
void reference_backward(const AttentionParams& p) {
  const AttentionTensors<T> t = attention_cpu::attention_tensors<T>(p);
  const double scale = attention_softmax_scale(p);
  const ReferenceDropout drop = reference_dropout(p);
  const int d = p.head_dim, group = p.heads_q / p.heads_kv;
  const size_t max_scores = static_cast<size_t>(p.seqlen_q) * p.seqlen_k;
  const size_t max_kv = static_cast<size_t>(p.seqlen_k) * d;
  std::vector<double> workspace(static_cast<size_t>(attention_reference_workspace_bytes(p, AttentionPass::backward)) /
                                sizeof(double));
  double* probs = workspace.data();           // (seqlen_q, seqlen_k): dropout(P)
  double* grad_scores = probs + max_scores;   // (seqlen_q, seqlen_k): dS
  double* dk_acc = grad_scores + max_scores;  // (seqlen_k, D): dK of one kv head, summed over its group
  double* dv_acc = dk_acc + max_kv;           // (seqlen_k, D)
  for (int b = 0; b < p.batch; ++b) {
    const CpuSequence seq = attention_cpu::cpu_sequence(p, b);
    for (int head_kv = 0; head_kv < p.heads_kv; ++head_kv) {
      std::fill(dk_acc, dk_acc + max_kv, 0.0);
      std::fill(dv_acc, dv_acc + max_kv, 0.0);
      for (int h = head_kv * group; h < (head_kv + 1) * group; ++h) {
        const int64_t batch_head = int64_t{b} * p.heads_q + h;
        const bool parallel = int64_t{seq.len_q} * seq.len_k * d >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (parallel)
        for (int i = 0; i < seq.len_q; ++i) {
          double* p_row = probs + static_cast<size_t>(i) * seq.len_k;
          double* ds_row = grad_scores + static_cast<size_t>(i) * seq.len_k;
          const int key_end = seq.key_end(i);
          reference_softmax_row(t.q.at(seq.batch, seq.q_row0 + i, h), t, seq, head_kv, key_end, d, scale, p_row);
          const T* do_row = t.d_o.at(seq.batch, seq.q_row0 + i, h);
          double p_dot_dp = 0.0;  // sum_j P_ij dP~_ij
          for (int j = 0; j < key_end; ++j) {
            const double mult = drop.multiplier(batch_head, i, j);
            ds_row[j] = mult * dot_double(do_row, t.v.at(seq.batch, seq.k_row0 + j, head_kv), d);  // dP~
            p_dot_dp += p_row[j] * ds_row[j];
          }
          double dq_row[kMaxHeadDim] = {};  // (D)
          for (int j = 0; j < key_end; ++j) {
            ds_row[j] = p_row[j] * (ds_row[j] - p_dot_dp);  // dS
            p_row[j] *= drop.multiplier(batch_head, i, j);  // dropout(P), what multiplied V
            const T* k_row = t.k.at(seq.batch, seq.k_row0 + j, head_kv);
            for (int c = 0; c < d; ++c) dq_row[c] += ds_row[j] * static_cast<double>(k_row[c]);
          }
          T* dq_out = t.dq.at(seq.batch, seq.q_row0 + i, h);
          for (int c = 0; c < d; ++c) dq_out[c] = static_cast<T>(scale * dq_row[c]);
        }
        // dV_j += sum_i dropout(P)_ij dO_i and dK_j += scale sum_i dS_ij Q_i. Each thread owns
        // a contiguous range of keys, so no two threads write the same row, and walks P and dS
        // row by row (walking a column misses the cache on every element at large N). Every
        // sum runs over i in order, whatever the thread count.
#pragma omp parallel if (parallel)
        {
          const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
          const int key_begin = static_cast<int>(seq.len_k * thread / threads);
          const int key_stop = static_cast<int>(seq.len_k * (thread + 1) / threads);
          for (int i = seq.first_row_seeing(key_begin); i < seq.len_q; ++i) {
            const double* p_row = probs + static_cast<size_t>(i) * seq.len_k;
            const double* ds_row = grad_scores + static_cast<size_t>(i) * seq.len_k;
            const T* do_row = t.d_o.at(seq.batch, seq.q_row0 + i, h);
            const T* q_row = t.q.at(seq.batch, seq.q_row0 + i, h);
            for (int j = key_begin; j < std::min(key_stop, seq.key_end(i)); ++j) {
              double* dk_row = dk_acc + static_cast<size_t>(j) * d;
              double* dv_row = dv_acc + static_cast<size_t>(j) * d;
              for (int c = 0; c < d; ++c) {
                dv_row[c] += p_row[j] * static_cast<double>(do_row[c]);
                dk_row[c] += scale * ds_row[j] * static_cast<double>(q_row[c]);
              }
            }
          }
        }
      }
      for (int j = 0; j < seq.len_k; ++j) {
        T* dk_out = t.dk.at(seq.batch, seq.k_row0 + j, head_kv);
        T* dv_out = t.dv.at(seq.batch, seq.k_row0 + j, head_kv);
        for (int c = 0; c < d; ++c) {
          dk_out[c] = static_cast<T>(dk_acc[static_cast<size_t>(j) * d + c]);
          dv_out[c] = static_cast<T>(dv_acc[static_cast<size_t>(j) * d + c]);
        }
      }
    }
  }
}

}  // namespace

int64_t attention_reference_workspace_bytes(const AttentionParams& p, AttentionPass pass) {
  const int64_t scores = int64_t{p.seqlen_q} * p.seqlen_k;
  if (pass == AttentionPass::forward) return scores * int64_t{sizeof(double)};
  return (2 * scores + 2 * int64_t{p.seqlen_k} * p.head_dim) * int64_t{sizeof(double)};
}

void attention_forward_reference(const AttentionParams& params) {
  attention_cpu::cpu_check_params(params, AttentionPass::forward, "attention_forward_reference",
                                  attention_cpu::DtypeCheck::require_f32);
  reference_forward<float>(params);
}

void attention_backward_reference(const AttentionParams& params) {
  attention_cpu::cpu_check_params(params, AttentionPass::backward, "attention_backward_reference",
                                  attention_cpu::DtypeCheck::require_f32);
  reference_backward<float>(params);
}

void attention_forward_reference_f64(const AttentionParams& params) {
  attention_cpu::cpu_check_params(params, AttentionPass::forward, "attention_forward_reference_f64",
                                  attention_cpu::DtypeCheck::skip);
  reference_forward<double>(params);
}

void attention_backward_reference_f64(const AttentionParams& params) {
  attention_cpu::cpu_check_params(params, AttentionPass::backward, "attention_backward_reference_f64",
                                  attention_cpu::DtypeCheck::skip);
  reference_backward<double>(params);
}

}  // namespace flashgpt

// Random attention problems for the CPU attention tests: dense or packed variable-length
// batches, float or double tensors. Comparisons go through op_close (tests/common/op_test.h).
#pragma once

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>

#include "common/op_test.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace flashgpt::testing {

struct AttentionShape {
  int batch = 1;
  int seqlen_q = 1;  // varlen: filled in from lens_q
  int seqlen_k = 1;
  int heads_q = 1;
  int heads_kv = 1;
  int head_dim = 32;
  Mask mask = Mask::none;
  float dropout_p = 0.0f;
  std::vector<int32_t> lens_q, lens_k;  // non-empty: a packed variable-length batch
  float softmax_scale = 0.0f;
  DropoutRng rng{0x5eed1234abcdULL, 7};

  bool varlen() const { return !lens_q.empty(); }
};

// Tensors of one problem, contiguous: [batch, seqlen, heads, d] or packed [total, heads, d].
// Outputs start as NaN, so that an element no implementation wrote cannot pass for a result.
template <typename T>
struct AttentionBuffers {
  AttentionShape shape;
  int64_t total_q = 0, total_k = 0;
  std::vector<int32_t> cu_q, cu_k;
  std::vector<T> q, k, v, d_o;   // inputs
  std::vector<T> o, dq, dk, dv;  // outputs
  std::vector<float> lse;        // (batch, heads_q, seqlen_q) or (heads_q, total_q)

  explicit AttentionBuffers(AttentionShape s) : shape(std::move(s)) {
    if (shape.varlen()) {
      shape.batch = static_cast<int>(shape.lens_q.size());
      cu_q.assign(1, 0);
      cu_k.assign(1, 0);
      for (int b = 0; b < shape.batch; ++b) {
        cu_q.push_back(cu_q.back() + shape.lens_q[b]);
        cu_k.push_back(cu_k.back() + shape.lens_k[b]);
      }
      shape.seqlen_q = *std::max_element(shape.lens_q.begin(), shape.lens_q.end());
      shape.seqlen_k = *std::max_element(shape.lens_k.begin(), shape.lens_k.end());
      total_q = cu_q.back();
      total_k = cu_k.back();
    } else {
      total_q = int64_t{shape.batch} * shape.seqlen_q;
      total_k = int64_t{shape.batch} * shape.seqlen_k;
    }
    const size_t nq = size_t(total_q) * shape.heads_q * shape.head_dim;
    const size_t nk = size_t(total_k) * shape.heads_kv * shape.head_dim;
    q.resize(nq), d_o.resize(nq), k.resize(nk), v.resize(nk);
    clear_outputs();
  }

  void clear_outputs() {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    o.assign(q.size(), nan), dq.assign(q.size(), nan);
    dk.assign(k.size(), nan), dv.assign(k.size(), nan);
    lse.assign(size_t(total_q) * shape.heads_q, std::numeric_limits<float>::quiet_NaN());
  }

  // Normal(0, scale) inputs; d_o is Normal(0, 1).
  void fill_random(uint64_t seed, double scale = 1.0) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (auto* t : {&q, &k, &v}) {
      for (auto& x : *t) x = static_cast<T>(scale * normal(gen));
    }
    for (auto& x : d_o) x = static_cast<T>(normal(gen));
  }

  AttentionParams params() {
    AttentionParams p;
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data(), p.lse = lse.data();
    p.d_o = d_o.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
    p.batch = shape.batch, p.seqlen_q = shape.seqlen_q, p.seqlen_k = shape.seqlen_k;
    p.heads_q = shape.heads_q, p.heads_kv = shape.heads_kv, p.head_dim = shape.head_dim;
    p.mask = shape.mask, p.dropout_p = shape.dropout_p, p.rng = shape.rng, p.softmax_scale = shape.softmax_scale;
    if (shape.varlen()) {
      p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data();
      attention_set_varlen_strides(p, total_q, total_k);
    } else {
      attention_set_dense_strides(p);
    }
    return p;
  }
};

// A double copy of float inputs (exact), for the double-precision reference.
inline AttentionBuffers<double> attention_buffers_widen(const AttentionBuffers<float>& f) {
  AttentionBuffers<double> d(f.shape);
  d.q.assign(f.q.begin(), f.q.end()), d.k.assign(f.k.begin(), f.k.end());
  d.v.assign(f.v.begin(), f.v.end()), d.d_o.assign(f.d_o.begin(), f.d_o.end());
  return d;
}

template <typename T>
bool attention_any_nan(const std::vector<T>& x) {
  for (const T& value : x) {
    if (std::isnan(value)) return true;
  }
  return false;
}

// ---- shared by the tiled-vs-reference tests ----

// fp32 against double-accumulated fp32 inputs: a few ulps per term, summed over <= 4097
// keys. Measured worst cases are ~10x below these.
constexpr double kForwardTol = 2e-5;
constexpr double kBackwardTol = 1e-4;

inline AttentionShape dense(int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int d, Mask mask,
                            float dropout_p) {
  AttentionShape s;
  s.batch = batch, s.seqlen_q = seqlen_q, s.seqlen_k = seqlen_k, s.heads_q = heads_q, s.heads_kv = heads_kv;
  s.head_dim = d, s.mask = mask, s.dropout_p = dropout_p;
  return s;
}

inline AttentionShape varlen(std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int heads_q, int heads_kv, int d,
                             Mask mask, float dropout_p) {
  AttentionShape s = dense(0, 0, 0, heads_q, heads_kv, d, mask, dropout_p);
  s.lens_q = std::move(lens_q), s.lens_k = std::move(lens_k);
  return s;
}

inline CpuTiling tiles(int block_rows, int block_cols, int threads = 0) {
  CpuTiling t;
  t.block_rows = block_rows, t.block_cols = block_cols, t.threads = threads;
  return t;
}

inline CpuTiling budget(int64_t onchip_bytes, CpuTileRule rule = CpuTileRule::paper) {
  CpuTiling t;
  t.onchip_bytes = onchip_bytes, t.rule = rule;
  return t;
}

constexpr Mask kCausal = Mask::causal, kFull = Mask::none;

}  // namespace flashgpt::testing

// What the CPU reference and the tiled CPU attention share: where each (sequence, row,
// head) lives in the strided tensors, which keys a query row sees under the mask, and
// the dropout multiplier of each probability. Internal to src/attention.
#pragma once

#include <flashgpt/attention.h>
#include <flashgpt/error.h>
#include <flashgpt/philox.h>

#include <algorithm>
#include <cstdint>

namespace flashgpt::attention_cpu {

// A strided view of one tensor: element (batch, row, head, 0) and head_dim contiguous.
template <typename T>
struct StridedTensor {
  T* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  T* at(int64_t batch, int64_t row, int64_t head) const {
    return data + batch * batch_stride + row * row_stride + head * head_stride;
  }
};

// Every tensor of the params, typed: float for the public fp32 API, double for the
// reference's double-precision twin that the finite-difference tests use.
template <typename T>
struct AttentionTensors {
  StridedTensor<const T> q, k, v, d_o;
  StridedTensor<T> o, dq, dk, dv;
};

template <typename T>
AttentionTensors<T> attention_tensors(const AttentionParams& p) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  // A packed batch ignores batch strides: the sequence's first row is its packed offset.
  auto bs = [varlen](int64_t stride) { return varlen ? int64_t{0} : stride; };
  AttentionTensors<T> t;
  t.q = {static_cast<const T*>(p.q), bs(p.q_batch_stride), p.q_row_stride, p.q_head_stride};
  t.k = {static_cast<const T*>(p.k), bs(p.k_batch_stride), p.k_row_stride, p.k_head_stride};
  t.v = {static_cast<const T*>(p.v), bs(p.v_batch_stride), p.v_row_stride, p.v_head_stride};
  t.d_o = {static_cast<const T*>(p.d_o), bs(p.do_batch_stride), p.do_row_stride, p.do_head_stride};
  t.o = {static_cast<T*>(p.o), bs(p.o_batch_stride), p.o_row_stride, p.o_head_stride};
  t.dq = {static_cast<T*>(p.dq), bs(p.dq_batch_stride), p.dq_row_stride, p.dq_head_stride};
  t.dk = {static_cast<T*>(p.dk), bs(p.dk_batch_stride), p.dk_row_stride, p.dk_head_stride};
  t.dv = {static_cast<T*>(p.dv), bs(p.dv_batch_stride), p.dv_row_stride, p.dv_head_stride};
  return t;
}

// One sequence of the batch. Rows and columns below are positions within the sequence;
// tensor rows are q_row0 + row and k_row0 + col, in batch entry `batch` of the strides
// (0 in a packed batch, whose batch strides are ignored).
struct CpuSequence {
  int index = 0;  // b: also the batch part of the dropout key
  int len_q = 0, len_k = 0;
  int64_t q_row0 = 0, k_row0 = 0;
  int64_t batch = 0;
  int64_t lse_offset = 0;  // of (row 0, head 0) in lse
  int64_t token0 = 0;      // index of row 0 among all query rows of the batch (0 .. total_q)
  bool causal = false;

  // One past the last key that query row `row` sees. Causal masks align to the
  // bottom-right corner (FlashAttention 2): key col is visible iff col <= row + len_k - len_q,
  // so when len_q > len_k the first len_q - len_k rows see nothing.
  int key_end(int64_t row) const {
    if (!causal) return len_k;
    return static_cast<int>(std::clamp<int64_t>(row + len_k - len_q + 1, 0, len_k));
  }
  // The first query row that sees key `col` (len_q when none does).
  int first_row_seeing(int64_t col) const {
    if (!causal) return len_k > 0 ? 0 : len_q;
    return static_cast<int>(std::clamp<int64_t>(col - (len_k - len_q), 0, len_q));
  }
};

inline CpuSequence cpu_sequence(const AttentionParams& p, int b) {
  CpuSequence s;
  s.index = b;
  s.causal = p.mask == Mask::causal;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.len_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    s.lse_offset = s.q_row0;  // LSE is [heads_q, total_q]
    s.token0 = s.q_row0;
  } else {
    s.batch = b;
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
    s.lse_offset = int64_t{b} * p.lse_batch_stride;
    s.token0 = int64_t{b} * p.seqlen_q;
  }
  return s;
}

// Query rows in the whole batch (the packed total in a variable-length batch).
inline int64_t attention_total_q(const AttentionParams& p) {
  return p.cu_seqlens_q != nullptr ? int64_t{p.cu_seqlens_q[p.batch]} : int64_t{p.batch} * p.seqlen_q;
}

// Dropout as philox.h defines it: P[i, j] is dropped when its random byte is below
// t = round(p * 256), and kept ones are scaled by 256 / (256 - t) (0 when t == 256); the
// byte is philox.h's, keyed by (b * heads_q + head, row, col).
struct CpuDropout {
  bool enabled = false;
  uint32_t threshold = 0;
  float keep_scale = 1.0f;
  DropoutRng rng;
};

inline CpuDropout cpu_dropout(const AttentionParams& p) {
  CpuDropout d;
  d.threshold = dropout_threshold(p.dropout_p);
  d.enabled = dropout_enabled(d.threshold);
  d.keep_scale = static_cast<float>(dropout_keep_scale(d.threshold));
  d.rng = p.rng;
  return d;
}

// multiplier[c - col_begin] for each col in [col_begin, col_end) of one row: 0 where the
// element is dropped, keep_scale where kept. One Philox call serves sixteen columns.
inline void dropout_row_multipliers(const CpuDropout& d, int64_t batch_head, int64_t row, int64_t col_begin,
                                    int64_t col_end, float* multiplier) {
  int64_t col = col_begin;
  while (col < col_end) {
    const Philox4x32 words = dropout_random_words(d.rng, batch_head, row, col / kDropoutColsPerCall);
    for (int k = static_cast<int>(col % kDropoutColsPerCall); k < kDropoutColsPerCall && col < col_end; ++k, ++col) {
      multiplier[col - col_begin] = dropout_keep_byte(dropout_byte(words, k), d.threshold) ? d.keep_scale : 0.0f;
    }
  }
}

// The public API takes fp32 tensors; the reference's double twin for the tests ignores dtype.
enum class DtypeCheck { require_f32, skip };

// The entry-point checks of every CPU routine: params, cumulative offsets, and the dtype.
inline void cpu_check_params(const AttentionParams& p, AttentionPass pass, const char* who, DtypeCheck dtype) {
  attention_validate(p, pass);
  FLASHGPT_CHECK(dtype == DtypeCheck::skip || p.dtype == DType::f32,
                 "{}: dtype {} is not supported on the CPU (float32 only)", who, dtype_name(p.dtype));
  attention_validate_cu_seqlens_host(p);
}

}  // namespace flashgpt::attention_cpu

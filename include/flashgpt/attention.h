// Exact attention, O = softmax(scale * Q K^T + mask) V with optional dropout on the
// probabilities, forward and backward, on the CPU (fp32) and on NVIDIA Hopper (bf16/fp16).
//
// Layout: Q is [batch, seqlen_q, heads_q, head_dim], K and V are [batch, seqlen_k,
// heads_kv, head_dim] (heads_q a multiple of heads_kv: query head h reads kv head
// h / (heads_q / heads_kv)), O, dO, dQ like Q, dK, dV like K. Strides are in elements;
// the last dimension is contiguous. In a variable-length batch (cu_seqlens_q non-null)
// the sequences are packed along one token axis: Q is [total_q, heads_q, head_dim],
// sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1], and batch strides are
// ignored.
//
// LSE (the natural log of each row's softmax denominator, scale applied) is fp32,
// [batch, heads_q, seqlen_q] with lse_batch_stride / lse_head_stride, or [heads_q,
// total_q] in a variable-length batch. A row that sees no key (causal with seqlen_q >
// seqlen_k) gets O = 0 and LSE = +inf, so that exp(s - LSE) = 0 in the backward pass.
//
// Causal mask: aligned to the bottom-right corner, as in FlashAttention 2: query row i
// sees key column j iff j <= i + seqlen_k - seqlen_q.
//
// Dropout: each probability P[i, j] is zeroed with probability t / 256, t = round(256 *
// dropout_p) (an 8-bit random byte below t, philox.h), and the kept ones are scaled by
// 256 / (256 - t), so every element keeps its expectation exactly. dropout_p < 1/512 is no
// dropout; dropout_p >= 511/512 drops everything (O = 0, gradients 0, never NaN). The mask
// comes from philox.h's dropout stream and is the same on every backend for the same seed
// and offset. LSE is that of the softmax before dropout.
#pragma once

#include <flashgpt/attention_head_dims.h>  // kAttentionHeadDims, generated from CMake's list
#include <flashgpt/philox.h>

#include <array>
#include <cstdint>
#include <string>

namespace flashgpt {

enum class DType { f32, f16, bf16 };
enum class Mask { none, causal };

const char* dtype_name(DType dtype);

struct AttentionParams {
  // Forward inputs and outputs.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;

  // Backward: reads q, k, v, o, lse and d_o; writes dq, dk, dv.
  const void* d_o = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  DType dtype = DType::f32;
  int batch = 0;
  int seqlen_q = 0;  // varlen: the longest sequence (max_seqlen_q)
  int seqlen_k = 0;  // varlen: max_seqlen_k
  int heads_q = 0;
  int heads_kv = 0;
  int head_dim = 0;

  // Element strides; the head_dim axis has stride 1.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  // Variable-length batches: batch + 1 cumulative offsets each, or null for a dense batch.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  float softmax_scale = 0.0f;  // 0 means 1 / sqrt(head_dim)
  Mask mask = Mask::none;
  float dropout_p = 0.0f;
  DropoutRng rng;
  // CUDA only: when set, the kernels read the dropout stream from this device address
  // instead of `rng`, so a captured CUDA graph can replay with a new stream per step.
  const DropoutRng* rng_device = nullptr;
};

// Fills every stride for contiguous dense tensors: Q/O/dO/dQ [batch, seqlen_q, heads_q, d],
// K/V/dK/dV [batch, seqlen_k, heads_kv, d], LSE [batch, heads_q, seqlen_q].
void attention_set_dense_strides(AttentionParams& params);
// The same for a packed variable-length batch: [total, heads, d] and LSE [heads_q, total_q].
void attention_set_varlen_strides(AttentionParams& params, int64_t total_q, int64_t total_k);

enum class AttentionPass { forward, backward };

// Throws flashgpt::Error naming the first problem found: null pointers, shapes, head
// dims, heads_q % heads_kv, dropout outside [0, 1), strides, cumulative offsets.
void attention_validate(const AttentionParams& params, AttentionPass pass);

// The scale actually used: params.softmax_scale, or 1/sqrt(head_dim) when it is 0.
float attention_softmax_scale(const AttentionParams& params);

}  // namespace flashgpt

namespace flashgpt {
// Checks cu_seqlens_q/k on the host: start at 0, non-decreasing, each length within max.
void attention_validate_cu_seqlens_host(const AttentionParams& params);
}  // namespace flashgpt

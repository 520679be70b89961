// Shape, stride and option validation shared by every attention backend.
#include <flashgpt/attention.h>
#include <flashgpt/error.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace flashgpt {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

float attention_softmax_scale(const AttentionParams& params) {
  return params.softmax_scale != 0.0f ? params.softmax_scale
                                      : 1.0f / std::sqrt(static_cast<float>(params.head_dim));
}

void attention_set_dense_strides(AttentionParams& p) {
  const int64_t d = p.head_dim;
  const int64_t q_row = int64_t{p.heads_q} * d, kv_row = int64_t{p.heads_kv} * d;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = d;
  p.k_head_stride = p.v_head_stride = p.dk_head_stride = p.dv_head_stride = d;
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = q_row;
  p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = kv_row;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = q_row * p.seqlen_q;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = kv_row * p.seqlen_k;
  p.lse_head_stride = p.seqlen_q;
  p.lse_batch_stride = int64_t{p.heads_q} * p.seqlen_q;
}

void attention_set_varlen_strides(AttentionParams& p, int64_t total_q, int64_t total_k) {
  attention_set_dense_strides(p);
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = 0;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
  p.lse_head_stride = total_q;
  p.lse_batch_stride = 0;
  (void)total_k;
}

namespace {

bool head_dim_supported(int d) {
  return std::find(kAttentionHeadDims.begin(), kAttentionHeadDims.end(), d) != kAttentionHeadDims.end();
}

void check_strides(const char* name, int64_t batch, int64_t row, int64_t head, bool varlen) {
  FLASHGPT_CHECK(row > 0 && head > 0 && (varlen || batch >= 0),
                 "attention: {} has a non-positive stride (batch {}, row {}, head {}); strides are in "
                 "elements and the head_dim axis must be contiguous",
                 name, batch, row, head);
}

void check_cu_seqlens(const char* name, const int32_t* cu, int batch, int max_seqlen) {
  FLASHGPT_CHECK(cu[0] == 0, "attention: {}[0] must be 0, got {}", name, cu[0]);
  for (int b = 0; b < batch; ++b) {
    const int len = cu[b + 1] - cu[b];
    FLASHGPT_CHECK(len >= 0, "attention: {} must be non-decreasing, but entry {} is {} and entry {} is {}", name,
                   b, cu[b], b + 1, cu[b + 1]);
    FLASHGPT_CHECK(len <= max_seqlen, "attention: sequence {} has length {} in {}, more than its max_seqlen {}", b,
                   len, name, max_seqlen);
  }
}

}  // namespace

void attention_validate(const AttentionParams& p, AttentionPass pass) {
  const bool varlen = p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr;
  FLASHGPT_CHECK(p.q && p.k && p.v, "attention: q, k and v must not be null");
  FLASHGPT_CHECK(p.o, "attention: the output o must not be null");
  FLASHGPT_CHECK(p.lse, "attention: the log-sum-exp buffer lse must not be null");
  if (pass == AttentionPass::backward) {
    FLASHGPT_CHECK(p.d_o, "attention backward: the output gradient d_o must not be null");
    FLASHGPT_CHECK(p.dq && p.dk && p.dv, "attention backward: dq, dk and dv must not be null");
  }
  FLASHGPT_CHECK(p.batch >= 0, "attention: batch must be >= 0, got {}", p.batch);
  FLASHGPT_CHECK(p.seqlen_q >= 0 && p.seqlen_k >= 0, "attention: sequence lengths must be >= 0, got seqlen_q {} "
                 "and seqlen_k {}", p.seqlen_q, p.seqlen_k);
  FLASHGPT_CHECK(head_dim_supported(p.head_dim),
                 "attention: head_dim {} is not supported (supported: {})", p.head_dim, fmt::join(kAttentionHeadDims, ", "));
  FLASHGPT_CHECK(p.heads_q > 0 && p.heads_kv > 0, "attention: head counts must be positive, got heads_q {} and "
                 "heads_kv {}", p.heads_q, p.heads_kv);
  FLASHGPT_CHECK(p.heads_q % p.heads_kv == 0,
                 "attention: heads_q ({}) must be a multiple of heads_kv ({}) for grouped-query attention",
                 p.heads_q, p.heads_kv);
  FLASHGPT_CHECK(p.dropout_p >= 0.0f && p.dropout_p < 1.0f, "attention: dropout_p must be in [0, 1), got {}",
                 p.dropout_p);
  FLASHGPT_CHECK(std::isfinite(p.softmax_scale), "attention: softmax_scale must be finite, got {}",
                 p.softmax_scale);
  FLASHGPT_CHECK((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr),
                 "attention: a variable-length batch needs both cu_seqlens_q and cu_seqlens_k");
  check_strides("q", p.q_batch_stride, p.q_row_stride, p.q_head_stride, varlen);
  check_strides("k", p.k_batch_stride, p.k_row_stride, p.k_head_stride, varlen);
  check_strides("v", p.v_batch_stride, p.v_row_stride, p.v_head_stride, varlen);
  check_strides("o", p.o_batch_stride, p.o_row_stride, p.o_head_stride, varlen);
  FLASHGPT_CHECK(p.lse_head_stride > 0, "attention: lse_head_stride must be positive");
  if (pass == AttentionPass::backward) {
    check_strides("d_o", p.do_batch_stride, p.do_row_stride, p.do_head_stride, varlen);
    check_strides("dq", p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, varlen);
    check_strides("dk", p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, varlen);
    check_strides("dv", p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, varlen);
  }
}

// Host-side check of the cumulative offsets; the CPU backends call it, GPU entry points
// cannot read device memory cheaply and rely on the caller (and the binding) instead.
void attention_validate_cu_seqlens_host(const AttentionParams& p) {
  if (p.cu_seqlens_q == nullptr) return;
  check_cu_seqlens("cu_seqlens_q", p.cu_seqlens_q, p.batch, p.seqlen_q);
  check_cu_seqlens("cu_seqlens_k", p.cu_seqlens_k, p.batch, p.seqlen_k);
}

}  // namespace flashgpt

// PyTorch binding of the flashgpt CUDA attention: tensors in, AttentionParams filled from
// their shapes and strides, kernels enqueued on PyTorch's current stream. Shapes follow
// the flash-attn package: dense q [b, s, h, d], varlen q [total, h, d].
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>
#include <flashgpt/attention_cuda.h>
#include <flashgpt/error.h>

#include <optional>

namespace {

flashgpt::DType dtype_of(const at::Tensor& t) {
  if (!t.is_cuda()) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "flashgpt_attn: CPU tensors must be float32 here");
    return flashgpt::DType::f32;
  }
  if (t.scalar_type() == at::kBFloat16) return flashgpt::DType::bf16;
  if (t.scalar_type() == at::kHalf) return flashgpt::DType::f16;
  TORCH_CHECK(false, "flashgpt_attn: CUDA tensors must be bfloat16 or float16, got ", t.scalar_type());
}

// Strides of a dense [b, s, h, d] or packed [total, h, d] tensor.
void strides_of(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  TORCH_CHECK(t.stride(-1) == 1, "flashgpt_attn: the head_dim axis must be contiguous");
  if (varlen) {
    batch = 0;
    row = t.stride(0);
    head = t.stride(1);
  } else {
    batch = t.stride(0);
    row = t.stride(1);
    head = t.stride(2);
  }
}

flashgpt::AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& o, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                                      int64_t max_q, int64_t max_k, double dropout_p, double scale, bool causal,
                                      int64_t seed, int64_t offset) {
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "flashgpt_attn: q, k, v must be on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flashgpt_attn: q, k, v must have one dtype");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4), "flashgpt_attn: q must be ", varlen ? "[total, h, d]" : "[b, s, h, d]");
  flashgpt::AttentionParams p;
  p.dtype = dtype_of(q);
  p.head_dim = int(q.size(-1));
  p.heads_q = int(q.size(-2));
  p.heads_kv = int(k.size(-2));
  TORCH_CHECK(k.size(-1) == p.head_dim && v.size(-1) == p.head_dim && v.size(-2) == p.heads_kv,
              "flashgpt_attn: k and v must have q's head_dim and the same number of heads");
  if (varlen) {
    TORCH_CHECK(cu_k.has_value(), "flashgpt_attn: varlen needs cu_seqlens_k");
    TORCH_CHECK(cu_q->scalar_type() == at::kInt && cu_k->scalar_type() == at::kInt &&
                    cu_q->device() == q.device() && cu_k->device() == q.device() && cu_q->is_contiguous() &&
                    cu_k->is_contiguous(),
                "flashgpt_attn: cu_seqlens must be contiguous int32 tensors on q's device");
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1, "flashgpt_attn: cu_seqlens sizes differ");
    p.batch = int(cu_q->numel() - 1);
    p.seqlen_q = int(max_q);
    p.seqlen_k = int(max_k);
    p.cu_seqlens_q = cu_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->data_ptr<int32_t>();
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
  } else {
    p.batch = int(q.size(0));
    p.seqlen_q = int(q.size(1));
    p.seqlen_k = int(k.size(1));
    TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch && v.size(1) == p.seqlen_k,
                "flashgpt_attn: q, k, v batch or k/v lengths differ");
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
  }
  strides_of(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides_of(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides_of(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides_of(o, varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.softmax_scale = float(scale);
  p.mask = causal ? flashgpt::Mask::causal : flashgpt::Mask::none;
  p.dropout_p = float(dropout_p);
  p.rng.seed = uint64_t(seed);
  p.rng.offset = uint64_t(offset);
  return p;
}

// Returns (out, lse). lse: [b, h, s] dense, [h, total] varlen.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                int64_t offset) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  const bool varlen = cu_q.has_value();
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  try {
    flashgpt::attention_forward_cuda(p, at::cuda::getCurrentCUDAStream());
  } catch (const flashgpt::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return {o, lse};
}

// Returns (dq, dk, dv).
std::vector<at::Tensor> backward(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                 std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                 int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                 int64_t offset, bool deterministic) {
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = cu_q.has_value();
  at::Tensor dq = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty_like(k, k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty_like(v, v.options().memory_format(at::MemoryFormat::Contiguous));
  auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  TORCH_CHECK(d_o.scalar_type() == q.scalar_type() && d_o.sizes() == q.sizes(), "flashgpt_attn: dout must match q");
  strides_of(d_o, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  strides_of(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.d_o = d_o.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  try {
    const size_t bytes = flashgpt::attention_backward_workspace_bytes(p);
    at::Tensor ws = at::empty({int64_t(bytes) + 256}, q.options().dtype(at::kByte));
    auto addr = reinterpret_cast<uintptr_t>(ws.data_ptr());
    void* aligned = reinterpret_cast<void*>((addr + 255) / 256 * 256);
    flashgpt::attention_backward_cuda(p, aligned, bytes,
                                      deterministic ? flashgpt::Determinism::deterministic : flashgpt::Determinism::fast,
                                      at::cuda::getCurrentCUDAStream());
  } catch (const flashgpt::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return {dq, dk, dv};
}

// The CPU implementation (attention_cpu.h, tiled FlashAttention in fp32) behind the same
// interface, for float32 CPU tensors.
std::vector<at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                    int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                    int64_t offset) {
  at::Tensor o = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  const bool varlen = cu_q.has_value();
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  try {
    flashgpt::attention_forward_cpu(p);
  } catch (const flashgpt::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return {o, lse};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                     std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                     int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                     int64_t offset) {
  const bool varlen = cu_q.has_value();
  at::Tensor dq = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty_like(k, k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty_like(v, v.options().memory_format(at::MemoryFormat::Contiguous));
  auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  strides_of(d_o, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  strides_of(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.d_o = d_o.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  try {
    flashgpt::attention_backward_cpu(p);
  } catch (const flashgpt::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "flashgpt attention forward (CUDA)");
  m.def("backward", &backward, "flashgpt attention backward (CUDA)");
  m.def("forward_cpu", &forward_cpu, "flashgpt attention forward (CPU, float32)");
  m.def("backward_cpu", &backward_cpu, "flashgpt attention backward (CPU, float32)");
}

// PyTorch binding of flashgpt attention. One forward and one backward for every device: the
// inputs are validated once (check_inputs), brought into the form the implementation reads
// (as_kernel_input), described by one AttentionParams (make_params), and handed at one point
// (run_attention) to the CPU implementation (attention_cpu.h) or the CUDA kernels
// (attention_cuda.h, on PyTorch's current stream), by the tensors' device. Shapes follow the
// flash-attn package: dense q [b, s, h, d], varlen q [total, h, d].
//
// CPU tensors of any floating dtype are computed in float32 (the CPU implementation's dtype) and
// the results cast back to the inputs' dtypes; CUDA tensors must be bfloat16 or float16. A build
// without CUDA (FLASHGPT_WITH_CUDA undefined: no nvcc, python/CMakeLists.txt) has the CPU path
// alone, includes no c10/cuda header and rejects CUDA tensors with a message that says so.
#include <torch/extension.h>

#ifdef FLASHGPT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <flashgpt/attention_cuda.h>
#endif

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>
#include <flashgpt/error.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

#ifdef FLASHGPT_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif
constexpr const char* kNoCuda =
    "flashgpt_attn: this build of flashgpt_attn has no CUDA kernels (it was built without nvcc), so it takes "
    "CPU tensors only; rebuild it with nvcc on PATH for CUDA tensors";

// Everything the two entry points need of q, k, v and the varlen offsets, checked once, before
// anything is allocated: one device (CPU or CUDA), one dtype the device's implementation takes,
// the dense or varlen layout, matching head_dim, batch and k/v shapes. What the attention API
// validates itself (head_dim supported, heads_q a multiple of heads_kv, dropout range) it
// reports in its own words.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& cu_q,
                  const std::optional<at::Tensor>& cu_k) {
  TORCH_CHECK(q.is_cpu() || q.is_cuda(), "flashgpt_attn: tensors must be on the CPU or a CUDA device, got q on ",
              q.device());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flashgpt_attn: q, k, v must be on one device, got q on ",
              q.device(), ", k on ", k.device(), ", v on ", v.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flashgpt_attn: q, k, v must have one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
              v.scalar_type());
  if (q.is_cuda()) {
    TORCH_CHECK(kBuiltWithCuda, kNoCuda);
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "flashgpt_attn: CUDA tensors must be bfloat16 or float16, got ", q.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(q.scalar_type()),
                "flashgpt_attn: CPU tensors must be floating point (computed in float32), got ", q.scalar_type());
  }
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == varlen, "flashgpt_attn: a varlen batch needs both cu_seqlens_q and cu_seqlens_k");
  const int64_t dims = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims, "flashgpt_attn: q, k, v must be ",
              varlen ? "[total, heads, head_dim]" : "[batch, seqlen, heads, head_dim]", ", got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "flashgpt_attn: k and v must have one shape, got k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1), "flashgpt_attn: k and v must have q's head_dim ", q.size(-1), ", got ",
              k.size(-1));
  if (!varlen) {
    TORCH_CHECK(k.size(0) == q.size(0), "flashgpt_attn: q, k, v must have one batch size, got q ", q.size(0),
                ", k and v ", k.size(0));
    return;
  }
  for (const at::Tensor* cu : {&*cu_q, &*cu_k}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device() == q.device(),
                "flashgpt_attn: cu_seqlens must be contiguous 1-D int32 tensors on q's device (", q.device(),
                "), got ", cu->scalar_type(), " ", cu->sizes(), " on ", cu->device(),
                cu->is_contiguous() ? "" : ", not contiguous");
  }
  TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1,
              "flashgpt_attn: cu_seqlens_q and cu_seqlens_k must both hold batch + 1 offsets, got ", cu_q->numel(),
              " and ", cu_k->numel());
}

// A tensor as the chosen implementation reads it, copied only where it is not so already: for
// the CPU float32 and contiguous; for the GPU a unit-stride head_dim and every other stride
// positive and a multiple of 8 elements on a 16-byte aligned base (16-byte vector copies).
at::Tensor as_kernel_input(const at::Tensor& t) {
  if (!t.is_cuda()) return t.to(at::kFloat).contiguous();
  bool readable = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) readable = readable && t.stride(i) > 0 && t.stride(i) % 8 == 0;
  // clone, not contiguous(): contiguous() keeps odd strides on dims of size 1.
  return readable ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor empty_contiguous_like(const at::Tensor& t) { return at::empty_like(t, at::MemoryFormat::Contiguous); }

flashgpt::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return flashgpt::DType::f32;
    case at::kBFloat16: return flashgpt::DType::bf16;
    case at::kHalf: return flashgpt::DType::f16;
    default: TORCH_CHECK(false, "flashgpt_attn: no attention implementation takes ", t.scalar_type());
  }
}

// Strides of a dense [b, s, h, d] or packed [total, h, d] tensor (head_dim unit-stride: as_kernel_input).
void strides_of(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  TORCH_CHECK(t.stride(-1) == 1, "flashgpt_attn: the head_dim axis must be contiguous");
  batch = varlen ? 0 : t.stride(0);
  row = t.stride(varlen ? 0 : 1);
  head = t.stride(varlen ? 1 : 2);
}

// The forward's params over tensors already checked and in kernel form; the backward adds its own.
flashgpt::AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& o, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                                      int64_t max_q, int64_t max_k, double dropout_p, double scale, bool causal,
                                      int64_t seed, int64_t offset) {
  const bool varlen = cu_q.has_value();
  flashgpt::AttentionParams p;
  p.dtype = dtype_of(q);
  p.head_dim = int(q.size(-1));
  p.heads_q = int(q.size(-2));
  p.heads_kv = int(k.size(-2));
  if (varlen) {
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

// Makes the inputs' GPU the current one for the call (allocations, stream) when they are on a GPU.
class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor& t) {
#ifdef FLASHGPT_WITH_CUDA
    if (t.is_cuda()) guard_.emplace(t.device());
#endif
  }

 private:
#ifdef FLASHGPT_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard_;
#endif
};

enum class Pass { forward, backward };

// The one place that chooses the implementation: the CUDA kernels for CUDA tensors, the CPU
// implementation otherwise. flashgpt::Error becomes a RuntimeError with the same message.
void run_attention(Pass pass, const flashgpt::AttentionParams& p, const at::Tensor& q, bool deterministic) {
  try {
    if (q.is_cuda()) {
#ifdef FLASHGPT_WITH_CUDA
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      if (pass == Pass::forward) {
        flashgpt::attention_forward_cuda(p, stream);
      } else {
        const size_t bytes = flashgpt::attention_backward_workspace_bytes(p);
        const at::Tensor ws = at::empty({int64_t(bytes) + 256}, q.options().dtype(at::kByte));
        const auto addr = reinterpret_cast<uintptr_t>(ws.data_ptr());
        void* aligned = reinterpret_cast<void*>((addr + 255) / 256 * 256);
        flashgpt::attention_backward_cuda(
            p, aligned, bytes, deterministic ? flashgpt::Determinism::deterministic : flashgpt::Determinism::fast,
            stream);
      }
#else
      TORCH_CHECK(false, kNoCuda);
#endif
    } else if (pass == Pass::forward) {
      flashgpt::attention_forward_cpu(p);
    } else {
      flashgpt::attention_backward_cpu(p);  // deterministic whatever the flag (attention_cpu.h)
    }
  } catch (const flashgpt::Error& e) {
    TORCH_CHECK(false, e.what());
  }
}

// Returns (out, lse): out like q (q's dtype), lse float32 [b, h, s] dense, [h, total] varlen.
std::vector<at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                int64_t offset) {
  check_inputs(q_in, k_in, v_in, cu_q, cu_k);
  const DeviceScope scope(q_in);
  const at::Tensor q = as_kernel_input(q_in), k = as_kernel_input(k_in), v = as_kernel_input(v_in);
  const bool varlen = cu_q.has_value();
  at::Tensor o = empty_contiguous_like(q);
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  const auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  run_attention(Pass::forward, p, q, /*deterministic=*/false);
  return {o.to(q_in.scalar_type()), lse};
}

// Returns (dq, dk, dv) in the dtypes of q, k, v. out and lse are the forward's.
std::vector<at::Tensor> backward(const at::Tensor& d_o_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                 const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse,
                                 std::optional<at::Tensor> cu_q, std::optional<at::Tensor> cu_k, int64_t max_q,
                                 int64_t max_k, double dropout_p, double scale, bool causal, int64_t seed,
                                 int64_t offset, bool deterministic) {
  check_inputs(q_in, k_in, v_in, cu_q, cu_k);
  for (const at::Tensor* t : {&d_o_in, &o_in}) {
    const char* name = t == &d_o_in ? "dout" : "out";
    TORCH_CHECK(t->device() == q_in.device() && t->sizes() == q_in.sizes(), "flashgpt_attn: ", name,
                " must have q's shape ", q_in.sizes(), " and device ", q_in.device(), ", got ", t->sizes(), " on ",
                t->device());
    TORCH_CHECK(!q_in.is_cuda() || t->scalar_type() == q_in.scalar_type(), "flashgpt_attn: ", name,
                " must have q's dtype ", q_in.scalar_type(), ", got ", t->scalar_type());
  }
  const bool varlen = cu_q.has_value();
  const auto lse_shape = varlen ? std::vector<int64_t>{q_in.size(1), q_in.size(0)}
                                : std::vector<int64_t>{q_in.size(0), q_in.size(2), q_in.size(1)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q_in.device() && lse.sizes() == at::IntArrayRef(lse_shape) &&
                  lse.stride(-1) == 1,
              "flashgpt_attn: lse must be the forward's float32 ", at::IntArrayRef(lse_shape), " on q's device, got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  const DeviceScope scope(q_in);
  const at::Tensor q = as_kernel_input(q_in), k = as_kernel_input(k_in), v = as_kernel_input(v_in);
  const at::Tensor o = as_kernel_input(o_in), d_o = as_kernel_input(d_o_in);
  at::Tensor dq = empty_contiguous_like(q), dk = empty_contiguous_like(k), dv = empty_contiguous_like(v);
  auto p = make_params(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset);
  strides_of(d_o, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  strides_of(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.d_o = d_o.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  run_attention(Pass::backward, p, q, deterministic);
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "flashgpt attention forward: CUDA kernels for CUDA tensors, the CPU implementation else");
  m.def("backward", &backward, "flashgpt attention backward: CUDA kernels for CUDA tensors, the CPU implementation else");
  m.attr("built_with_cuda") = kBuiltWithCuda;
}

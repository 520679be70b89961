// Entry points of the GPU attention (plain C++: validation and dispatch only): validate, then dispatch to the compiled instance for
// (head_dim, dtype). Instances live in src/attention/instances/, one per translation unit;
// FLASHGPT_ATTN_HDIM_<d> is defined for each head dim CMake compiled.
#include <flashgpt/attention_cuda.h>
#include <flashgpt/error.h>

#include "attention_cuda_launch.h"
#include <flashgpt/cuda_check.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace flashgpt {


namespace {

// Calls fn.template operator()<D, Element>() for the params' head dim and dtype.
template <typename Fn>
void dispatch_instance(const AttentionParams& p, Fn&& fn) {
  auto by_dtype = [&]<int D>() {
    if (p.dtype == DType::bf16) {
      fn.template operator()<D, __nv_bfloat16>();
    } else {
      fn.template operator()<D, __half>();
    }
  };
  switch (p.head_dim) {
#ifdef FLASHGPT_ATTN_HDIM_32
    case 32: by_dtype.template operator()<32>(); return;
#endif
#ifdef FLASHGPT_ATTN_HDIM_64
    case 64: by_dtype.template operator()<64>(); return;
#endif
#ifdef FLASHGPT_ATTN_HDIM_96
    case 96: by_dtype.template operator()<96>(); return;
#endif
#ifdef FLASHGPT_ATTN_HDIM_128
    case 128: by_dtype.template operator()<128>(); return;
#endif
#ifdef FLASHGPT_ATTN_HDIM_256
    case 256: by_dtype.template operator()<256>(); return;
#endif
    default: break;
  }
  FLASHGPT_FAIL("attention (CUDA): head_dim {} was not compiled into this build (FLASHGPT_ATTENTION_HEAD_DIMS)",
                p.head_dim);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_tensor(const char* name, const void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  FLASHGPT_CHECK(aligned16(ptr), "attention (CUDA): {} must be 16-byte aligned (got address {})", name, ptr);
  FLASHGPT_CHECK(batch_stride % 8 == 0 && row_stride % 8 == 0 && head_stride % 8 == 0,
                 "attention (CUDA): the strides of {} (batch {}, row {}, head {}) must be multiples of 8 elements "
                 "(16 bytes) for vector loads",
                 name, batch_stride, row_stride, head_stride);
}

void check_pointer_on_device(const char* name, const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    FLASHGPT_FAIL("attention (CUDA): {} is not a pointer CUDA knows", name);
  }
  FLASHGPT_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
                 "attention (CUDA): {} must point to device memory", name);
}

void validate_cuda(const AttentionParams& p, AttentionPass pass) {
  attention_validate(p, pass);
  FLASHGPT_CHECK(p.dtype == DType::bf16 || p.dtype == DType::f16,
                 "attention (CUDA): dtype must be bfloat16 or float16, got {}", dtype_name(p.dtype));
  FLASHGPT_CHECK(attention_cuda_head_dim_compiled(p.head_dim),
                 "attention (CUDA): head_dim {} was not compiled into this build (FLASHGPT_ATTENTION_HEAD_DIMS)",
                 p.head_dim);
  check_tensor("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  check_tensor("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  check_tensor("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  check_tensor("o", p.o, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  check_pointer_on_device("q", p.q);
  check_pointer_on_device("lse", p.lse);
  if (p.cu_seqlens_q != nullptr) {
    check_pointer_on_device("cu_seqlens_q", p.cu_seqlens_q);
    check_pointer_on_device("cu_seqlens_k", p.cu_seqlens_k);
  }
  if (pass == AttentionPass::backward) {
    check_tensor("d_o", p.d_o, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
    check_tensor("dq", p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
    check_tensor("dk", p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
    check_tensor("dv", p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
    // The wgmma backward numbers its (key block, kv head, batch entry) tiles with an int.
    const int64_t key_blocks = (int64_t{p.seqlen_k} + 63) / 64 * p.heads_kv * p.batch;
    FLASHGPT_CHECK(key_blocks <= INT32_MAX,
                   "attention (CUDA) backward: seqlen_k {} x heads_kv {} x batch {} is {} blocks of 64 keys, "
                   "more than the {} one launch can number",
                   p.seqlen_k, p.heads_kv, p.batch, key_blocks, INT32_MAX);
  }
}

int bwd_block_m_for(int head_dim) {
  switch (head_dim) {
    case 32: return attn::TileConfig<32>::kBwdBlockM;
    case 64: return attn::TileConfig<64>::kBwdBlockM;
    case 96: return attn::TileConfig<96>::kBwdBlockM;
    case 128: return attn::TileConfig<128>::kBwdBlockM;
    case 256: return attn::TileConfig<256>::kBwdBlockM;
  }
  FLASHGPT_FAIL("attention (CUDA): head_dim {} is not supported", head_dim);
}

}  // namespace

namespace attn {
namespace {
// Whether the environment variable `var` is "mma_sync": it keeps the mma.sync kernel on Hopper
// too (tests, benchmarks); any other value, "wgmma" included, is the automatic choice.
bool env_forces_mma_sync(const char* var) {
  const char* v = std::getenv(var);
  return v != nullptr && std::strcmp(v, "mma_sync") == 0;
}

// A device attribute, asked of the driver once per device (devices past kMaxDevices are asked
// every time) instead of at every launch.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // the attribute + 1; 0: not asked yet
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int answer = known[device].load(std::memory_order_relaxed);
    if (answer != 0) return answer - 1;
  }
  int value = 0;
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttribute, device));
  if (cached) known[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

int current_device() {
  int device = 0;
  FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Whether `device` is compute capability 9.0 (where sm_90a code runs).
[[maybe_unused]] bool device_is_sm90(int device) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device) == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>(device) == 0;
}

// The wgmma kernels run wherever they can: the build has sm_90a code (FLASHGPT_ATTN_SM90A),
// the current device is compute capability 9.0, the pass has a wgmma kernel for the head dim
// (the forward for 64, 96, 128 and 256, the backward for 64 and 128), and the pass's override
// does not force mma.sync.
bool wgmma_usable([[maybe_unused]] bool has_kernel, [[maybe_unused]] bool mma_sync_forced) {
#ifdef FLASHGPT_ATTN_SM90A
  if (!has_kernel || mma_sync_forced) return false;
  return device_is_sm90(current_device());
#else
  return false;
#endif
}
}  // namespace

int current_device_sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(current_device()); }

// The wgmma forward passed the GPU tests on the H100 and beat the mma.sync forward in every
// row measured, with and without dropout (d256: 1.13-1.54x FA2 where mma.sync measured
// 0.57-0.66x). The wgmma backward measured 0.90-1.15x of torch FA2 where the mma.sync one
// had measured 0.65-0.76x (separate runs). Each override is read once.
bool fwd_wgmma_selected(int head_dim) {
  static const bool forced = env_forces_mma_sync("FLASHGPT_ATTN_FWD_KERNEL");
  return wgmma_usable(head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256, forced);
}
bool bwd_wgmma_selected(int head_dim) {
  static const bool forced = env_forces_mma_sync("FLASHGPT_ATTN_BWD_KERNEL");
  return wgmma_usable(head_dim == 64 || head_dim == 128, forced);
}
}  // namespace attn

const char* attention_cuda_backward_kernel(int head_dim) {
  return attn::bwd_wgmma_selected(head_dim) ? "wgmma" : "mma.sync";
}

const char* attention_cuda_forward_kernel(int head_dim) {
  return attn::fwd_wgmma_selected(head_dim) ? "wgmma" : "mma.sync";
}

bool attention_cuda_head_dim_compiled(int head_dim) {
  switch (head_dim) {
#ifdef FLASHGPT_ATTN_HDIM_32
    case 32: return true;
#endif
#ifdef FLASHGPT_ATTN_HDIM_64
    case 64: return true;
#endif
#ifdef FLASHGPT_ATTN_HDIM_96
    case 96: return true;
#endif
#ifdef FLASHGPT_ATTN_HDIM_128
    case 128: return true;
#endif
#ifdef FLASHGPT_ATTN_HDIM_256
    case 256: return true;
#endif
    default: return false;
  }
}

void attention_forward_cuda(const AttentionParams& params, cudaStream_t stream) {
  validate_cuda(params, AttentionPass::forward);
  const float scale = attention_softmax_scale(params);
  dispatch_instance(params, [&]<int D, typename Element>() { attn::run_flash_fwd<D, Element>(params, scale, stream); });
}

size_t attention_backward_workspace_bytes(const AttentionParams& params) {
  return attn::bwd_workspace_bytes(params, bwd_block_m_for(params.head_dim));
}

void attention_backward_cuda(const AttentionParams& params, void* workspace, size_t workspace_bytes,
                             Determinism determinism, cudaStream_t stream) {
  validate_cuda(params, AttentionPass::backward);
  const size_t needed = attention_backward_workspace_bytes(params);
  FLASHGPT_CHECK(workspace_bytes >= needed,
                 "attention backward (CUDA): the workspace has {} bytes but these shapes need {} "
                 "(attention_backward_workspace_bytes)",
                 workspace_bytes, needed);
  FLASHGPT_CHECK(needed == 0 || (workspace != nullptr && reinterpret_cast<uintptr_t>(workspace) % 256 == 0),
                 "attention backward (CUDA): the workspace must be a non-null, 256-byte aligned device pointer");
  const float scale = attention_softmax_scale(params);
  const bool deterministic = determinism == Determinism::deterministic;
  dispatch_instance(params, [&]<int D, typename Element>() {
    attn::run_flash_bwd<D, Element>(params, scale, workspace, deterministic, stream);
  });
}

}  // namespace flashgpt

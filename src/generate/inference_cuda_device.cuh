// Device helpers shared by the CUDA inference engine's kernels (inference_cuda_kernels.cu)
// and its persistent decode kernel (decode_persistent.cu): programmatic dependent launch,
// warp reductions, eight bf16 to float, L2 prefetches, GELU (tanh), the model's
// activation, and bulk copies into shared memory on an mbarrier. Private to src/generate/;
// nvcc only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace flashgpt::inference_cuda {

// Programmatic dependent launch (sm_90+): a kernel launched with the attribute may start
// while the previous kernel in the stream still runs; pdl_wait() blocks until that kernel
// has finished and its memory is visible (a no-op when launched without the attribute),
// pdl_launch_dependents() lets the next kernel start launching. Every kernel of the fused
// path calls pdl_wait() before it reads anything an earlier kernel wrote and before it
// exits, so completion stays ordered down the whole chain.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// The sum of v over a block of kWarps warps, the warps' sums added in warp order (the same
// bits every run); red: kWarps floats of shared memory. Every thread calls it and gets the total.
template <int kWarps>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red's earlier readers are done
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// The eight bf16 of a 16-byte load, as floats.
__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}
// Brings the 128-byte line holding p toward L2 (no register, no wait). Safe on memory
// another kernel may still write: L2 is the point of coherence, only L1 could go stale.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
// The same with the evict-last priority: the line stays in L2 while lines of normal priority
// (the streamed layer weights) can be evicted instead.
__device__ __forceinline__ void prefetch_l2_evict_last(const void* p) {
  asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}
// Brings bytes from p toward L2 with the evict-last priority, one prefetch per 128-byte
// line, the lines dealt over the grid's threads (`thread` of `threads`; at most a few lines
// each for a layer's matrix): no register kept, nothing to wait for, a hint only.
__device__ __forceinline__ void prefetch_l2_range(const void* p, int64_t bytes, int64_t thread, int64_t threads) {
  if (!p) return;
  const char* base = static_cast<const char*>(p);
  for (int64_t at = thread * 128; at < bytes; at += threads * 128) prefetch_l2_evict_last(base + at);
}
__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// ---- shared-memory copies completing on an mbarrier (sm_90) ----------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// After mbar_init and before the barrier's first use by the copy engine (the async proxy).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// Orders this thread's earlier shared-memory accesses before its later async-proxy ones
// (bulk copies), e.g. before a buffer that was read is overwritten by the next copy.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// Global -> shared, `bytes` (a multiple of 16, both addresses 16-byte aligned), completing
// on `bar` as transaction bytes.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// Block b's output rows of a product of `out` rows over a grid of G blocks: one contiguous
// run, so its rows of a row-major W are one contiguous run of bytes.
struct Slice {
  int64_t row0;
  int rows;
};
__host__ __device__ inline Slice slice_of(int out, int b, int G) {
  const int64_t r0 = static_cast<int64_t>(b) * out / G, r1 = static_cast<int64_t>(b + 1) * out / G;
  return {r0, static_cast<int>(r1 - r0)};
}

}  // namespace flashgpt::inference_cuda

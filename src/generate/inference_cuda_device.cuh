// Device helpers shared by the CUDA inference engine's kernels (inference_cuda_kernels.cu)
// and its persistent decode kernel (decode_persistent.cu): warp reductions, eight bf16 to
// float, and GELU (tanh), the model's activation. Private to src/generate/; nvcc only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace flashgpt::inference_cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
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
__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

}  // namespace flashgpt::inference_cuda

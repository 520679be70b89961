// The embedding and the residual sites with their dropout (model.h's convention): channel
// c of token n at site s is kept when dropout_keep(DropoutRng{seed, step}, s, n, c, t).
// One thread owns 16 neighbouring channels of one token, the 16 bytes one Philox call
// yields, so each random word is drawn once. Nothing is stored for the backward: it draws
// the same words again.
//
//   encoder forward:   x0[n, c] = drop(wte[tokens[n], c] + wpe[n % T, c])   (N, C) fp32
//   residual forward:  out[n, c] = in[n, c] + drop(y[n, c])                  (N, C) fp32, y bf16
//   dropout backward:  dy[n, c] = keep ? dout[n, c] * scale : 0              (N, C) -> bf16 or fp32
#pragma once

#include <flashgpt/philox.h>

#include "gpt_cuda_ops.h"
#include "common.cuh"

namespace flashgpt::model_cuda {

// Keep mask of the 16 channels 16 g .. 16 g + 15 of token n, as bits.
__device__ __forceinline__ uint32_t dropout_keep_bits(const DropoutSite& d, int64_t n, int64_t g) {
  if (d.threshold == 0) return 0xFFFFu;
  const DropoutRng rng = d.seed_step != nullptr ? DropoutRng{__ldg(d.seed_step), __ldg(d.seed_step + 1)}
                                                 : DropoutRng{d.seed, d.step};
  const Philox4x32 words = dropout_random_words(rng, d.site, n, g);
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < 16; ++k) bits |= (dropout_keep_byte(dropout_byte(words, k), d.threshold) ? 1u : 0u) << k;
  return bits;
}

// The residual kernels add its result with __fadd_rn: never contracted with the multiply into
// an FMA, so every kernel that adds a residual (residual_forward, the fused residual +
// LayerNorm) gives the same bits whatever the compiler does around it.
__device__ __forceinline__ float dropout_apply(float v, uint32_t bits, int k, const DropoutSite& d) {
  return d.threshold == 0 ? v : ((bits >> k) & 1u) ? v * d.scale : 0.0f;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ void store16(float* p, const float (&v)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) reinterpret_cast<float4*>(p)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
__device__ __forceinline__ void store16(bf16* p, const float (&v)[16]) {
  uint4 raw[2];
  bf16* b = reinterpret_cast<bf16*>(raw);
#pragma unroll
  for (int k = 0; k < 16; ++k) b[k] = __float2bfloat16_rn(v[k]);
  reinterpret_cast<uint4*>(p)[0] = raw[0];
  reinterpret_cast<uint4*>(p)[1] = raw[1];
}

// ---- kernels ----

__global__ void encoder_forward_kernel(float* __restrict__ out, const int32_t* __restrict__ tokens,
                                       const float* __restrict__ wte, const float* __restrict__ wpe, int64_t N,
                                       int T, int C, DropoutSite d) {
  const int groups = (C + 15) / 16;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= N * groups) return;
  const int64_t n = idx / groups;
  const int g = static_cast<int>(idx % groups);
  const int64_t t = n % T;
  const float* te = wte + int64_t{tokens[n]} * C;
  const float* pe = wpe + t * C;
  const uint32_t bits = dropout_keep_bits(d, n, g);
  if (C % 16 == 0) {  // 16-byte vectors
    float v[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 a = reinterpret_cast<const float4*>(te + g * 16)[i];
      const float4 b = reinterpret_cast<const float4*>(pe + g * 16)[i];
      v[4 * i] = a.x + b.x, v[4 * i + 1] = a.y + b.y, v[4 * i + 2] = a.z + b.z, v[4 * i + 3] = a.w + b.w;
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = dropout_apply(v[k], bits, k, d);
    store16(out + n * C + g * 16, v);
    return;
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const int c = g * 16 + k;
    if (c < C) out[n * C + c] = dropout_apply(te[c] + pe[c], bits, k, d);
  }
}

__global__ void residual_forward_kernel(float* __restrict__ out, const float* __restrict__ in,
                                        const bf16* __restrict__ y, int64_t N, int C, DropoutSite d) {
  const int groups = (C + 15) / 16;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= N * groups) return;
  const int64_t n = idx / groups;
  const int g = static_cast<int>(idx % groups);
  const uint32_t bits = dropout_keep_bits(d, n, g);
  const int64_t base = n * C + g * 16;
  if (C % 16 == 0) {  // 16-byte vectors: four float4 of in/out, two of y
    float4 a[4];
    uint4 yv[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = reinterpret_cast<const float4*>(in + base)[i];
#pragma unroll
    for (int i = 0; i < 2; ++i) yv[i] = reinterpret_cast<const uint4*>(y + base)[i];
    const bf16* yb = reinterpret_cast<const bf16*>(yv);
    float* af = reinterpret_cast<float*>(a);
#pragma unroll
    for (int k = 0; k < 16; ++k) af[k] = __fadd_rn(af[k], dropout_apply(__bfloat162float(yb[k]), bits, k, d));
#pragma unroll
    for (int i = 0; i < 4; ++i) reinterpret_cast<float4*>(out + base)[i] = a[i];
    return;
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const int c = g * 16 + k;
    if (c < C) out[n * C + c] = __fadd_rn(in[n * C + c], dropout_apply(__bfloat162float(y[n * C + c]), bits, k, d));
  }
}

template <typename Out>
__global__ void dropout_backward_kernel(Out* dy, const float* dout, int64_t N, int C, DropoutSite d) {
  // dy may equal dout (in place): each thread reads its 16 values before it writes them.
  const int groups = (C + 15) / 16;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= N * groups) return;
  const int64_t n = idx / groups;
  const int g = static_cast<int>(idx % groups);
  const uint32_t bits = dropout_keep_bits(d, n, g);
  if (C % 16 == 0) {  // 16-byte vectors
    const int64_t base = n * C + g * 16;
    float v[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(dout + base)[i];
      v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = dropout_apply(v[k], bits, k, d);
    store16(dy + base, v);
    return;
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const int c = g * 16 + k;
    if (c < C) store_as(dy + n * C + c, dropout_apply(dout[n * C + c], bits, k, d));
  }
}

// dwpe[t, c] += sum over b of dx0[b T + t, c] (dx0 already through the dropout backward),
// the batch entries summed in order: no atomics.
__global__ void encoder_backward_wpe_kernel(float* __restrict__ dwpe, const float* __restrict__ dx0, int B, int T,
                                            int C) {
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= int64_t{T} * C) return;
  const int64_t t = idx / C, c = idx % C;
  float sum = 0.0f;
  for (int b = 0; b < B; ++b) sum += dx0[(int64_t{b} * T + t) * C + c];
  dwpe[t * C + c] += sum;
}

// dwte[token u, c] += sum of dx0[n, c] over the positions n holding u, in increasing n.
// One block per distinct token (grid sized for the worst case; blocks past *unique_count
// return). unique_tokens[i], and positions[starts[i] .. starts[i + 1]) come from the host.
__global__ void encoder_backward_wte_kernel(float* __restrict__ dwte, const float* __restrict__ dx0,
                                            const int32_t* __restrict__ unique_tokens,
                                            const int32_t* __restrict__ starts, const int32_t* __restrict__ positions,
                                            const int32_t* __restrict__ unique_count, int C) {
  const int i = blockIdx.x;
  if (i >= *unique_count) return;
  const int64_t row = unique_tokens[i];
  const int begin = starts[i], end = starts[i + 1];
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float sum = 0.0f;
    for (int j = begin; j < end; ++j) sum += dx0[int64_t{positions[j]} * C + c];
    dwte[row * C + c] += sum;
  }
}

// ---- launchers ----

inline void encoder_forward_launch(float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t N,
                                   int T, int C, const DropoutSite& d, cudaStream_t stream) {
  const int64_t threads = N * ((C + 15) / 16);
  encoder_forward_kernel<<<ceil_div(threads, 256), 256, 0, stream>>>(out, tokens, wte, wpe, N, T, C, d);
}

inline void residual_forward_launch(float* out, const float* in, const bf16* y, int64_t N, int C,
                                    const DropoutSite& d, cudaStream_t stream) {
  const int64_t threads = N * ((C + 15) / 16);
  residual_forward_kernel<<<ceil_div(threads, 256), 256, 0, stream>>>(out, in, y, N, C, d);
}

template <typename Out>
void dropout_backward_launch(Out* dy, const float* dout, int64_t N, int C, const DropoutSite& d,
                             cudaStream_t stream) {
  const int64_t threads = N * ((C + 15) / 16);
  dropout_backward_kernel<Out><<<ceil_div(threads, 256), 256, 0, stream>>>(dy, dout, N, C, d);
}

inline void encoder_backward_wpe_launch(float* dwpe, const float* dx0, int B, int T, int C, cudaStream_t stream) {
  encoder_backward_wpe_kernel<<<ceil_div(int64_t{T} * C, 256), 256, 0, stream>>>(dwpe, dx0, B, T, C);
}

inline void encoder_backward_wte_launch(float* dwte, const float* dx0, const int32_t* unique_tokens,
                                        const int32_t* starts, const int32_t* positions,
                                        const int32_t* unique_count, int64_t max_unique, int C,
                                        cudaStream_t stream) {
  if (max_unique <= 0) return;
  encoder_backward_wte_kernel<<<static_cast<unsigned>(max_unique), 128, 0, stream>>>(
      dwte, dx0, unique_tokens, starts, positions, unique_count, C);
}

}  // namespace flashgpt::model_cuda

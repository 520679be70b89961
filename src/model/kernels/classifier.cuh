// The fused classifier's pointwise part, on one chunk of rows of bf16 logits (R, Vp) that
// cuBLASLt just wrote: per row, softmax over the first V columns, the cross-entropy of the
// target, and (with gradients) dlogits = (softmax - onehot(target)) * dloss written in place
// over the logits, the padding columns V..Vp-1 set to 0. One block per row, which reads the
// row twice (max and sum, then the gradient) and writes it once. A variant that kept the row
// in shared memory and read it once was slower at V = 100277 (docs/model_gpu.md).
#pragma once

#include "common.cuh"

#include <algorithm>

namespace flashgpt::model_cuda {

constexpr int kClassifierThreads = 512;

template <bool kWriteGrad>
__global__ void __launch_bounds__(kClassifierThreads)
    classifier_kernel(bf16* __restrict__ logits, float* __restrict__ losses, const int32_t* __restrict__ targets,
                      int64_t V, int64_t Vp, float dloss) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * Vp;
  // Online max and sum of exp over the real vocabulary, 8 columns (16 bytes) at a time.
  float m = -INFINITY, s = 0.0f;
  const int64_t vec_end = V / 8 * 8;
  for (int64_t c = int64_t{threadIdx.x} * 8; c < vec_end; c += int64_t{blockDim.x} * 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    const bf16* v = reinterpret_cast<const bf16*>(&raw);
    float local_max = __bfloat162float(v[0]);
#pragma unroll
    for (int k = 1; k < 8; ++k) local_max = fmaxf(local_max, __bfloat162float(v[k]));
    const float new_m = fmaxf(m, local_max);
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) add += __expf(__bfloat162float(v[k]) - new_m);
    s = s * __expf(m - new_m) + add;
    m = new_m;
  }
  for (int64_t c = vec_end + threadIdx.x; c < V; c += blockDim.x) {
    const float x = __bfloat162float(row[c]);
    const float new_m = fmaxf(m, x);
    s = s * __expf(m - new_m) + __expf(x - new_m);
    m = new_m;
  }
  const float row_max = block_max(m, scratch);
  const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - row_max), scratch);
  const float lse = row_max + __logf(row_sum);
  const int64_t target = targets[r];
  const float target_logit = __bfloat162float(row[target]);
  if (threadIdx.x == 0) losses[r] = lse - target_logit;
  if (!kWriteGrad) return;
  __syncthreads();  // every thread has read row[target] before it is overwritten
  for (int64_t c = int64_t{threadIdx.x} * 8; c < Vp; c += int64_t{blockDim.x} * 8) {
    uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    bf16* v = reinterpret_cast<bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t col = c + k;
      float g = 0.0f;
      if (col < V) g = (__expf(__bfloat162float(v[k]) - lse) - (col == target ? 1.0f : 0.0f)) * dloss;
      v[k] = __float2bfloat16_rn(g);
    }
    *reinterpret_cast<uint4*>(row + c) = raw;
  }
}

// sum over losses[0 .. n) in double, in a fixed order (one block): *out = sum.
__global__ void loss_sum_kernel(double* __restrict__ out, const float* __restrict__ losses, int64_t n) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

// ---- launchers ----

// rows: the chunk's rows; logits (rows, Vp) with Vp % 8 == 0; targets, losses: (rows).
inline void classifier_launch(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V,
                              int64_t Vp, float dloss, bool write_grad, cudaStream_t stream) {
  if (rows <= 0) return;
  if (write_grad) {
    classifier_kernel<true><<<static_cast<unsigned>(rows), kClassifierThreads, 0, stream>>>(logits, losses, targets, V,
                                                                                            Vp, dloss);
  } else {
    classifier_kernel<false><<<static_cast<unsigned>(rows), kClassifierThreads, 0, stream>>>(logits, losses, targets,
                                                                                             V, Vp, dloss);
  }
}

inline void loss_sum_launch(double* out, const float* losses, int64_t n, cudaStream_t stream) {
  loss_sum_kernel<<<1, 1024, 0, stream>>>(out, losses, n);
}

}  // namespace flashgpt::model_cuda

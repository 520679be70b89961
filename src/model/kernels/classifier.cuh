// The fused classifier's pointwise part, on one chunk of rows of bf16 logits (R, Vp) that
// cuBLASLt just wrote: per row, softmax over the first V columns, the cross-entropy of the
// target, and (with gradients) dlogits = (softmax - onehot(target)) * dloss written in place
// over the logits, the padding columns V..Vp-1 set to 0. One block per row.
// classifier_smem_kernel (the default where the row fits in shared memory: Vp up to ~113k
// on an H100) reads the row from global memory once, into shared memory, and computes
// from there; classifier_kernel (the fallback) reads it twice (max/sum, then the gradient).
// Both write it once.
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

constexpr int kClassifierSmemThreads = 1024;

template <bool kWriteGrad>
__global__ void __launch_bounds__(kClassifierSmemThreads)
    classifier_smem_kernel(bf16* __restrict__ logits, float* __restrict__ losses, const int32_t* __restrict__ targets,
                           int64_t V, int64_t Vp, float dloss) {
  extern __shared__ uint4 srow[];  // (Vp / 8) vectors of 8 bf16: the row
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * Vp;
  const int vectors = static_cast<int>(Vp / 8);
  // One pass over global memory: 4 independent 16-byte loads in flight per thread.
  const uint4* grow = reinterpret_cast<const uint4*>(row);
  int i = threadIdx.x;
  for (; i + 3 * kClassifierSmemThreads < vectors; i += 4 * kClassifierSmemThreads) {
    const uint4 a = grow[i], b = grow[i + kClassifierSmemThreads], c = grow[i + 2 * kClassifierSmemThreads],
                d = grow[i + 3 * kClassifierSmemThreads];
    srow[i] = a;
    srow[i + kClassifierSmemThreads] = b;
    srow[i + 2 * kClassifierSmemThreads] = c;
    srow[i + 3 * kClassifierSmemThreads] = d;
  }
  for (; i < vectors; i += kClassifierSmemThreads) srow[i] = grow[i];
  __syncthreads();
  // Online max and sum of exp over the real vocabulary, from shared memory.
  const bf16* srow_h = reinterpret_cast<const bf16*>(srow);
  float m = -INFINITY, s = 0.0f;
  const int full = static_cast<int>(V / 8);
  for (int v8 = threadIdx.x; v8 < full; v8 += kClassifierSmemThreads) {
    const uint4 raw = srow[v8];
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
  for (int64_t c = int64_t{full} * 8 + threadIdx.x; c < V; c += kClassifierSmemThreads) {
    const float x = __bfloat162float(srow_h[c]);
    const float new_m = fmaxf(m, x);
    s = s * __expf(m - new_m) + __expf(x - new_m);
    m = new_m;
  }
  const float row_max = block_max(m, scratch);
  const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - row_max), scratch);
  const float lse = row_max + __logf(row_sum);
  const int64_t target = targets[r];
  if (threadIdx.x == 0) losses[r] = lse - __bfloat162float(srow_h[target]);
  if (!kWriteGrad) return;
  uint4* gout = reinterpret_cast<uint4*>(row);
  for (int v8 = threadIdx.x; v8 < vectors; v8 += kClassifierSmemThreads) {
    uint4 raw = srow[v8];
    bf16* v = reinterpret_cast<bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t col = int64_t{v8} * 8 + k;
      float g = 0.0f;
      if (col < V) g = (__expf(__bfloat162float(v[k]) - lse) - (col == target ? 1.0f : 0.0f)) * dloss;
      v[k] = __float2bfloat16_rn(g);
    }
    gout[v8] = raw;
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

// The dynamic shared memory classifier_smem_kernel needs for Vp columns, if the device
// allows it (0 otherwise); sets the kernels' limit once.
inline size_t classifier_smem_bytes(int64_t Vp) {
  static const int optin = [] {
    int device = 0, bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return 0;
    }
    bytes -= 1024;  // the kernel's static scratch and the runtime's reserve
    if (cudaFuncSetAttribute(classifier_smem_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) !=
            cudaSuccess ||
        cudaFuncSetAttribute(classifier_smem_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) !=
            cudaSuccess) {
      return 0;
    }
    return bytes;
  }();
  const size_t need = size_t(Vp) * 2;
  return need <= size_t(std::max(optin, 0)) ? need : 0;
}

// rows: the chunk's rows; logits (rows, Vp) with Vp % 8 == 0; targets, losses: (rows).
// row_in_shared: use classifier_smem_kernel where the row fits.
inline void classifier_launch(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V,
                              int64_t Vp, float dloss, bool write_grad, bool row_in_shared, cudaStream_t stream) {
  if (rows <= 0) return;
  if (const size_t smem = row_in_shared ? classifier_smem_bytes(Vp) : 0; smem > 0) {
    if (write_grad) {
      classifier_smem_kernel<true><<<static_cast<unsigned>(rows), kClassifierSmemThreads, smem, stream>>>(
          logits, losses, targets, V, Vp, dloss);
    } else {
      classifier_smem_kernel<false><<<static_cast<unsigned>(rows), kClassifierSmemThreads, smem, stream>>>(
          logits, losses, targets, V, Vp, dloss);
    }
    return;
  }
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

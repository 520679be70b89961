// The parameter-wide kernels: AdamW over the whole flat buffer in one launch (refreshing
// the bf16 copy of the weights as it goes), the global gradient norm, bias gradients as
// column sums of a bf16 matrix, and fp32 -> bf16 conversion. Every reduction here runs in
// an order fixed by the launch shape: no atomics, the same bits on every run.
#pragma once

#include "gpt_cuda_ops.h"
#include "common.cuh"

#include <algorithm>
#include <initializer_list>

namespace flashgpt::model_cuda {

// torch.optim.AdamW's update of one element: p *= 1 - lr wd (decayed tensors), m, v moments
// of g * grad_scale, p -= lr * (m / bc1) / (sqrt(v / bc2) + eps). Both kernels below call it,
// so they compute the same bits.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float grad, bool decay,
                                              const AdamWArgs& a) {
  const float g = grad * a.grad_scale;
  m = a.beta1 * m + (1.0f - a.beta1) * g;
  v = a.beta2 * v + (1.0f - a.beta2) * g * g;
  if (decay) p *= 1.0f - a.lr * a.weight_decay;
  p -= a.lr * (m / a.bias_correction1) / (sqrtf(v / a.bias_correction2) + a.eps);
}

__global__ void adamw_kernel(float* __restrict__ params, bf16* __restrict__ params_bf16, const float* __restrict__ grads,
                             float* __restrict__ m, float* __restrict__ v, int64_t n, ParamSegments segments,
                             AdamWArgs a) {
  int seg = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    while (seg + 1 < segments.count && i >= segments.end[seg]) ++seg;
    float p = params[i], mi = m[i], vi = v[i];
    adamw_element(p, mi, vi, grads[i], segments.decay[seg], a);
    m[i] = mi;
    v[i] = vi;
    params[i] = p;
    params_bf16[i] = __float2bfloat16_rn(p);
  }
}

// The same, 4 elements (16 bytes of each fp32 array, 8 of the bf16 copy) per thread and
// iteration, for n % 4 == 0, every segment end % 4 == 0 and aligned arrays (adamw_vec4_fits).
__global__ void adamw_vec4_kernel(float* __restrict__ params, bf16* __restrict__ params_bf16,
                                  const float* __restrict__ grads, float* __restrict__ m, float* __restrict__ v,
                                  int64_t n, ParamSegments segments, AdamWArgs a) {
  int seg = 0;
  const int64_t quads = n / 4;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < quads; q += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = q * 4;
    while (seg + 1 < segments.count && i >= segments.end[seg]) ++seg;
    const float4 g4 = reinterpret_cast<const float4*>(grads)[q];
    float4 p4 = reinterpret_cast<const float4*>(params)[q];
    float4 m4 = reinterpret_cast<const float4*>(m)[q];
    float4 v4 = reinterpret_cast<const float4*>(v)[q];
    const bool decay = segments.decay[seg];
    adamw_element(p4.x, m4.x, v4.x, g4.x, decay, a);
    adamw_element(p4.y, m4.y, v4.y, g4.y, decay, a);
    adamw_element(p4.z, m4.z, v4.z, g4.z, decay, a);
    adamw_element(p4.w, m4.w, v4.w, g4.w, decay, a);
    reinterpret_cast<float4*>(m)[q] = m4;
    reinterpret_cast<float4*>(v)[q] = v4;
    reinterpret_cast<float4*>(params)[q] = p4;
    uint2 raw;
    bf16* b = reinterpret_cast<bf16*>(&raw);
    b[0] = __float2bfloat16_rn(p4.x), b[1] = __float2bfloat16_rn(p4.y);
    b[2] = __float2bfloat16_rn(p4.z), b[3] = __float2bfloat16_rn(p4.w);
    reinterpret_cast<uint2*>(params_bf16)[q] = raw;
  }
}

// partial[block] = sum of squares of this block's grid-stride share, in double.
__global__ void sum_squares_kernel(double* __restrict__ partial, const float* __restrict__ x, int64_t n) {
  __shared__ double scratch[32];
  float s = 0.0f;
  double total = 0.0;
  int64_t count = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    s += x[i] * x[i];
    if (++count == 256) {  // keep the float partial short
      total += s;
      s = 0.0f;
      count = 0;
    }
  }
  total = block_sum(total + s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// The same for n % 4 == 0 and a 16-byte aligned x: one float4 per thread and iteration (four
// times the bytes in flight), the float partial flushed every 64 vectors (256 elements).
__global__ void sum_squares_vec4_kernel(double* __restrict__ partial, const float* __restrict__ x, int64_t n) {
  __shared__ double scratch[32];
  float s = 0.0f;
  double total = 0.0;
  int count = 0;
  const int64_t quads = n / 4;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < quads; q += int64_t{gridDim.x} * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(x)[q];
    s += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
    if (++count == 64) {  // keep the float partial short
      total += s;
      s = 0.0f;
      count = 0;
    }
  }
  total = block_sum(total + s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void sum_partials_kernel(double* __restrict__ out, const double* __restrict__ partial, int blocks) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

// Column sums of x (N, M) bf16, stage 1: block (32, 8) covers 32 columns; block row gy sums
// rows gy * 8 + threadIdx.y, then every gridDim.y * 8 rows on, into partial[gy, col].
__global__ void column_sum_kernel(float* __restrict__ partial, const bf16* __restrict__ x, int64_t N, int M) {
  __shared__ float sums[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.0f;
  if (col < M) {
    for (int64_t r = blockIdx.y * int64_t{8} + threadIdx.y; r < N; r += int64_t{gridDim.y} * 8)
      s += __bfloat162float(x[r * M + col]);
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < M) {
    float t = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += sums[k][threadIdx.x];
    partial[int64_t{blockIdx.y} * M + col] = t;
  }
}

// The same for M % 8 == 0 and 16-byte aligned rows: each thread sums 8 neighbouring columns
// (one 16-byte load per row), a block (32, 8) covers 256 columns.
__global__ void column_sum_vec8_kernel(float* __restrict__ partial, const bf16* __restrict__ x, int64_t N, int M) {
  __shared__ float sums[8][32 * 8 + 1];
  const int col0 = (blockIdx.x * 32 + threadIdx.x) * 8;
  float s[8] = {};
  if (col0 < M) {
    // Four rows' loads in flight at once, then their additions in row order (the same order,
    // so the same bits, as one row at a time); the rows left over one at a time.
    const int64_t step = int64_t{gridDim.y} * 8;
    int64_t r = blockIdx.y * int64_t{8} + threadIdx.y;
    for (; r + 3 * step < N; r += 4 * step) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) raw[u] = *reinterpret_cast<const uint4*>(x + (r + u * step) * M + col0);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bf16* v = reinterpret_cast<const bf16*>(&raw[u]);
#pragma unroll
        for (int k = 0; k < 8; ++k) s[k] += __bfloat162float(v[k]);
      }
    }
    for (; r < N; r += step) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + r * M + col0);
      const bf16* v = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] += __bfloat162float(v[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) sums[threadIdx.y][threadIdx.x * 8 + k] = s[k];
  __syncthreads();
  // 256 threads, 256 columns: thread t adds the 8 row lanes of column t of this block.
  const int t = threadIdx.y * 32 + threadIdx.x;
  const int col = blockIdx.x * 256 + t;
  if (col < M) {
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += sums[k][t];
    partial[int64_t{blockIdx.y} * M + col] = total;
  }
}

// Stage 2: out[col] += sum over row blocks of partial[gy, col], in gy order.
__global__ void column_sum_reduce_kernel(float* __restrict__ out, const float* __restrict__ partial, int row_blocks,
                                         int M) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= M) return;
  float s = 0.0f;
  for (int k = 0; k < row_blocks; ++k) s += partial[int64_t{k} * M + col];
  out[col] += s;
}

__global__ void float_to_bf16_kernel(bf16* __restrict__ out, const float* __restrict__ in, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// The bias-ones weight gradient (gpt_cuda.cc, FLASHGPT_BIAS_ONES): ext (out, ld) fp32 holds
// dY^T [x | 1 | 0 ...], so row o has dW's row o in its first `in` columns and the bias
// gradient of o in column `in`. dw (out, in) and db (out) get them, added (kAccumulate) or
// written. Thread i of the grid takes element i of dw; the one at column 0 of a row also
// takes db. kVec4: four neighbouring elements per thread (in % 4 == 0, ld % 4 == 0, 16-byte
// aligned dw and ext).
template <bool kAccumulate, bool kVec4>
__global__ void split_weight_bias_grad_kernel(float* __restrict__ dw, float* __restrict__ db,
                                              const float* __restrict__ ext, int64_t out, int in, int64_t ld) {
  constexpr int kWidth = kVec4 ? 4 : 1;
  const int row_items = in / kWidth;
  const int64_t n = out * row_items;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = i / row_items;
    const int c = static_cast<int>(i % row_items) * kWidth;
    const float* e = ext + o * ld;
    float* d = dw + o * in + c;
    if constexpr (kVec4) {
      float4 v = *reinterpret_cast<const float4*>(e + c);
      if constexpr (kAccumulate) {
        const float4 old = *reinterpret_cast<const float4*>(d);
        v.x += old.x, v.y += old.y, v.z += old.z, v.w += old.w;
      }
      *reinterpret_cast<float4*>(d) = v;
    } else {
      *d = kAccumulate ? *d + e[c] : e[c];
    }
    if (c == 0) db[o] = kAccumulate ? db[o] + e[in] : e[in];
  }
}

// x[r, c] (rows, ld) bf16 = 1 for c == C, 0 for C < c < ld: the constant columns after the
// C channels of a LayerNorm output (FLASHGPT_BIAS_ONES).
__global__ void write_ones_column_kernel(bf16* __restrict__ x, int64_t rows, int C, int64_t ld) {
  const int64_t width = ld - C;
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % width;
    x[(i / width) * ld + C + c] = __float2bfloat16_rn(c == 0 ? 1.0f : 0.0f);
  }
}

// out[r, j] (rows, width) fp32 += in[r * in_stride + j].
template <typename In>
__global__ void add_rows_kernel(float* __restrict__ out, const In* __restrict__ in, int64_t rows, int64_t width,
                                int64_t in_stride) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] += static_cast<float>(in[(i / width) * in_stride + i % width]);
}

// ---- launchers ----

constexpr int kNormBlocks = 1024;      // partial sums of the gradient norm
constexpr int kColumnRowBlocks = 256;  // row blocks of the column sums (enough blocks to fill the GPU at M = 768)

inline void adamw_launch(float* params, bf16* params_bf16, const float* grads, float* m, float* v, int64_t n,
                         const ParamSegments& segments, const AdamWArgs& args, int sm_count, cudaStream_t stream) {
  bool vec4 = n % 4 == 0;
  for (int i = 0; i < segments.count; ++i) vec4 = vec4 && segments.end[i] % 4 == 0;
  for (const void* p : {static_cast<const void*>(params), static_cast<const void*>(grads), static_cast<const void*>(m),
                        static_cast<const void*>(v)})
    vec4 = vec4 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  vec4 = vec4 && reinterpret_cast<uintptr_t>(params_bf16) % 8 == 0;
  if (vec4) {
    const int64_t blocks = std::min<int64_t>(ceil_div(n / 4, 256), int64_t{sm_count} * 8);
    if (blocks > 0)
      adamw_vec4_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(params, params_bf16, grads, m, v, n,
                                                                           segments, args);
    return;
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), int64_t{sm_count} * 16);
  adamw_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(params, params_bf16, grads, m, v, n, segments, args);
}

// partial: kNormBlocks doubles; out: one double, the sum of squares.
inline void sum_squares_launch(double* out, double* partial, const float* x, int64_t n, cudaStream_t stream) {
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    sum_squares_vec4_kernel<<<kNormBlocks, 256, 0, stream>>>(partial, x, n);
  } else {
    sum_squares_kernel<<<kNormBlocks, 256, 0, stream>>>(partial, x, n);
  }
  sum_partials_kernel<<<1, 1024, 0, stream>>>(out, partial, kNormBlocks);
}

// out (M) += column sums of x (N, M); partial: kColumnRowBlocks * M floats.
inline void column_sum_launch(float* out, float* partial, const bf16* x, int64_t N, int M, cudaStream_t stream) {
  const int row_blocks = static_cast<int>(std::min<int64_t>(kColumnRowBlocks, std::max<int64_t>(1, (N + 7) / 8)));
  if (M % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const dim3 grid(ceil_div(M, 256), row_blocks);
    column_sum_vec8_kernel<<<grid, dim3(32, 8), 0, stream>>>(partial, x, N, M);
  } else {
    const dim3 grid(ceil_div(M, 32), row_blocks);
    column_sum_kernel<<<grid, dim3(32, 8), 0, stream>>>(partial, x, N, M);
  }
  column_sum_reduce_kernel<<<ceil_div(M, 256), 256, 0, stream>>>(out, partial, row_blocks, M);
}

template <typename In>
inline void add_rows_launch(float* out, const In* in, int64_t rows, int64_t width, int64_t in_stride,
                            cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(rows * width, 256), 4096);
  add_rows_kernel<<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(out, in, rows, width,
                                                                                          in_stride);
}

inline void split_weight_bias_grad_launch(float* dw, float* db, const float* ext, int64_t out, int in, int64_t ld,
                                         bool accumulate, int sm_count, cudaStream_t stream) {
  const bool vec4 = in % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(dw) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(ext) % 16 == 0;
  const int64_t items = out * (vec4 ? in / 4 : in);
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, 256), 1, int64_t{sm_count} * 8));
  if (vec4) {
    if (accumulate) {
      split_weight_bias_grad_kernel<true, true><<<blocks, 256, 0, stream>>>(dw, db, ext, out, in, ld);
    } else {
      split_weight_bias_grad_kernel<false, true><<<blocks, 256, 0, stream>>>(dw, db, ext, out, in, ld);
    }
  } else if (accumulate) {
    split_weight_bias_grad_kernel<true, false><<<blocks, 256, 0, stream>>>(dw, db, ext, out, in, ld);
  } else {
    split_weight_bias_grad_kernel<false, false><<<blocks, 256, 0, stream>>>(dw, db, ext, out, in, ld);
  }
}

inline void write_ones_column_launch(bf16* x, int64_t rows, int C, int64_t ld, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(rows * (ld - C), 256), 4096);
  write_ones_column_kernel<<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(x, rows, C, ld);
}

inline void float_to_bf16_launch(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  float_to_bf16_kernel<<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(out, in, n);
}

}  // namespace flashgpt::model_cuda

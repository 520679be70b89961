// LayerNorm over the channels of fp32 rows (the residual stream), bf16 output for the
// matmuls, mean and 1/std kept for the backward. One warp per row.
//
//   forward:  out[n, c] = (x[n, c] - mean[n]) * rstd[n] * w[c] + b[c]      x (N, C) fp32, out bf16
//             with rows ld >= C apart (the columns from C on are not touched)
//   backward: dx[n, :] (+)= rstd (dy w - mean(dy w) - xhat mean(dy w xhat))  dy (N, C) bf16, dx fp32
//             dw[c] += sum_n dy xhat, db[c] += sum_n dy, in two deterministic stages: each
//             block sums its rows into a partial row, then one kernel adds the partials in
//             block order.
//   next sums (with the fused dropout backward, C % 128 == 0): next_db[c] += sum_n next_dy,
//             the column sums of the bf16 gradient the kernel writes for the next site, which
//             is the bias gradient of the projection that feeds that site; a third section
//             of the same partial rows, reduced with dw and db. The sums take the bf16 values,
//             as the weight gradient's matmul reads them (what cuBLASLt's BGRADB epilogue and
//             column_sum sum), so only the order of the additions differs from those.
//   residual + forward (fused): x_out[n, c] = x_in[n, c] + drop(y[n, c]) (dropout.cuh's
//             residual forward), then the forward above of x_out, in one pass: the row is
//             held in registers, so the fp32 stream is written once and not read again.
#pragma once

#include <flashgpt/model.h>

#include "common.cuh"
#include "dropout.cuh"

#include <initializer_list>

namespace flashgpt::model_cuda {

constexpr int kLnWarps = 4;  // warps (rows in flight) per block

__global__ void layernorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ mean_out,
                                         float* __restrict__ rstd_out, const float* __restrict__ x,
                                         const float* __restrict__ w, const float* __restrict__ b, int64_t N, int C,
                                         int64_t ld) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  if (row >= N) return;
  const float* xr = x + row * C;
  float sum = 0.0f;
  for (int c = lane; c < C; c += 32) sum += xr[c];
  const float mean = warp_sum(sum) / C;
  float var = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float d = xr[c] - mean;
    var += d * d;
  }
  const float rstd = rsqrtf(warp_sum(var) / C + kLayerNormEps);
  bf16* o = out + row * ld;
  for (int c = lane; c < C; c += 32) o[c] = __float2bfloat16_rn((xr[c] - mean) * rstd * w[c] + b[c]);
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Block g's warps take rows g * kLnWarps + warp, then every gridDim.x * kLnWarps rows on.
// Shared memory: kLnWarps * 2C floats of per-warp dw/db sums (each lane its own channels).
// partial: (gridDim.x, 2C) fp32, [dw | db] of this block.
template <bool kAccumulate>
__global__ void layernorm_backward_kernel(float* __restrict__ dx, float* __restrict__ partial,
                                          const bf16* __restrict__ dy, const float* __restrict__ x,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          const float* __restrict__ w, int64_t N, int C) {
  extern __shared__ float shared_acc[];  // (kLnWarps, 2C)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* acc = shared_acc + warp * 2 * C;
  for (int c = lane; c < 2 * C; c += 32) acc[c] = 0.0f;
  __syncwarp();
  for (int64_t row = blockIdx.x * int64_t{kLnWarps} + warp; row < N; row += int64_t{gridDim.x} * kLnWarps) {
    const float* xr = x + row * C;
    const bf16* dyr = dy + row * C;
    const float m = mean[row], rs = rstd[row];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = lane; c < C; c += 32) {
      const float xhat = (xr[c] - m) * rs;
      const float g = __bfloat162float(dyr[c]);
      const float dxhat = g * w[c];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      acc[c] += g * xhat;
      acc[C + c] += g;
    }
    sum_dxhat = warp_sum(sum_dxhat) / C;
    sum_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
    float* dxr = dx + row * C;
    for (int c = lane; c < C; c += 32) {
      const float xhat = (xr[c] - m) * rs;
      const float v = rs * (__bfloat162float(dyr[c]) * w[c] - sum_dxhat - xhat * sum_dxhat_xhat);
      if (kAccumulate) {
        dxr[c] += v;
      } else {
        dxr[c] = v;
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kLnWarps; ++k) s += shared_acc[k * 2 * C + c];
    partial[int64_t{blockIdx.x} * 2 * C + c] = s;
  }
}

// Vector versions for C % 128 == 0 (the model's sizes): lane owns channels 4 lane + 128 i ..
// + 3, read as one float4 (x, w, b) and one 8-byte load of bf16 (dy); the same math.
__device__ __forceinline__ void load_bf16x4(const bf16* p, float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = __bfloat162float(b[k]);
}

// acc[0 .. 3] += r[0 .. 3] (bf16), acc 16-byte aligned shared memory: one 128-bit load and store.
__device__ __forceinline__ void add_bf16x4(float* acc, const bf16* r) {
  float4 a = *reinterpret_cast<float4*>(acc);
  a.x += __bfloat162float(r[0]);
  a.y += __bfloat162float(r[1]);
  a.z += __bfloat162float(r[2]);
  a.w += __bfloat162float(r[3]);
  *reinterpret_cast<float4*>(acc) = a;
}

__global__ void layernorm_forward_vec_kernel(bf16* __restrict__ out, float* __restrict__ mean_out,
                                             float* __restrict__ rstd_out, const float* __restrict__ x,
                                             const float* __restrict__ w, const float* __restrict__ b, int64_t N,
                                             int C, int64_t ld) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  if (row >= N) return;
  const float* xr = x + row * C;
  float sum = 0.0f;
  for (int c = 4 * lane; c < C; c += 128) {
    const float4 v = *reinterpret_cast<const float4*>(xr + c);
    sum += (v.x + v.y) + (v.z + v.w);
  }
  const float mean = warp_sum(sum) / C;
  float var = 0.0f;
  for (int c = 4 * lane; c < C; c += 128) {
    const float4 v = *reinterpret_cast<const float4*>(xr + c);
    var += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean) + (v.z - mean) * (v.z - mean) +
           (v.w - mean) * (v.w - mean);
  }
  const float rstd = rsqrtf(warp_sum(var) / C + kLayerNormEps);
  bf16* o = out + row * ld;
  for (int c = 4 * lane; c < C; c += 128) {
    const float4 v = *reinterpret_cast<const float4*>(xr + c);
    const float4 wv = *reinterpret_cast<const float4*>(w + c);
    const float4 bv = *reinterpret_cast<const float4*>(b + c);
    uint2 raw;
    bf16* r = reinterpret_cast<bf16*>(&raw);
    r[0] = __float2bfloat16_rn((v.x - mean) * rstd * wv.x + bv.x);
    r[1] = __float2bfloat16_rn((v.y - mean) * rstd * wv.y + bv.y);
    r[2] = __float2bfloat16_rn((v.z - mean) * rstd * wv.z + bv.z);
    r[3] = __float2bfloat16_rn((v.w - mean) * rstd * wv.w + bv.w);
    *reinterpret_cast<uint2*>(o + c) = raw;
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// The residual forward (dropout.cuh) and the LayerNorm forward of its result in one pass,
// for C % 16 == 0 and C <= 512 kGroups: one warp per row, lane owning the 16-channel groups
// lane + 32 j (j < kGroups), one Philox call per group as in residual_forward_kernel, with
// the same per-element arithmetic (so the same residual bits). The mean and variance are
// taken from the registers (two passes over them, as the unfused kernel does over memory).
// out may equal in (each lane reads all its channels before it writes any).
template <int kGroups>
__global__ void __launch_bounds__(256)
    residual_layernorm_forward_kernel(float* out, bf16* __restrict__ ln, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, const float* in, const bf16* __restrict__ y,
                                      const float* __restrict__ w, const float* __restrict__ b, int64_t N, int C,
                                      int64_t ld, DropoutSite d) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  if (row >= N) return;
  const int groups = C / 16;
  // Every load of the row first (in and y of all this lane's groups), then the arithmetic.
  float v[kGroups][16];
  uint4 yv[kGroups][2];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int g = lane + 32 * j;
    if (g >= groups) break;
    const int64_t base = row * C + g * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 a = reinterpret_cast<const float4*>(in + base)[i];
      v[j][4 * i] = a.x, v[j][4 * i + 1] = a.y, v[j][4 * i + 2] = a.z, v[j][4 * i + 3] = a.w;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) yv[j][i] = reinterpret_cast<const uint4*>(y + base)[i];
  }
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int g = lane + 32 * j;
    if (g >= groups) break;
    const uint32_t bits = dropout_keep_bits(d, row, g);
    const bf16* yb = reinterpret_cast<const bf16*>(yv[j]);
#pragma unroll
    for (int k = 0; k < 16; ++k) v[j][k] = __fadd_rn(v[j][k], dropout_apply(__bfloat162float(yb[k]), bits, k, d));
    float* o = out + row * C + g * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      reinterpret_cast<float4*>(o)[i] = make_float4(v[j][4 * i], v[j][4 * i + 1], v[j][4 * i + 2], v[j][4 * i + 3]);
#pragma unroll
    for (int k = 0; k < 16; ++k) sum += v[j][k];
  }
  const float mean = warp_sum(sum) / C;
  float var = 0.0f;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    if (lane + 32 * j >= groups) break;
#pragma unroll
    for (int k = 0; k < 16; ++k) var += (v[j][k] - mean) * (v[j][k] - mean);
  }
  const float rstd = rsqrtf(warp_sum(var) / C + kLayerNormEps);
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int g = lane + 32 * j;
    if (g >= groups) break;
    float o[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 wv = reinterpret_cast<const float4*>(w + g * 16)[i];
      const float4 bv = reinterpret_cast<const float4*>(b + g * 16)[i];
      o[4 * i] = (v[j][4 * i] - mean) * rstd * wv.x + bv.x;
      o[4 * i + 1] = (v[j][4 * i + 1] - mean) * rstd * wv.y + bv.y;
      o[4 * i + 2] = (v[j][4 * i + 2] - mean) * rstd * wv.z + bv.z;
      o[4 * i + 3] = (v[j][4 * i + 3] - mean) * rstd * wv.w + bv.w;
    }
    store16(ln + row * ld + g * 16, o);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// kDropNext: also the next dropout backward of the residual stream, fused: next_dy (N, C)
// bf16 = dropout mask of site `next` * scale * dx (the accumulated value just written), the
// same arithmetic as dropout_backward_kernel, so the same bits, without reading dx again.
// kSumNext (with kDropNext): also the column sums of next_dy, a third section of the sums:
// shared memory and partial rows hold layernorm_backward_sections(kSumNext) C floats.
__host__ __device__ constexpr int layernorm_backward_sections(bool sum_next) { return sum_next ? 3 : 2; }

template <bool kAccumulate, bool kDropNext, bool kSumNext = false>
__global__ void layernorm_backward_vec_kernel(float* __restrict__ dx, float* __restrict__ partial,
                                              const bf16* __restrict__ dy, const float* __restrict__ x,
                                              const float* __restrict__ mean, const float* __restrict__ rstd,
                                              const float* __restrict__ w, int64_t N, int C, bf16* __restrict__ next_dy,
                                              DropoutSite next) {
  static_assert(kDropNext || !kSumNext, "the next sums are of the fused dropout's output");
  constexpr int kSections = layernorm_backward_sections(kSumNext);
  extern __shared__ float shared_acc[];  // (kLnWarps, kSections C): [dw | db | next db]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* acc = shared_acc + warp * kSections * C;
  for (int c = lane; c < kSections * C; c += 32) acc[c] = 0.0f;
  __syncwarp();
  for (int64_t row = blockIdx.x * int64_t{kLnWarps} + warp; row < N; row += int64_t{gridDim.x} * kLnWarps) {
    const float* xr = x + row * C;
    const bf16* dyr = dy + row * C;
    const float m = mean[row], rs = rstd[row];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = 4 * lane; c < C; c += 128) {
      const float4 xv = *reinterpret_cast<const float4*>(xr + c);
      const float4 wv = *reinterpret_cast<const float4*>(w + c);
      float g[4];
      load_bf16x4(dyr + c, g);
      const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float xhat = (xs[k] - m) * rs;
        const float dxhat = g[k] * ws[k];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
        acc[c + k] += g[k] * xhat;
        acc[C + c + k] += g[k];
      }
    }
    sum_dxhat = warp_sum(sum_dxhat) / C;
    sum_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
    float* dxr = dx + row * C;
    for (int c = 4 * lane; c < C; c += 128) {
      const float4 xv = *reinterpret_cast<const float4*>(xr + c);
      const float4 wv = *reinterpret_cast<const float4*>(w + c);
      float g[4];
      load_bf16x4(dyr + c, g);
      const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, ws[4] = {wv.x, wv.y, wv.z, wv.w};
      float4 o = kAccumulate ? *reinterpret_cast<const float4*>(dxr + c) : make_float4(0, 0, 0, 0);
      float* os = reinterpret_cast<float*>(&o);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float xhat = (xs[k] - m) * rs;
        os[k] += rs * (g[k] * ws[k] - sum_dxhat - xhat * sum_dxhat_xhat);
      }
      *reinterpret_cast<float4*>(dxr + c) = o;
      if (kDropNext) {  // this lane's 4 channels are bits c % 16 .. + 3 of the 16-channel group c / 16
        const uint32_t bits = dropout_keep_bits(next, row, c / 16);
        uint2 raw;
        bf16* r = reinterpret_cast<bf16*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) r[k] = __float2bfloat16_rn(dropout_apply(os[k], bits, c % 16 + k, next));
        *reinterpret_cast<uint2*>(next_dy + row * C + c) = raw;
        if (kSumNext) add_bf16x4(acc + 2 * C + c, r);
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < kSections * C; c += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kLnWarps; ++k) s += shared_acc[k * kSections * C + c];
    partial[int64_t{blockIdx.x} * kSections * C + c] = s;
  }
}

// layernorm_backward_vec_kernel with the row and the dw/db sums in registers, for C = 128
// kIters: a lane owns the same channels 4 lane + 128 i (i < kIters) of every row, so its
// share of dw and db accumulates in registers (not in shared memory, read and written per
// element), and x and dy are read once per row (the shared-memory kernel reads them twice;
// w, the same for every row, comes from L1). Same formulas and the same order of additions per warp; the
// block's sums go through shared memory at the end as there.
// Blocks per SM the register kernel is compiled for (its registers capped to fit them).
constexpr int layernorm_backward_reg_blocks_per_sm(int iters) { return iters <= 4 ? 4 : iters <= 6 ? 3 : 2; }

// kSumNext: the next sums (kernel comment above), added to the warp's shared-memory row as
// they come (a 128-bit shared load and store per 4 channels): in registers they took
// kIters = 6 (C = 768) past its 168-register cap (a spill).
template <int kIters, bool kAccumulate, bool kDropNext, bool kSumNext = false>
__global__ void __launch_bounds__(kLnWarps * 32, layernorm_backward_reg_blocks_per_sm(kIters))
    layernorm_backward_reg_kernel(float* __restrict__ dx, float* __restrict__ partial, const bf16* __restrict__ dy,
                                  const float* __restrict__ x, const float* __restrict__ mean,
                                  const float* __restrict__ rstd, const float* __restrict__ w, int64_t N, int C,
                                  bf16* __restrict__ next_dy, DropoutSite next) {
  static_assert(kDropNext || !kSumNext, "the next sums are of the fused dropout's output");
  constexpr int kSections = layernorm_backward_sections(kSumNext);
  extern __shared__ float shared_acc[];  // (kLnWarps, kSections C): [dw | db | next db]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* acc = shared_acc + warp * kSections * C;
  if (kSumNext) {
    for (int c = lane; c < C; c += 32) acc[2 * C + c] = 0.0f;
    __syncwarp();
  }
  float acc_w[kIters][4], acc_b[kIters][4];
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc_w[i][k] = acc_b[i][k] = 0.0f;
  }
  for (int64_t row = blockIdx.x * int64_t{kLnWarps} + warp; row < N; row += int64_t{gridDim.x} * kLnWarps) {
    const float* xr = x + row * C;
    const bf16* dyr = dy + row * C;
    float xs[kIters][4], g[kIters][4], o[kIters][4];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = 4 * lane + 128 * i;
      const float4 xv = *reinterpret_cast<const float4*>(xr + c);
      xs[i][0] = xv.x, xs[i][1] = xv.y, xs[i][2] = xv.z, xs[i][3] = xv.w;
      load_bf16x4(dyr + c, g[i]);
      if (kAccumulate) {
        const float4 ov = *reinterpret_cast<const float4*>(dx + row * C + c);
        o[i][0] = ov.x, o[i][1] = ov.y, o[i][2] = ov.z, o[i][3] = ov.w;
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) o[i][k] = 0.0f;
      }
    }
    const float m = mean[row], rs = rstd[row];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const float4 wv = __ldg(reinterpret_cast<const float4*>(w + 4 * lane + 128 * i));  // L1: every row reads it
      const float ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float xhat = (xs[i][k] - m) * rs;
        const float dxhat = g[i][k] * ws[k];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
        acc_w[i][k] += g[i][k] * xhat;
        acc_b[i][k] += g[i][k];
      }
    }
    sum_dxhat = warp_sum(sum_dxhat) / C;
    sum_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = 4 * lane + 128 * i;
      const float4 wv = __ldg(reinterpret_cast<const float4*>(w + c));
      const float ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float xhat = (xs[i][k] - m) * rs;
        o[i][k] += rs * (g[i][k] * ws[k] - sum_dxhat - xhat * sum_dxhat_xhat);
      }
      *reinterpret_cast<float4*>(dx + row * C + c) = make_float4(o[i][0], o[i][1], o[i][2], o[i][3]);
      if (kDropNext) {  // this lane's 4 channels are bits c % 16 .. + 3 of the 16-channel group c / 16
        const uint32_t bits = dropout_keep_bits(next, row, c / 16);
        uint2 raw;
        bf16* r = reinterpret_cast<bf16*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) r[k] = __float2bfloat16_rn(dropout_apply(o[i][k], bits, c % 16 + k, next));
        *reinterpret_cast<uint2*>(next_dy + row * C + c) = raw;
        if (kSumNext) add_bf16x4(acc + 2 * C + c, r);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc[4 * lane + 128 * i + k] = acc_w[i][k];
      acc[C + 4 * lane + 128 * i + k] = acc_b[i][k];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < kSections * C; c += blockDim.x) {
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kLnWarps; ++k) sum += shared_acc[k * kSections * C + c];
    partial[int64_t{blockIdx.x} * kSections * C + c] = sum;
  }
}

// dw[c] += sum over blocks of partial[blk, c]; db[c] += partial[blk, C + c]; with next_db
// (partial rows of 3C), next_db[c] += partial[blk, 2C + c]. Block order.
__global__ void layernorm_backward_reduce_kernel(float* __restrict__ dw, float* __restrict__ db,
                                                 float* __restrict__ next_db, const float* __restrict__ partial,
                                                 int blocks, int C) {
  const int sections = layernorm_backward_sections(next_db != nullptr);
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= sections * C) return;
  float s = 0.0f;
  for (int k = 0; k < blocks; ++k) s += partial[int64_t{k} * sections * C + c];
  if (c < C) {
    dw[c] += s;
  } else if (c < 2 * C) {
    db[c - C] += s;
  } else {
    next_db[c - 2 * C] += s;
  }
}

// ---- launchers ----

inline void layernorm_forward_launch(bf16* out, float* mean, float* rstd, const float* x, const float* w,
                                     const float* b, int64_t N, int C, int64_t ld, cudaStream_t stream) {
  constexpr int kWarps = 8;
  if (C % 128 == 0) {
    layernorm_forward_vec_kernel<<<ceil_div(N, kWarps), kWarps * 32, 0, stream>>>(out, mean, rstd, x, w, b, N, C, ld);
  } else {
    layernorm_forward_kernel<<<ceil_div(N, kWarps), kWarps * 32, 0, stream>>>(out, mean, rstd, x, w, b, N, C, ld);
  }
}

// The fused residual + LayerNorm forward; the caller checks residual_layernorm_fusable(C).
constexpr int kResidualLnMaxGroups = 4;
inline bool residual_layernorm_fusable(int C) { return C % 16 == 0 && C <= 16 * 32 * kResidualLnMaxGroups; }

inline void residual_layernorm_forward_launch(float* out, bf16* ln, float* mean, float* rstd, const float* in,
                                              const bf16* y, const float* w, const float* b, int64_t N, int C,
                                              int64_t ld, const DropoutSite& d, cudaStream_t stream) {
  constexpr int kWarps = 8;
  const int lane_groups = (C / 16 + 31) / 32;
  const unsigned grid = ceil_div(N, kWarps);
  if (lane_groups <= 1) {
    residual_layernorm_forward_kernel<1>
        <<<grid, kWarps * 32, 0, stream>>>(out, ln, mean, rstd, in, y, w, b, N, C, ld, d);
  } else if (lane_groups <= 2) {
    residual_layernorm_forward_kernel<2>
        <<<grid, kWarps * 32, 0, stream>>>(out, ln, mean, rstd, in, y, w, b, N, C, ld, d);
  } else {
    residual_layernorm_forward_kernel<4>
        <<<grid, kWarps * 32, 0, stream>>>(out, ln, mean, rstd, in, y, w, b, N, C, ld, d);
  }
}

inline size_t layernorm_backward_shared_bytes(int C, bool sum_next = false) {
  return sizeof(float) * kLnWarps * layernorm_backward_sections(sum_next) * size_t(C);
}

// blocks: the partial rows `partial` holds (layernorm_backward_blocks).
inline int layernorm_backward_blocks(int64_t N, int sm_count) {
  const int64_t wanted = (N + kLnWarps - 1) / kLnWarps;
  const int64_t cap = int64_t{sm_count} * 4;
  return static_cast<int>(wanted < cap ? (wanted < 1 ? 1 : wanted) : cap);
}

// The register kernel's shapes: C = 128 kIters for the kIters instantiated below.
inline bool layernorm_backward_registers_fit(int C) {
  if (C % 128 != 0) return false;
  const int iters = C / 128;
  return iters == 1 || iters == 2 || iters == 3 || iters == 4 || iters == 6 || iters == 8;
}

// The register kernels hold 100-200 registers a thread, so fewer blocks fit on an SM than
// the shared-memory kernel's grid (4 per SM) assumes: the grid is capped at the blocks per SM
// the kernel's launch bounds guarantee (one wave, no tail). Returns the blocks launched (the
// partial rows to reduce).
// sum_next: the next sums (needs next_dy).
template <int kIters>
int layernorm_backward_reg_launch(float* dx, bool accumulate, float* partial, int blocks, size_t shared,
                                  const bf16* dy, const float* x, const float* mean, const float* rstd,
                                  const float* w, int64_t N, int C, cudaStream_t stream, bf16* next_dy,
                                  const DropoutSite& next, int sm_count, bool sum_next) {
  auto kernel = accumulate ? (next_dy ? (sum_next ? layernorm_backward_reg_kernel<kIters, true, true, true>
                                                  : layernorm_backward_reg_kernel<kIters, true, true>)
                                      : layernorm_backward_reg_kernel<kIters, true, false>)
                           : (next_dy ? (sum_next ? layernorm_backward_reg_kernel<kIters, false, true, true>
                                                  : layernorm_backward_reg_kernel<kIters, false, true>)
                                      : layernorm_backward_reg_kernel<kIters, false, false>);
  constexpr int fit = layernorm_backward_reg_blocks_per_sm(kIters);
  if (sm_count > 0 && blocks > fit * sm_count) blocks = fit * sm_count;
  kernel<<<blocks, kLnWarps * 32, shared, stream>>>(dx, partial, dy, x, mean, rstd, w, N, C, next_dy, next);
  return blocks;
}

inline int layernorm_backward_reg_dispatch(float* dx, bool accumulate, float* partial, int blocks, size_t shared,
                                           const bf16* dy, const float* x, const float* mean, const float* rstd,
                                           const float* w, int64_t N, int C, cudaStream_t stream, bf16* next_dy,
                                           const DropoutSite& next, int sm_count, bool sum_next) {
  switch (C / 128) {
    case 1:
      return layernorm_backward_reg_launch<1>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
    case 2:
      return layernorm_backward_reg_launch<2>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
    case 3:
      return layernorm_backward_reg_launch<3>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
    case 4:
      return layernorm_backward_reg_launch<4>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
    case 6:
      return layernorm_backward_reg_launch<6>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
    default:
      return layernorm_backward_reg_launch<8>(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                               stream, next_dy, next, sm_count, sum_next);
  }
}

// registers: the register kernel where it fits (layernorm_backward_registers_fit), its grid
// capped at sm_count times the blocks resident per SM (sm_count 0: no cap).
// next_dy non-null: the fused dropout backward (vector path only; C % 128 == 0).
// next_db non-null with the fused dropout backward (next_dy, C % 128 == 0; else ignored):
// next_db (C) += the column sums of next_dy; partial holds blocks rows of 3C floats then, else 2C.
inline void layernorm_backward_launch(float* dx, bool accumulate, float* dw, float* db, float* partial, int blocks,
                                      const bf16* dy, const float* x, const float* mean, const float* rstd,
                                      const float* w, int64_t N, int C, cudaStream_t stream,
                                      bf16* next_dy = nullptr, const DropoutSite& next = DropoutSite{},
                                      bool registers = false, int sm_count = 0, float* next_db = nullptr) {
  const bool sum_next = next_db != nullptr && next_dy != nullptr && C % 128 == 0;
  if (!sum_next) next_db = nullptr;
  const size_t shared = layernorm_backward_shared_bytes(C, sum_next);
  if (registers && layernorm_backward_registers_fit(C)) {
    blocks = layernorm_backward_reg_dispatch(dx, accumulate, partial, blocks, shared, dy, x, mean, rstd, w, N, C,
                                             stream, next_dy, next, sm_count, sum_next);
  } else if (C % 128 == 0) {
    auto kernel = accumulate ? (next_dy ? (sum_next ? layernorm_backward_vec_kernel<true, true, true>
                                                    : layernorm_backward_vec_kernel<true, true>)
                                        : layernorm_backward_vec_kernel<true, false>)
                             : (next_dy ? (sum_next ? layernorm_backward_vec_kernel<false, true, true>
                                                    : layernorm_backward_vec_kernel<false, true>)
                                        : layernorm_backward_vec_kernel<false, false>);
    kernel<<<blocks, kLnWarps * 32, shared, stream>>>(dx, partial, dy, x, mean, rstd, w, N, C, next_dy, next);
  } else if (accumulate) {
    layernorm_backward_kernel<true><<<blocks, kLnWarps * 32, shared, stream>>>(dx, partial, dy, x, mean, rstd, w, N, C);
  } else {
    layernorm_backward_kernel<false><<<blocks, kLnWarps * 32, shared, stream>>>(dx, partial, dy, x, mean, rstd, w, N, C);
  }
  const int64_t sums = layernorm_backward_sections(sum_next) * int64_t{C};
  layernorm_backward_reduce_kernel<<<ceil_div(sums, 256), 256, 0, stream>>>(dw, db, next_db, partial, blocks, C);
}

// Lets the backward kernels take `bytes` (> 48 KB) of shared memory (C > 1536, or C > 1024
// with the next sums). The register kernels' C <= 1024 fits in 48 KB.
inline cudaError_t layernorm_backward_allow_shared(size_t shared_bytes) {
  const int bytes = static_cast<int>(shared_bytes);
  for (const void* kernel : {reinterpret_cast<const void*>(layernorm_backward_kernel<true>),
                             reinterpret_cast<const void*>(layernorm_backward_kernel<false>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<true, false>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<false, false>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<true, true>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<false, true>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<true, true, true>),
                             reinterpret_cast<const void*>(layernorm_backward_vec_kernel<false, true, true>)}) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace flashgpt::model_cuda

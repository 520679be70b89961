// Kernels of the CUDA inference engine: embedding, fused residual + LayerNorm, the qkv
// split into the K/V caches, bias + GELU, flash-decoding attention, and sampling.
#include "inference_cuda_kernels.h"
#include "inference_cuda_device.cuh"

#include <flashgpt/cuda_check.h>
#include <flashgpt/generate_cuda.h>
#include <flashgpt/philox.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace flashgpt {

namespace inference_cuda {

namespace {

constexpr float kEps = 1e-5f;  // model.h's kLayerNormEps

// ---- LayerNorm statistics handed from kernel to kernel (the layer3 path) ---------------
//
// A producer that writes a residual row leaves its LayerNorm statistics as (mean, M2) pairs
// of column chunks (M2: the sum of squared deviations from the chunk's mean); the consumer
// merges them in chunk order (Chan et al.'s pairwise update), so it reads a few pairs
// instead of reducing over the row, and the result does not depend on timing.

// The (mean, M2) of 32 values, one a lane (the same butterfly order every time).
__device__ __forceinline__ float2 warp_chunk_stats(float v) {
  const float mean = warp_sum(v) * (1.0f / 32.0f), d = v - mean;
  return make_float2(mean, warp_sum(d * d));
}
// (mean, rstd) of a row of C from `count` chunk pairs, chunk k of clamp(C - k width, 0,
// width) columns.
__device__ __forceinline__ float2 ln_stats_merge(const float2* parts, int count, int width, int C) {
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
#pragma unroll 4
  for (int k = 0; k < count; ++k) {
    const int nk_i = min(width, C - k * width);
    if (nk_i <= 0) break;
    const float2 s = parts[k];
    const float nk = static_cast<float>(nk_i), nt = n + nk, d = s.x - mean;
    mean += d * (nk / nt);
    m2 += s.y + d * d * (n * nk / nt);
    n = nt;
  }
  return make_float2(mean, rsqrtf(fmaxf(m2, 0.0f) / C + kEps));
}

__global__ void embed_kernel(float* x, const TokenPlace* places, const float* wte, const float* wpe, int C,
                             float2* stats) {
  pdl_wait();
  pdl_launch_dependents();
  const int n = blockIdx.x;
  const TokenPlace p = places[n];
  const float* te = wte + static_cast<int64_t>(p.token) * C;
  const float* pe = wpe + static_cast<int64_t>(p.pos) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) x[static_cast<int64_t>(n) * C + c] = te[c] + pe[c];
  if (stats) {  // 32-column chunks, a warp each (C % 32 == 0)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, chunks = C / 32;
    for (int k = warp; k < chunks; k += blockDim.x / 32) {
      const int c = 32 * k + lane;
      const float2 s = warp_chunk_stats(te[c] + pe[c]);
      if (lane == 0) stats[static_cast<int64_t>(n) * chunks + k] = s;
    }
  }
}

// One warp per row; the row is held in registers (C <= 32 * 64).
constexpr int kLnMaxPerLane = 64;

// kPer > 0 (the default): a lane's kPer >= C / 32 columns are all loaded, as predicated loads
// with no branch between them, before the first add, so a warp waits for one round trip to
// memory instead of one per column; the same bits as kPer = 0 (a branch per column,
// FLASHGPT_DECODE_LN_LOADS_FIRST=0; docs/generate.md has the timings).
template <int kPer>
__global__ void residual_layernorm_kernel(float* x, const bf16* y, const float* bias, const float* w, const float* b,
                                          bf16* h, const int32_t* row_index, int rows, int C, bool write_x) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= rows) return;
  const int64_t r = row_index ? row_index[n] : n;
  float* xr = x + r * C;
  float vals[kPer > 0 ? kPer : kLnMaxPerLane];
  float sum = 0.0f;
  if constexpr (kPer > 0) {
    float add[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = lane + 32 * i;
      vals[i] = c < C ? xr[c] : 0.0f;
    }
    if (y) {
      const bf16* yr = y + r * C;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = lane + 32 * i;
        add[i] = c < C ? __bfloat162float(yr[c]) + bias[c] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) vals[i] += add[i];
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) sum += vals[i];  // zero past C, in the same order
  } else {
#pragma unroll
    for (int i = 0; i < kLnMaxPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < C) {
        float v = xr[c];
        if (y) v += __bfloat162float(y[r * C + c]) + bias[c];
        vals[i] = v;
        sum += v;
      }
    }
  }
  const float mean = warp_sum(sum) / C;
  constexpr int kN = kPer > 0 ? kPer : kLnMaxPerLane;
  float var = 0.0f;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const int c = lane + 32 * i;
    if (c < C) var += (vals[i] - mean) * (vals[i] - mean);
  }
  const float rstd = rsqrtf(warp_sum(var) / C + kEps);
  float wc[kPer > 0 ? kPer : 1], bc[kPer > 0 ? kPer : 1];
  if constexpr (kPer > 0) {  // the scale and shift loaded first too
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = lane + 32 * i;
      wc[i] = c < C ? w[c] : 0.0f;
      bc[i] = c < C ? b[c] : 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const int c = lane + 32 * i;
    if (c < C) {
      float wi, bi;
      if constexpr (kPer > 0) {
        wi = wc[i], bi = bc[i];
      } else {
        wi = w[c], bi = b[c];
      }
      if (write_x) xr[c] = vals[i];
      h[static_cast<int64_t>(n) * C + c] = __float2bfloat16((vals[i] - mean) * rstd * wi + bi);
    }
  }
}

__global__ void split_qkv_kernel(bf16* q, bf16* k_cache, bf16* v_cache, const bf16* qkv, const float* bias,
                                 const TokenPlace* places, int C, int64_t slot_stride) {
  const int n = blockIdx.x;
  const TokenPlace p = places[n];
  const bf16* row = qkv + static_cast<int64_t>(n) * 3 * C;
  const int64_t at = static_cast<int64_t>(p.slot) * slot_stride + static_cast<int64_t>(p.pos) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    q[static_cast<int64_t>(n) * C + c] = __float2bfloat16(__bfloat162float(row[c]) + bias[c]);
    k_cache[at + c] = __float2bfloat16(__bfloat162float(row[C + c]) + bias[C + c]);
    v_cache[at + c] = __float2bfloat16(__bfloat162float(row[2 * C + c]) + bias[2 * C + c]);
  }
}

__global__ void bias_gelu_kernel(bf16* ff, const float* bias, int64_t count, int F) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = __bfloat162float(ff[i]) + bias[i % F];
    ff[i] = __float2bfloat16(0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v))));
  }
}

// ---- small-batch matrix-vector products -------------------------------------------------

// y (R, out) = x (R, in) W (out, in)^T, R <= 8 rows (a decode step at small batch): one
// warp per output row streams that row of W once with 16-byte loads while the R rows of x
// sit in shared memory, so the weights are read once at close to the memory bandwidth
// (cuBLAS runs these shapes as GEMMs with little parallelism). Epilogue: none, or + bias
// then GELU (the fc layer). in % 8 == 0.
constexpr int kGemvWarps = 8;

template <int R>
__global__ void __launch_bounds__(32 * kGemvWarps) gemv_kernel(void* y, bool y_f32, int64_t ldy, const bf16* x,
                                                               const bf16* w, const float* bias, int in, int out) {
  extern __shared__ uint4 xs[];  // (R, in / 8)
  const int chunks = in / 8;
  for (int i = threadIdx.x; i < R * chunks; i += blockDim.x) xs[i] = reinterpret_cast<const uint4*>(x)[i];
  __syncthreads();
  const int o = blockIdx.x * kGemvWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (o >= out) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(o) * in);
  float acc[R] = {};
  for (int i = lane; i < chunks; i += 32) {
    float wf[8];
    bf16x8_to_float(wr[i], wf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float xf[8];
      bf16x8_to_float(xs[r * chunks + i], xf);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[r] += wf[k] * xf[k];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
    if (bias) {
      v += bias[o];
      v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
    if (y_f32) {
      static_cast<float*>(y)[r * ldy + o] = v;
    } else {
      static_cast<bf16*>(y)[r * ldy + o] = __float2bfloat16(v);
    }
  }
}


// ---- the fused decode path --------------------------------------------------------------

constexpr int kFusedWarps = 8;
constexpr int kFusedUnroll = 8;  // 16-byte loads in flight per lane before the first use
constexpr int kFusedUnrollWide = 12;
constexpr int kFusedBlocksPerSm = 3;  // resident blocks per multiprocessor (at most 85 registers)

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---- the fused path's prologue and epilogue (gemv_fused_kernel) ------------------------

// The LayerNorm prologue: a row per warp from 3 rows up; below, every warp takes part in
// every row (block sums through shared memory) so that one row does not wait on one warp.
template <int R>
constexpr bool kFusedBlockLn = R <= 2;

// Before the wait (the parameters depend on no earlier kernel): with the block-wide
// LayerNorm this thread's first 4 LayerNorm weights and biases (all of them up to d_model
// 1024) into g0, h0; the rest toward L2 (one prefetch per 128-byte line).
template <int R>
__device__ __forceinline__ void fused_ln_params_early(const FusedGemvParams& p, float4& g0, float4& h0) {
  constexpr bool kBlockLn = kFusedBlockLn<R>;
  const int n4 = p.in / 4;
  const float4* w4 = reinterpret_cast<const float4*>(p.ln_w);
  const float4* b4 = reinterpret_cast<const float4*>(p.ln_b);
  g0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), h0 = g0;
  if (p.ln_w) {
    const int in_registers = kBlockLn ? static_cast<int>(blockDim.x) : 0;  // float4s held as g0, h0
    if (kBlockLn && static_cast<int>(threadIdx.x) < n4) g0 = w4[threadIdx.x], h0 = b4[threadIdx.x];
    for (int i = in_registers + 8 * threadIdx.x; i < n4; i += 8 * blockDim.x) prefetch_l2(w4 + i), prefetch_l2(b4 + i);
  }
}

// After the wait, every thread of the block (kFusedWarps warps): the R input rows into
// shared memory xs (R, in / 8) as bf16, copied or LayerNorm'd (g0, h0 from
// fused_ln_params_early); scratch: (2, kFusedWarps, R) floats with the block-wide LayerNorm.
// Ends with a __syncthreads.
template <int R>
__device__ __forceinline__ void fused_inputs_to_shared(const FusedGemvParams& p, uint4* xs, float* scratch,
                                                       const float4& g0, const float4& h0) {
  constexpr bool kBlockLn = kFusedBlockLn<R>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = p.in / 8, n4 = p.in / 4;
  const float4* w4 = reinterpret_cast<const float4*>(p.ln_w);
  const float4* b4 = reinterpret_cast<const float4*>(p.ln_b);
  // The R input rows into shared memory as bf16. The LayerNorm's statistics are
  // sums shifted by the row's first value (so that a large mean costs no precision), then a
  // second pass normalises, its x from L1.
  bf16* xh = reinterpret_cast<bf16*>(xs);
  auto add_shifted = [](const float4& v, float shift, float& s1, float& s2) {
    const float a = v.x - shift, b = v.y - shift, c = v.z - shift, d = v.w - shift;
    s1 += (a + b) + (c + d);
    s2 += (a * a + b * b) + (c * c + d * d);
  };
  // Row r's float4 i, normalised with (mean, rstd), times g plus b, to bf16 in shared memory.
  auto store_normalised = [&](int r, int i, const float4& v, float mean, float rstd, const float4& g, const float4& b) {
    __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(xh + r * p.in);
    out2[2 * i] = __floats2bfloat162_rn((v.x - mean) * rstd * g.x + b.x, (v.y - mean) * rstd * g.y + b.y);
    out2[2 * i + 1] = __floats2bfloat162_rn((v.z - mean) * rstd * g.z + b.z, (v.w - mean) * rstd * g.w + b.w);
  };
  if (!p.ln_w) {
    for (int i = threadIdx.x; i < R * chunks; i += blockDim.x) xs[i] = reinterpret_cast<const uint4*>(p.x_bf16)[i];
  } else if (p.ln_stats) {
    // The statistics come from the row's producer: normalise at once, no reduction (a
    // loop kept rolled: unrolled, it costs the 3-8 row instances registers).
#pragma unroll 1
    for (int r = 0; r < R; ++r) {
      const int64_t src = p.row_index ? p.row_index[r] : r;
      const float2 ms = ln_stats_merge(p.ln_stats + src * p.ln_parts, p.ln_parts, p.ln_width, p.in);
      const float4* x4 = reinterpret_cast<const float4*>(p.x_f32 + src * p.in);
      for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const bool held = kBlockLn && i == static_cast<int>(threadIdx.x);
        store_normalised(r, i, x4[i], ms.x, ms.y, held ? g0 : w4[i], held ? h0 : b4[i]);
      }
    }
  } else if constexpr (!kBlockLn) {
    if (warp < R) {
      const int64_t src = p.row_index ? p.row_index[warp] : warp;
      const float4* x4 = reinterpret_cast<const float4*>(p.x_f32 + src * p.in);
      const float shift = p.x_f32[src * p.in];
      float s1 = 0.0f, s2 = 0.0f;
#pragma unroll 4
      for (int i = lane; i < n4; i += 32) add_shifted(x4[i], shift, s1, s2);
      const float mean_shifted = warp_sum(s1) / p.in;
      const float var = fmaxf(warp_sum(s2) / p.in - mean_shifted * mean_shifted, 0.0f);
      const float mean = shift + mean_shifted, rstd = rsqrtf(var + kEps);
#pragma unroll 4
      for (int i = lane; i < n4; i += 32) store_normalised(warp, i, x4[i], mean, rstd, w4[i], b4[i]);
    }
  } else {
    // Every thread takes its float4s of every row, the first pass's loads all issued at once;
    // the sums are reduced over the block through shared memory (scratch: (2, warps, R)).
    const float4* x4[R];
    float shift[R], s1[R], s2[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t src = p.row_index ? p.row_index[r] : r;
      x4[r] = reinterpret_cast<const float4*>(p.x_f32 + src * p.in);
      shift[r] = p.x_f32[src * p.in];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s1[r] = 0.0f, s2[r] = 0.0f;
      for (int i = threadIdx.x; i < n4; i += blockDim.x) add_shifted(x4[r][i], shift[r], s1[r], s2[r]);
      s1[r] = warp_sum(s1[r]), s2[r] = warp_sum(s2[r]);
      if (lane == 0) scratch[warp * R + r] = s1[r], scratch[(kFusedWarps + warp) * R + r] = s2[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float t1 = 0.0f, t2 = 0.0f;
#pragma unroll
      for (int w = 0; w < kFusedWarps; ++w) t1 += scratch[w * R + r], t2 += scratch[(kFusedWarps + w) * R + r];
      const float mean_shifted = t1 / p.in;
      const float var = fmaxf(t2 / p.in - mean_shifted * mean_shifted, 0.0f);
      const float mean = shift[r] + mean_shifted, rstd = rsqrtf(var + kEps);
      for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const bool held = i == static_cast<int>(threadIdx.x);
        store_normalised(r, i, x4[r][i], mean, rstd, held ? g0 : w4[i], held ? h0 : b4[i]);
      }
    }
  }
  __syncthreads();
}

// Output row `row` of input row r, the product v: the epilogue E (the argmax partials of
// logits_argmax are the caller's). bias_first, res_first (lane r's residual value) and
// place_first (lane r's token place) were loaded early for the warp's first rows (first).
template <GemvEpilogue E>
__device__ __forceinline__ void fused_store(const FusedGemvParams& p, int r, int row, float v, bool first,
                                            float bias_first, float res_first, const TokenPlace& place_first) {
  const float bias = first ? bias_first : p.bias ? p.bias[row] : 0.0f;
  if constexpr (E == GemvEpilogue::store_bf16) {
    static_cast<bf16*>(p.y)[r * p.ldy + row] = __float2bfloat16(v + bias);
  } else if constexpr (E == GemvEpilogue::bias_gelu) {
    static_cast<bf16*>(p.y)[r * p.ldy + row] = __float2bfloat16(gelu_tanh(v + bias));
  } else if constexpr (E == GemvEpilogue::residual) {
    float* res = p.residual + static_cast<int64_t>(r) * p.out + row;
    *res = (first ? res_first : *res) + v + bias;
  } else if constexpr (E == GemvEpilogue::qkv_cache) {
    const int C = p.out / 3, part = row / C, c = row - part * C;
    const bf16 h = __float2bfloat16(v + bias);
    if (part == 0) {
      p.q[static_cast<int64_t>(r) * C + c] = h;
    } else {
      const TokenPlace place = first ? place_first : p.places[r];
      const int64_t at = place.slot * p.slot_stride + static_cast<int64_t>(place.pos) * C + c;
      (part == 1 ? p.k_cache : p.v_cache)[at] = h;
    }
  } else {
    static_cast<float*>(p.y)[r * p.ldy + row] = v;
  }
}

// RPW rows of W per warp at a time: 2 when a row fits half the load slots (in <= 1024), so
// that twice the bytes are in flight per warp.
// U load slots per lane: kFusedUnroll, or kFusedUnrollWide for the residual epilogue with
// inputs above 32 x 8 x kFusedUnroll, up to 32 x 8 x kFusedUnrollWide (fc_proj's 3072 at the
// seed shape) when FusedGemvParams::wide, so that all of a row's loads go out before the
// wait instead of a second round trip to memory after it.
template <int R, GemvEpilogue E, int RPW, int U = kFusedUnroll>
__global__ void __launch_bounds__(32 * kFusedWarps, kFusedBlocksPerSm) gemv_fused_kernel(FusedGemvParams p) {
  constexpr int SU = U / RPW;  // load slots per row
  extern __shared__ uint4 xs[];  // (R, in / 8) bf16 input rows, then (2, warps, R) floats with kFusedBlockLn
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = p.in / 8;
  float* scratch = reinterpret_cast<float*>(xs + R * chunks);
  const int stride = gridDim.x * kFusedWarps;
  int o = blockIdx.x * kFusedWarps + warp;
  // The weights depend on no earlier kernel: the first rows' loads go out before the wait.
  // Slot u holds chunk base + lane + 32 (u % SU) of row o + (u / SU) stride.
  uint4 wv[U];
  auto load = [&](int row, int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int rr = row + (u / SU) * stride, i = base + lane + 32 * (u % SU);
      wv[u] = rr < p.out && i < chunks
                  ? load_stream(reinterpret_cast<const uint4*>(p.w + static_cast<int64_t>(rr) * p.in) + i)
                  : make_uint4(0, 0, 0, 0);
    }
  };
  if (o < p.out) load(o, 0);
  // Nor do the parameters, nor the token places (the step's host copy, which the whole chain
  // follows): into registers now, so that none costs a memory round trip after the wait:
  // the LayerNorm's (fused_ln_params_early), the biases of this warp's first rows, lane r's
  // token place.
  float4 g0, h0;
  fused_ln_params_early<R>(p, g0, h0);
  float bias0[RPW];
#pragma unroll
  for (int k = 0; k < RPW; ++k) bias0[k] = p.bias && o + k * stride < p.out ? p.bias[o + k * stride] : 0.0f;
  TokenPlace place0{};
  if constexpr (E == GemvEpilogue::qkv_cache) {
    if (lane < R) place0 = p.places[lane];
  }
  if (p.l2_prefetch.ptr) {  // prefetch_l2_range written out: its call tips this kernel (80 registers) into spills
    const char* base = static_cast<const char*>(p.l2_prefetch.ptr);
    for (int64_t at = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 128; at < p.l2_prefetch.bytes;
         at += static_cast<int64_t>(gridDim.x) * blockDim.x * 128) {
      prefetch_l2_evict_last(base + at);
    }
  }
  pdl_wait();
  pdl_launch_dependents();
  // The residual values this warp adds to in its first rows (lane r, row r), loaded now so
  // that they arrive while the products run.
  float res0[RPW] = {};
  if constexpr (E == GemvEpilogue::residual) {
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
      if (lane < R && o + k * stride < p.out) res0[k] = p.residual[static_cast<int64_t>(lane) * p.out + o + k * stride];
    }
  }
  fused_inputs_to_shared<R>(p, xs, scratch, g0, h0);
  bool first = true;  // this warp's first rows: bias0, res0 and place0 hold their values
  float best_v[R];
  int best_i[R];
#pragma unroll
  for (int r = 0; r < R; ++r) best_v[r] = -FLT_MAX, best_i[r] = 0x7fffffff;
  for (; o < p.out; o += RPW * stride, first = false) {
    float acc[RPW][R] = {};
    for (int base = 0;;) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + lane + 32 * (u % SU);
        if (i < chunks) {
          float wf[8];
          bf16x8_to_float(wv[u], wf);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float xf[8];
            bf16x8_to_float(xs[r * chunks + i], xf);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[u / SU][r] += wf[k] * xf[k];
          }
        }
      }
      base += 32 * SU;
      if (base >= chunks) break;
      load(o, base);
    }
    if (o + RPW * stride < p.out) load(o + RPW * stride, 0);  // the next rows' loads overlap this reduction
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[k][r] = warp_sum(acc[k][r]);
    }
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
      const int row = o + k * stride;
      if (row >= p.out) continue;
      // Lane r writes row r's value.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (lane != r) continue;
        const float v = acc[k][r];
        fused_store<E>(p, r, row, v, first, bias0[k], res0[k], place0);
        if constexpr (E == GemvEpilogue::logits_argmax) {
          // Rows come in increasing order, so the lowest column wins ties.
          if (row < p.valid_out && v > best_v[r]) best_v[r] = v, best_i[r] = row;
        }
      }
    }
  }
  if constexpr (E == GemvEpilogue::logits_argmax) {
    __shared__ float sv[kFusedWarps][R];
    __shared__ int si[kFusedWarps][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == r) sv[warp][r] = best_v[r], si[warp][r] = static_cast<int>(best_i[r]);
    }
    __syncthreads();
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      float bv = -FLT_MAX;
      int bi = 0x7fffffff;
      for (int w = 0; w < kFusedWarps; ++w) {
        if (sv[w][r] > bv || (sv[w][r] == bv && si[w][r] < bi)) bv = sv[w][r], bi = si[w][r];
      }
      p.part_val[r * gridDim.x + blockIdx.x] = bv;
      p.part_idx[r * gridDim.x + blockIdx.x] = bi;
    }
  }
}

// ---- the tensor-core GEMV (2 .. 8 input rows; FLASHGPT_GEMV_MMA=0 turns it off) ------------
//
// At 8 input rows gemv_fused_kernel is issue-bound: per 16-byte chunk of W a lane converts
// 8 x 8 input values and does 64 scalar FMAs. Here mma.sync m16n8k16 (bf16 in, fp32
// accumulate) does them: A = 16 rows of W x 16 k, B = 16 k x 8 columns, the input rows
// (columns R .. 7 zero), 2048 FMAs an instruction. A block owns a tile of 16 output rows
// (grid-stride over the tiles) and its 8 warps split the tile's k range (a warp's quads of
// 32 k in a row), so that a tile's loads are spread over 8 warps (a warp alone on a tile
// would hold as many loads in flight as the scalar kernel's one warp on one row, for 16
// rows); each warp's 16 x 8 partial tile goes through shared memory and is summed over the
// warps, then stored through fused_store.
//
// The k order is permuted so that a lane's 16-byte loads of W are its A fragment as they
// come: the PTX fragments of m16n8k16 give lane (g = lane / 4, t = lane % 4) the A pairs
// (row g, k 2t, 2t + 1), (row g + 8, the same), (row g, k 2t + 8, 2t + 9), (row g + 8, the
// same) and the B pairs (k 2t, 2t + 1) and (k 2t + 8, 2t + 9) of column g. The sum over k
// is order-free, so the instruction's k can be any permutation of the real k as long as A
// and B use the same one: for quad q (chunks 4q .. 4q + 3 of a row) lane (g, t) loads
// chunk i = 4q + t of rows g and g + 8 (words 0..3 each, k 8i .. 8i + 7) and chunk i of
// input row g from shared memory; the first mma takes words 0 and 1 (its "k 2t.." is real
// k 8i + 0, 1 and its "k 2t + 8.." real k 8i + 2, 3), the second words 2 and 3 (k 8i + 4..7).
// Chunks past the row and input rows g >= R are zero, so in % 8 == 0 is all it needs.
constexpr int kMmaUnroll = 8;  // 16-byte loads of W in flight per lane: 4 quads of 2 rows

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The partial tiles: (warps, 32 lanes, 4) floats after gemv_fused_shared's bytes.
constexpr size_t kMmaPartialBytes = sizeof(float) * 4 * 32 * kFusedWarps;

template <int R, GemvEpilogue E>
__global__ void __launch_bounds__(32 * kFusedWarps, kFusedBlocksPerSm) gemv_mma_kernel(FusedGemvParams p) {
  static_assert(R >= 1 && R <= 8, "the input rows are the mma's 8 columns");
  constexpr int QU = kMmaUnroll / 2;  // quads a round
  extern __shared__ uint4 xs[];  // (R, in / 8) bf16 input rows, (2, warps, R) floats with kFusedBlockLn, partials
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int chunks = p.in / 8;
  float* scratch = reinterpret_cast<float*>(xs + R * chunks);
  const bool block_ln = kFusedBlockLn<R> && p.ln_w != nullptr;
  float* partials = scratch + (block_ln ? 2 * kFusedWarps * R : 0);  // (warps, 32, 4)
  const int tiles = (p.out + 15) / 16, quads = (chunks + 3) / 4;
  const int per_warp = (quads + kFusedWarps - 1) / kFusedWarps;
  const int q_begin = warp * per_warp, q_end = min(q_begin + per_warp, quads);
  // Slot 2s + h holds chunk 4 (q0 + s) + t of row tile * 16 + g + 8 h.
  uint4 wv[kMmaUnroll];
  auto load = [&](int tile, int q0) {
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int row = tile * 16 + g + 8 * (u % 2), q = q0 + u / 2, i = 4 * q + t;
      wv[u] = row < p.out && q < q_end && i < chunks
                  ? load_stream(reinterpret_cast<const uint4*>(p.w + static_cast<int64_t>(row) * p.in) + i)
                  : make_uint4(0, 0, 0, 0);
    }
  };
  int tile = blockIdx.x;
  if (tile < tiles) load(tile, q_begin);
  // Thread k < 128 sums output (row m, input row n) of the tile: lane k / 4's float k % 4.
  const int m = (threadIdx.x / 4) / 4 + 8 * ((threadIdx.x % 4) / 2), n = 2 * ((threadIdx.x / 4) % 4) + threadIdx.x % 2;
  const bool storer = threadIdx.x < 128 && n < R;
  float4 g0, h0;
  fused_ln_params_early<R>(p, g0, h0);
  const int row0 = tile * 16 + m;
  const float bias0 = storer && p.bias && row0 < p.out ? p.bias[row0] : 0.0f;
  TokenPlace place0{};
  if constexpr (E == GemvEpilogue::qkv_cache) {
    if (storer) place0 = p.places[n];
  }
  prefetch_l2_range(p.l2_prefetch.ptr, p.l2_prefetch.bytes, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                    static_cast<int64_t>(gridDim.x) * blockDim.x);
  pdl_wait();
  pdl_launch_dependents();
  float res0 = 0.0f;
  if constexpr (E == GemvEpilogue::residual) {
    if (storer && row0 < p.out) res0 = p.residual[static_cast<int64_t>(n) * p.out + row0];
  }
  fused_inputs_to_shared<R>(p, xs, scratch, g0, h0);
  bool first = true;
  for (; tile < tiles; tile += gridDim.x, first = false) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int q0 = q_begin;;) {
#pragma unroll
      for (int s = 0; s < QU; ++s) {
        const int i = 4 * (q0 + s) + t;
        if (q0 + s < q_end) {  // the same for the whole warp
          const uint4 x = g < R && i < chunks ? xs[g * chunks + i] : make_uint4(0, 0, 0, 0);
          const uint4 lo = wv[2 * s], hi = wv[2 * s + 1];
          mma_bf16_16816(c, lo.x, hi.x, lo.y, hi.y, x.x, x.y);
          mma_bf16_16816(c, lo.z, hi.z, lo.w, hi.w, x.z, x.w);
        }
      }
      q0 += QU;
      if (q0 >= q_end) break;
      load(tile, q0);
    }
    if (tile + static_cast<int>(gridDim.x) < tiles) load(tile + gridDim.x, q_begin);  // overlaps the reduction
    reinterpret_cast<float4*>(partials)[warp * 32 + lane] = make_float4(c[0], c[1], c[2], c[3]);
    __syncthreads();
    const int row = tile * 16 + m;
    if (storer && row < p.out) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kFusedWarps; ++w) v += partials[w * 128 + threadIdx.x];
      fused_store<E>(p, n, row, v, first, bias0, res0, place0);
    }
    __syncthreads();  // the partials are read before the next tile writes them
  }
}

// ---- sampling --------------------------------------------------------------------------

constexpr int kSampleThreads = 1024;

// A total order on (scaled logit, id): a larger key is more likely; equal logits order by
// lower id. The float's bits map to an unsigned integer in the same order.
__device__ __forceinline__ uint64_t sample_key(float z, int id) {
  uint32_t u = __float_as_uint(z);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int key_id(uint64_t key) { return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key)); }

// Fixed-point probabilities (2^40 = 1) so that sums are integer and do not depend on the
// order in which threads add them.
constexpr double kFixedOne = 1099511627776.0;

struct SampleShared {
  unsigned long long hist[256];
  float red_f[kSampleThreads / 32];
  unsigned long long red_u[kSampleThreads / 32];
  uint64_t prefix;
  unsigned long long target;
};

__device__ float block_max(float v, SampleShared& s) {
  v = warp_max(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) s.red_f[threadIdx.x / 32] = v;
  __syncthreads();
  float m = -FLT_MAX;
  for (int i = 0; i < kSampleThreads / 32; ++i) m = fmaxf(m, s.red_f[i]);
  return m;
}
__device__ unsigned long long block_sum_u64(unsigned long long v, SampleShared& s) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) s.red_u[threadIdx.x / 32] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int i = 0; i < kSampleThreads / 32; ++i) t += s.red_u[i];
  return t;
}

// The key K among the keys >= lower such that the weights of keys > K sum to less than
// target and those of keys >= K to at least target (target >= 1): a radix select over
// the 64-bit keys, 8 bits per pass, with weight 1 (counting: the target-th largest) or
// the fixed-point probability exp(z - zmax) * fixed_scale.
__device__ uint64_t radix_select(const float* logits, int V, float inv_t, float zmax, float fixed_scale,
                                 bool count, uint64_t lower, unsigned long long target, SampleShared& s) {
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.target = target;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    const uint64_t prefix = s.prefix;
    const uint64_t high_mask = shift == 56 ? 0 : ~((uint64_t{1} << (shift + 8)) - 1);
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float z = logits[i] * inv_t;
      const uint64_t key = sample_key(z, i);
      if (key < lower || ((key ^ prefix) & high_mask) != 0) continue;
      const unsigned long long w =
          count ? 1ull : static_cast<unsigned long long>(__expf(z - zmax) * fixed_scale + 0.5f);
      if (w) atomicAdd(&s.hist[(key >> shift) & 255], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = 0, t = s.target;
      int chosen = -1, last_nonzero = -1;
      for (int bin = 255; bin >= 0; --bin) {
        if (s.hist[bin] == 0) continue;
        last_nonzero = bin;
        if (acc + s.hist[bin] >= t) {
          chosen = bin;
          break;
        }
        acc += s.hist[bin];
      }
      if (chosen < 0) {  // rounding left the total just below the target: the least likely bin, its last key
        chosen = last_nonzero < 0 ? 0 : last_nonzero;
        s.target = last_nonzero < 0 ? 1 : s.hist[chosen];
      } else {
        s.target = t - acc;
      }
      s.prefix = prefix | (static_cast<uint64_t>(chosen) << shift);
    }
    __syncthreads();
  }
  const uint64_t result = s.prefix;
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kSampleThreads) sample_kernel(int32_t* tokens, const float* all_logits, int64_t ld,
                                                                 int V, const SampleParams* params_ptr,
                                                                 const uint64_t* prompt_index, const uint64_t* step,
                                                                 const float* part_val, const int32_t* part_idx,
                                                                 int parts) {
  __shared__ SampleShared s;
  pdl_wait();
  pdl_launch_dependents();
  const int row = blockIdx.x;
  const float* logits = all_logits + row * ld;
  const SampleParams params = *params_ptr;
  if (params.greedy) {
    float best = -FLT_MAX;
    int best_id = 0x7fffffff;
    if (part_val) {  // the head's per-block argmax partials
      for (int i = threadIdx.x; i < parts; i += blockDim.x) {
        const float z = part_val[row * parts + i];
        const int id = part_idx[row * parts + i];
        if (z > best || (z == best && id < best_id)) best = z, best_id = id;
      }
    } else {
      for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float z = logits[i];
        if (z > best || (z == best && i < best_id)) best = z, best_id = i;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (ob > best || (ob == best && oi < best_id)) best = ob, best_id = oi;
    }
    __shared__ float wb[kSampleThreads / 32];
    __shared__ int wi[kSampleThreads / 32];
    if (threadIdx.x % 32 == 0) wb[threadIdx.x / 32] = best, wi[threadIdx.x / 32] = best_id;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < kSampleThreads / 32; ++w) {
        if (wb[w] > best || (wb[w] == best && wi[w] < best_id)) best = wb[w], best_id = wi[w];
      }
      tokens[row] = best_id == 0x7fffffff ? 0 : best_id;
    }
    return;
  }
  const float inv_t = 1.0f / params.temperature;
  float m = -FLT_MAX;
  for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, logits[i] * inv_t);
  const float zmax = block_max(m, s);
  uint64_t lower = 0;
  if (params.top_k > 0 && params.top_k < V) {
    lower = radix_select(logits, V, inv_t, zmax, 0.0f, true, 0, static_cast<unsigned long long>(params.top_k), s);
  }
  // The top-k set's normaliser, then fixed-point probabilities renormalised over it.
  float z_sum = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float z = logits[i] * inv_t;
    if (sample_key(z, i) >= lower) z_sum += __expf(z - zmax);
  }
  const float Z = block_sum<kSampleThreads / 32>(z_sum, s.red_f);
  const float fixed_scale = static_cast<float>(kFixedOne) / Z;
  auto mass_at_least = [&](uint64_t bound) {
    unsigned long long part = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float z = logits[i] * inv_t;
      if (sample_key(z, i) >= bound) part += static_cast<unsigned long long>(__expf(z - zmax) * fixed_scale + 0.5f);
    }
    return block_sum_u64(part, s);
  };
  if (params.top_p < 1.0f) {
    const unsigned long long total = mass_at_least(lower);
    unsigned long long target = static_cast<unsigned long long>(ceil(static_cast<double>(params.top_p) * total));
    if (target < 1) target = 1;
    lower = radix_select(logits, V, inv_t, zmax, fixed_scale, false, lower, target, s);
  }
  const unsigned long long mass = mass_at_least(lower);
  const uint64_t st = step[row], pi = prompt_index[row];
  const Philox4x32 words = philox4x32_10({static_cast<uint32_t>(st), static_cast<uint32_t>(st >> 32),
                                          static_cast<uint32_t>(pi), static_cast<uint32_t>(pi >> 32)},
                                         static_cast<uint32_t>(params.seed), static_cast<uint32_t>(params.seed >> 32));
  const uint64_t bits = ((static_cast<uint64_t>(words.x) << 32) | words.y) >> 11;
  const double u = static_cast<double>(bits) * 0x1.0p-53;
  unsigned long long target = static_cast<unsigned long long>(u * static_cast<double>(mass)) + 1;
  if (target > mass) target = mass;
  const uint64_t key = radix_select(logits, V, inv_t, zmax, fixed_scale, false, lower, target, s);
  if (threadIdx.x == 0) tokens[row] = key_id(key);
}

}  // namespace

// Launches `kernel` on `stream`, with programmatic dependent launch when asked.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream, bool programmatic,
            const char* name, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = shared, config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute, config.numAttrs = programmatic ? 1 : 0;
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  if (status != cudaSuccess) cuda_error_throw(status, name, __FILE__, __LINE__);
}

void embed(float* x, const TokenPlace* places, const float* wte, const float* wpe, int N, int C, cudaStream_t stream) {
  if (N == 0) return;
  embed_kernel<<<N, 256, 0, stream>>>(x, places, wte, wpe, C, nullptr);
  FLASHGPT_CUDA_CHECK_LAUNCH("embed_kernel");
}

void residual_layernorm(float* x, const bf16* y, const float* bias, const float* w, const float* b, bf16* h,
                        const int32_t* row_index, int rows, int C, bool write_x, cudaStream_t stream,
                        int loads_first) {
  if (rows == 0) return;
  if (C > 32 * kLnMaxPerLane) throw std::runtime_error("residual_layernorm: C above 2048");
  constexpr int kWarps = 4;
  static const bool loads_first_env = [] {
    const char* v = std::getenv("FLASHGPT_DECODE_LN_LOADS_FIRST");
    return v == nullptr || std::string(v) != "0";
  }();
  if (loads_first < 0) loads_first = loads_first_env ? 1 : 0;
  using Kernel = void (*)(float*, const bf16*, const float*, const float*, const float*, bf16*, const int32_t*, int,
                         int, bool);
  static constexpr Kernel kByPer[] = {residual_layernorm_kernel<8>,  residual_layernorm_kernel<16>,
                                      residual_layernorm_kernel<24>, residual_layernorm_kernel<32>,
                                      residual_layernorm_kernel<40>, residual_layernorm_kernel<48>,
                                      residual_layernorm_kernel<56>, residual_layernorm_kernel<64>};
  const Kernel kernel = loads_first ? kByPer[(C + 255) / 256 - 1] : residual_layernorm_kernel<0>;
  kernel<<<(rows + kWarps - 1) / kWarps, 32 * kWarps, 0, stream>>>(x, y, bias, w, b, h, row_index, rows, C, write_x);
  FLASHGPT_CUDA_CHECK_LAUNCH("residual_layernorm_kernel");
}

void split_qkv(bf16* q, bf16* k_cache, bf16* v_cache, const bf16* qkv, const float* bias, const TokenPlace* places,
               int N, int C, int64_t slot_stride, cudaStream_t stream) {
  if (N == 0) return;
  split_qkv_kernel<<<N, 256, 0, stream>>>(q, k_cache, v_cache, qkv, bias, places, C, slot_stride);
  FLASHGPT_CUDA_CHECK_LAUNCH("split_qkv_kernel");
}

void bias_gelu(bf16* ff, const float* bias, int64_t N, int F, cudaStream_t stream) {
  const int64_t count = N * F;
  if (count == 0) return;
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4096);
  bias_gelu_kernel<<<static_cast<int>(blocks), 256, 0, stream>>>(ff, bias, count, F);
  FLASHGPT_CUDA_CHECK_LAUNCH("bias_gelu_kernel");
}

bool gemv(void* y, bool y_f32, int64_t ldy, const bf16* x, const bf16* w, const float* bias_gelu, int rows, int in,
          int out, cudaStream_t stream) {
  if (rows < 1 || rows > kGemvMaxRows || in % 8 != 0 || rows * in * 2 > 48 * 1024) return false;
  const dim3 grid((out + kGemvWarps - 1) / kGemvWarps);
  const size_t shared = static_cast<size_t>(rows) * in * 2;
  switch (rows) {
#define FLASHGPT_GEMV_CASE(R) \
  case R: gemv_kernel<R><<<grid, 32 * kGemvWarps, shared, stream>>>(y, y_f32, ldy, x, w, bias_gelu, in, out); break;
    FLASHGPT_GEMV_CASE(1) FLASHGPT_GEMV_CASE(2) FLASHGPT_GEMV_CASE(3) FLASHGPT_GEMV_CASE(4)
    FLASHGPT_GEMV_CASE(5) FLASHGPT_GEMV_CASE(6) FLASHGPT_GEMV_CASE(7) FLASHGPT_GEMV_CASE(8)
#undef FLASHGPT_GEMV_CASE
  }
  FLASHGPT_CUDA_CHECK_LAUNCH("gemv_kernel");
  return true;
}

void sample(int32_t* tokens, const float* logits, int64_t ld, int V, int rows, const SampleParams* params,
            const uint64_t* prompt_index, const uint64_t* step, cudaStream_t stream, const float* part_val,
            const int32_t* part_idx, int parts, bool programmatic) {
  if (rows == 0) return;
  launch(sample_kernel, dim3(rows), dim3(kSampleThreads), 0, stream, programmatic, "sample_kernel", tokens, logits, ld,
         V, params, prompt_index, step, part_val, part_idx, parts);
}

// The input rows (bf16), then, with the block-wide LayerNorm (rows <= 2), its block sums
// (2, warps, rows) floats.
size_t gemv_fused_shared(int rows, int in, bool ln) {
  return static_cast<size_t>(rows) * in * 2 + (ln && rows <= 2 ? sizeof(float) * 2 * kFusedWarps * rows : 0);
}

// The current device's multiprocessors (read once per process).
static int multiprocessors() {
  static const int sms = [] {
    int device = 0, n = 0;
    FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
    FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return sms;
}

int gemv_fused_blocks(int out) {
  static const int cap = [] {
    const int sms = multiprocessors();
    // FLASHGPT_GEMV_BLOCKS_PER_SM=1 or 2 (A/B timing, read once per process): a smaller grid
    // leaves each multiprocessor room for the next kernel's blocks to become resident (and
    // issue their weight loads) while this kernel runs; 3 fill its registers.
    int per_sm = kFusedBlocksPerSm;
    if (const char* v = std::getenv("FLASHGPT_GEMV_BLOCKS_PER_SM")) {
      const int n = std::atoi(v);
      if (n >= 1 && n <= kFusedBlocksPerSm) per_sm = n;
    }
    return per_sm * sms;  // one wave: every block resident
  }();
  return std::max(1, std::min((out + kFusedWarps - 1) / kFusedWarps, cap));
}

template <int R, int RPW>
void launch_gemv_fused(const FusedGemvParams& p, GemvEpilogue e, cudaStream_t stream) {
  const dim3 grid(gemv_fused_blocks(p.out)), block(32 * kFusedWarps);
  const size_t shared = gemv_fused_shared(R, p.in, p.ln_w != nullptr);
  switch (e) {
#define FLASHGPT_FUSED_CASE(EPI)                                                                               \
  case GemvEpilogue::EPI:                                                                                      \
    launch(gemv_fused_kernel<R, GemvEpilogue::EPI, RPW>, grid, block, shared, stream, p.programmatic,         \
           "gemv_fused_kernel", p);                                                                            \
    break;
    FLASHGPT_FUSED_CASE(store_bf16) FLASHGPT_FUSED_CASE(bias_gelu) FLASHGPT_FUSED_CASE(residual)
    FLASHGPT_FUSED_CASE(qkv_cache) FLASHGPT_FUSED_CASE(logits_argmax)
#undef FLASHGPT_FUSED_CASE
  }
}

// The tensor-core kernel's shared memory: gemv_fused_kernel's, then the partial tiles.
static size_t gemv_mma_shared(const FusedGemvParams& p) {
  return gemv_fused_shared(p.rows, p.in, p.ln_w != nullptr) + kMmaPartialBytes;
}
constexpr size_t kMmaSharedMax = 48 * 1024 + kMmaPartialBytes;  // gemv_fused's largest input rows, then the partials

bool gemv_mma_taken(const FusedGemvParams& p, GemvEpilogue e) {
  return p.mma && e != GemvEpilogue::logits_argmax && p.rows >= 2 && p.rows <= kGemvMaxRows && p.in > 0 &&
         p.in % 8 == 0 && p.out > 0 && gemv_mma_shared(p) <= kMmaSharedMax;
}

static std::atomic<int64_t> mma_launches{0};
int64_t gemv_mma_launch_count() { return mma_launches.load(); }

template <int R, GemvEpilogue E>
void launch_gemv_mma(const FusedGemvParams& p, cudaStream_t stream) {
  static const bool configured = [] {  // the partial tiles take fc_proj at 8 rows past the default 48 KB
    FLASHGPT_CUDA_CHECK(cudaFuncSetAttribute(gemv_mma_kernel<R, E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(kMmaSharedMax)));
    return true;
  }();
  (void)configured;
  const int tiles = (p.out + 15) / 16;
  const int grid = std::min(tiles, kFusedBlocksPerSm * multiprocessors());  // one wave
  launch(gemv_mma_kernel<R, E>, dim3(grid), dim3(32 * kFusedWarps), gemv_mma_shared(p), stream, p.programmatic,
         "gemv_mma_kernel", p);
  ++mma_launches;
}

template <GemvEpilogue E>
void launch_gemv_mma_rows(const FusedGemvParams& p, cudaStream_t stream) {
  switch (p.rows) {
#define FLASHGPT_MMA_ROWS(R) case R: launch_gemv_mma<R, E>(p, stream); break;
    FLASHGPT_MMA_ROWS(2) FLASHGPT_MMA_ROWS(3) FLASHGPT_MMA_ROWS(4) FLASHGPT_MMA_ROWS(5) FLASHGPT_MMA_ROWS(6)
    FLASHGPT_MMA_ROWS(7) FLASHGPT_MMA_ROWS(8)
#undef FLASHGPT_MMA_ROWS
  }
}

bool gemv_fused(const FusedGemvParams& p, GemvEpilogue e, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > kGemvMaxRows || p.in % 8 != 0 || p.in <= 0 || p.out <= 0 ||
      gemv_fused_shared(p.rows, p.in, p.ln_w != nullptr) +
              (e == GemvEpilogue::logits_argmax ? 2 * sizeof(float) * kFusedWarps * p.rows : 0) >  // its static arrays
          48 * 1024) {
    return false;
  }
  if (!p.w || (p.ln_w ? !p.x_f32 || !p.ln_b : !p.x_bf16)) throw std::invalid_argument("gemv_fused: null input");
  if (gemv_mma_taken(p, e)) {
    switch (e) {
      case GemvEpilogue::store_bf16: launch_gemv_mma_rows<GemvEpilogue::store_bf16>(p, stream); break;
      case GemvEpilogue::bias_gelu: launch_gemv_mma_rows<GemvEpilogue::bias_gelu>(p, stream); break;
      case GemvEpilogue::residual: launch_gemv_mma_rows<GemvEpilogue::residual>(p, stream); break;
      case GemvEpilogue::qkv_cache: launch_gemv_mma_rows<GemvEpilogue::qkv_cache>(p, stream); break;
      case GemvEpilogue::logits_argmax: break;  // not taken (gemv_mma_taken)
    }
    return true;
  }
  // Two rows of W per warp at a time when a row takes at most half the load slots, every
  // warp has two rows or more (the head) and there are at most 4 input rows (above, the
  // accumulators spill). FLASHGPT_GEMV_TWO_ROWS=0 turns it off (A/B timing).
  static const bool two_rows = [] {
    const char* v = std::getenv("FLASHGPT_GEMV_TWO_ROWS");
    return !(v && std::string(v) == "0");
  }();
  const bool rpw2 = two_rows && p.in <= 32 * 8 * (kFusedUnroll / 2) && p.rows <= 4 &&  // more rows spill
                    p.out >= 2 * kFusedWarps * gemv_fused_blocks(p.out);            // every warp has 2 rows
  if (p.wide && e == GemvEpilogue::residual && !rpw2 && p.in > 32 * 8 * kFusedUnroll &&
      p.in <= 32 * 8 * kFusedUnrollWide) {
    const dim3 grid(gemv_fused_blocks(p.out)), block(32 * kFusedWarps);
    const size_t shared = gemv_fused_shared(p.rows, p.in, p.ln_w != nullptr);
    switch (p.rows) {
#define FLASHGPT_FUSED_WIDE(R)                                                                                      \
  case R:                                                                                                           \
    launch(gemv_fused_kernel<R, GemvEpilogue::residual, 1, kFusedUnrollWide>, grid, block, shared, stream,          \
           p.programmatic, "gemv_fused_kernel", p);                                                                 \
    break;
      FLASHGPT_FUSED_WIDE(1) FLASHGPT_FUSED_WIDE(2) FLASHGPT_FUSED_WIDE(3) FLASHGPT_FUSED_WIDE(4)
      FLASHGPT_FUSED_WIDE(5) FLASHGPT_FUSED_WIDE(6) FLASHGPT_FUSED_WIDE(7) FLASHGPT_FUSED_WIDE(8)
#undef FLASHGPT_FUSED_WIDE
    }
    return true;
  }
  switch (p.rows * 2 + (rpw2 ? 1 : 0)) {
#define FLASHGPT_FUSED_ROWS(R) case 2 * R: launch_gemv_fused<R, 1>(p, e, stream); break;
#define FLASHGPT_FUSED_ROWS2(R) case 2 * R + 1: launch_gemv_fused<R, 2>(p, e, stream); break;
    FLASHGPT_FUSED_ROWS(1) FLASHGPT_FUSED_ROWS(2) FLASHGPT_FUSED_ROWS(3) FLASHGPT_FUSED_ROWS(4)
    FLASHGPT_FUSED_ROWS(5) FLASHGPT_FUSED_ROWS(6) FLASHGPT_FUSED_ROWS(7) FLASHGPT_FUSED_ROWS(8)
    FLASHGPT_FUSED_ROWS2(1) FLASHGPT_FUSED_ROWS2(2) FLASHGPT_FUSED_ROWS2(3) FLASHGPT_FUSED_ROWS2(4)  // rpw2: rows <= 4
#undef FLASHGPT_FUSED_ROWS
#undef FLASHGPT_FUSED_ROWS2
  }
  return true;
}

void embed_fused(float* x, const TokenPlace* places, const float* wte, const float* wpe, int N, int C,
                 bool programmatic, cudaStream_t stream, float2* stats) {
  if (N == 0) return;
  if (stats && C % 32 != 0) throw std::invalid_argument("embed_fused: statistics need d_model % 32 == 0");
  launch(embed_kernel, dim3(N), dim3(256), 0, stream, programmatic, "embed_kernel", x, places, wte, wpe, C, stats);
}

// ---- attention + proj in one kernel ------------------------------------------------------

namespace {

constexpr int kApThreads = 256;
constexpr int kApWarps = kApThreads / 32;
constexpr int kApPre = 8;  // W_proj loads per thread issued before the wait

__device__ __forceinline__ uint4 load_cg(const bf16* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

// Sum over the TPK lanes of a group (aligned within the warp; TPK a power of two <= 16),
// always in the same order.
template <int TPK>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = TPK / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float dot8(const uint4& a, const float* b) {
  float f[8];
  bf16x8_to_float(a, f);
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += f[k] * b[k];
  return s;
}

// Thread t is lane `part` (dims part*8 .. part*8+7) of key group g = t / TPK; group g takes
// keys g, g + KPP, g + 2 KPP, ... and columns c0 + g, c0 + g + KPP, ... of the block's slice.
template <int E>
__global__ void __launch_bounds__(kApThreads) attention_proj_kernel(AttentionProjParams p, float scale_log2) {
  constexpr int D = 32 * E, TPK = D / 8, KPP = kApThreads / TPK;
  constexpr int U = E == 4 ? 4 : 8;  // keys a lane loads before it uses the first
  const int j = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
  const int t = threadIdx.x, g = t / TPK, part = t % TPK, warp = t / 32, lane = t % 32;
  const int C = p.C;
  const int cols = (C + p.col_blocks - 1) / p.col_blocks;
  const int c0 = min(C, j * cols), c1 = min(C, c0 + cols);
  // Before the wait: what no earlier kernel writes. The block's W_proj slice (first kApPre
  // columns of this group), the row's length and slot (the step's host copy), and the
  // row's K/V rows toward L2 (shared among the col_blocks blocks of (row, head)).
  const bf16* wh = p.w + h * D + part * 8;
  uint4 wv[kApPre];
#pragma unroll
  for (int i = 0; i < kApPre; ++i) {
    const int c = c0 + g + KPP * i;
    wv[i] = c < c1 ? load_stream(reinterpret_cast<const uint4*>(wh + static_cast<int64_t>(c) * C))
                   : make_uint4(0, 0, 0, 0);
  }
  const int len = p.lengths[r];
  const int64_t head0 = static_cast<int64_t>(p.slots[r]) * p.slot_stride + h * D;
  for (int key = j * (kApThreads / 2) + t / 2; key < len; key += p.col_blocks * (kApThreads / 2)) {
    const bf16* row = (t & 1 ? p.v_cache : p.k_cache) + head0 + static_cast<int64_t>(key) * C;
#pragma unroll
    for (int c = 0; c < D; c += 64) prefetch_l2(row + c);
  }
  const int64_t qrow = p.q_rows[r];
  const int64_t block = (static_cast<int64_t>(r) * gridDim.y + h) * gridDim.x + j;
  prefetch_l2_range(p.l2_prefetch.ptr, p.l2_prefetch.bytes, block * kApThreads + t,
                    static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z * kApThreads);
  pdl_wait();
  pdl_launch_dependents();
  extern __shared__ float ap_shared[];
  float* scores = ap_shared;                             // (max_length rounded up to 4)
  float* red = scores + (p.max_length + 3) / 4 * 4;      // (KPP, D)
  float* red_l = red + KPP * D;                          // (KPP)
  float* oh = red_l + KPP;                               // (D) the head's output, bf16-rounded
  float* wred = oh + D;                                  // (warps)
  float qf[8];
  bf16x8_to_float(load_cg(p.q + qrow * C + h * D + part * 8), qf);
#pragma unroll
  for (int k = 0; k < 8; ++k) qf[k] *= scale_log2;
  const bf16* kb = p.k_cache + head0 + part * 8;
  const bf16* vb = p.v_cache + head0 + part * 8;
  // The first round's V rows go out with the K rows: they do not depend on the scores, so
  // at up to KPP x U keys (256 at head dim 64) K and V cost one round trip, not two.
  uint4 v0[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int key = g + u * KPP;
    v0[u] = key < len ? load_cg(vb + static_cast<int64_t>(key) * C) : make_uint4(0, 0, 0, 0);
  }
  // Scores (log2 domain). The loop bounds are the same for every thread (shuffles inside).
  for (int base = 0; base < len; base += KPP * U) {
    uint4 kv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + g + u * KPP;
      kv[u] = key < len ? load_cg(kb + static_cast<int64_t>(key) * C) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + g + u * KPP;
      const float s = group_sum<TPK>(dot8(kv[u], qf));
      if (part == 0 && key < len) scores[key] = s;
    }
  }
  __syncthreads();
  float m = -FLT_MAX;
  for (int i = t; i < len; i += kApThreads) m = fmaxf(m, scores[i]);
  m = warp_max(m);
  if (lane == 0) wred[warp] = m;
  __syncthreads();
  m = wred[0];
#pragma unroll
  for (int w = 1; w < kApWarps; ++w) m = fmaxf(m, wred[w]);
  float acc[8] = {}, l = 0.0f;
  auto accumulate = [&](const uint4 (&vv)[U], int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + g + u * KPP;
      if (key < len) {
        const float pj = exp2f(scores[key] - m);
        l += pj;
        float vf[8];
        bf16x8_to_float(vv[u], vf);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += pj * vf[k];
      }
    }
  };
  accumulate(v0, 0);
  for (int base = KPP * U; base < len; base += KPP * U) {
    uint4 vv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + g + u * KPP;
      vv[u] = key < len ? load_cg(vb + static_cast<int64_t>(key) * C) : make_uint4(0, 0, 0, 0);
    }
    accumulate(vv, base);
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) red[g * D + part * 8 + k] = acc[k];
  if (part == 0) red_l[g] = l;
  __syncthreads();
  if (t < D) {
    float o = 0.0f, L = 0.0f;
    for (int gg = 0; gg < KPP; ++gg) o += red[gg * D + t], L += red_l[gg];
    oh[t] = __bfloat162float(__float2bfloat16(o / L));  // as the fused path stores it
  }
  __syncthreads();
  // The head's partial products for this block's columns.
  float of[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) of[k] = oh[part * 8 + k];
  float* out = p.partials + (static_cast<int64_t>(r) * p.heads + h) * C;
#pragma unroll
  for (int i = 0; i < kApPre; ++i) {
    const int c = c0 + g + KPP * i;
    if (c0 + KPP * i >= c1) break;  // the same for every thread
    const float s = group_sum<TPK>(dot8(wv[i], of));
    if (part == 0 && c < c1) out[c] = s;
  }
  for (int i = kApPre; c0 + KPP * i < c1; ++i) {
    const int c = c0 + g + KPP * i;
    const uint4 w = c < c1 ? load_stream(reinterpret_cast<const uint4*>(wh + static_cast<int64_t>(c) * C))
                           : make_uint4(0, 0, 0, 0);
    const float s = group_sum<TPK>(dot8(w, of));
    if (part == 0 && c < c1) out[c] = s;
  }
  // The last block of (row, j) adds the heads' partials in order (the threadfence-reduction
  // pattern).
  __threadfence();
  __syncthreads();
  __shared__ unsigned ticket;
  unsigned* counter = p.counters + r * p.col_blocks + j;
  if (t == 0) ticket = atomicAdd(counter, 1u);
  __syncthreads();
  if (ticket != static_cast<unsigned>(p.heads - 1)) return;
  if (t == 0) *counter = 0;  // ready for the next launch
  __threadfence();
  float* res = p.residual + qrow * C;
  const float* parts = p.partials + static_cast<int64_t>(r) * p.heads * C;
  for (int c = c0 + t; c < c1; c += kApThreads) {
    float s = 0.0f;
    for (int hh = 0; hh < p.heads; ++hh) s += __ldcg(parts + static_cast<int64_t>(hh) * C + c);
    res[c] = res[c] + (s + p.bias[c]);
  }
  if (!p.ln_stats) return;
  // The column block's LayerNorm statistics (mean, M2) for ln2: two block sums, warps added
  // in order (this thread reads back its own stores).
  float s1 = 0.0f;
  for (int c = c0 + t; c < c1; c += kApThreads) s1 += res[c];
  const float mean = c1 > c0 ? block_sum<kApWarps>(s1, wred) / static_cast<float>(c1 - c0) : 0.0f;
  float s2 = 0.0f;
  for (int c = c0 + t; c < c1; c += kApThreads) s2 += (res[c] - mean) * (res[c] - mean);
  const float m2 = c1 > c0 ? block_sum<kApWarps>(s2, wred) : 0.0f;
  if (t == 0) p.ln_stats[r * p.col_blocks + j] = make_float2(mean, m2);
}

size_t attention_proj_shared(int head_dim, int max_length) {
  const int kpp = kApThreads / (head_dim / 8);
  return sizeof(float) * ((max_length + 3) / 4 * 4 + static_cast<size_t>(kpp) * head_dim + kpp + head_dim + kApWarps);
}

}  // namespace

int attention_proj_col_blocks(int rows, int heads) {
  const int blocks = rows * heads;
  return std::max(1, std::min(8, (128 + blocks - 1) / blocks));
}

bool attention_proj_supported(int head_dim, int max_length, int col_blocks) {
  return (head_dim == 32 || head_dim == 64 || head_dim == 128) && max_length >= 1 && col_blocks >= 1 &&
         col_blocks <= 64 && attention_proj_shared(head_dim, max_length) <= 48 * 1024;
}

void attention_proj(const AttentionProjParams& p, cudaStream_t stream) {
  if (!p.q || !p.k_cache || !p.v_cache || !p.q_rows || !p.slots || !p.lengths || !p.w || !p.bias || !p.residual ||
      !p.partials || !p.counters) {
    throw std::invalid_argument("attention_proj: null pointer");
  }
  if (p.rows < 0 || p.heads <= 0 || p.C != p.heads * p.head_dim || !attention_proj_supported(p.head_dim, p.max_length, p.col_blocks)) {
    throw std::invalid_argument("attention_proj: shape it does not take (rows " + std::to_string(p.rows) + ", heads " +
                                std::to_string(p.heads) + ", head_dim " + std::to_string(p.head_dim) + ", C " +
                                std::to_string(p.C) + ", max_length " + std::to_string(p.max_length) +
                                ", col_blocks " + std::to_string(p.col_blocks) + ")");
  }
  if (p.rows == 0) return;
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(p.head_dim));
  const dim3 grid(p.col_blocks, p.heads, p.rows), block(kApThreads);
  const size_t shared = attention_proj_shared(p.head_dim, p.max_length);
  switch (p.head_dim) {
    case 32: return launch(attention_proj_kernel<1>, grid, block, shared, stream, p.programmatic, "attention_proj_kernel", p, scale_log2);
    case 64: return launch(attention_proj_kernel<2>, grid, block, shared, stream, p.programmatic, "attention_proj_kernel", p, scale_log2);
    default: return launch(attention_proj_kernel<4>, grid, block, shared, stream, p.programmatic, "attention_proj_kernel", p, scale_log2);
  }
}

// ---- ln2 + fc + GELU + fc_proj + residual in one kernel -------------------------------------

namespace {

constexpr int kMlpThreads = 256;
constexpr int kMlpWarps = kMlpThreads / 32;
constexpr int kMlpChunk = 32;    // columns a reducing block owns
constexpr int kMlpFcPre = 3;     // loads a lane of each of its warp's two fc rows before the wait (all at C 768)
constexpr int kMlpProjPre = 6;   // loads a thread of the block's W_fcp slice before the wait (all at C 768)
static_assert(kMlpSlice == 2 * kMlpWarps, "two fc rows a warp");

__device__ __forceinline__ unsigned long long load_acquire_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

template <int R>
__global__ void __launch_bounds__(kMlpThreads, 2) mlp_kernel(MlpParams p) {
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int C = p.C, F = p.F, chunks = C / 8;
  const int f0 = blockIdx.x * kMlpSlice, fa = f0 + 2 * warp;  // this warp's fc rows: fa and fa + 1
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // Before the wait, what no earlier kernel writes: the warp's two fc rows, the block's
  // W_fcp slice (thread t: output column t / 2 + 128 u, inputs f0 + 8 (t & 1) .. + 8) and
  // fc's biases.
  const uint4* wa = reinterpret_cast<const uint4*>(p.fc_w + static_cast<int64_t>(fa) * C);
  const uint4* wb = wa + chunks;
  uint4 wfa[kMlpFcPre], wfb[kMlpFcPre];
#pragma unroll
  for (int u = 0; u < kMlpFcPre; ++u) {
    const int i = lane + 32 * u;
    wfa[u] = i < chunks ? load_stream(wa + i) : zero;
    wfb[u] = i < chunks ? load_stream(wb + i) : zero;
  }
  const int half = t & 1;
  const bf16* wp0 = p.fcp_w + f0 + 8 * half;
  auto proj_load = [&](int u) {
    const int c = t / 2 + (kMlpThreads / 2) * u;
    return c < C ? load_stream(reinterpret_cast<const uint4*>(wp0 + static_cast<int64_t>(c) * F)) : zero;
  };
  uint4 wp[kMlpProjPre];
#pragma unroll
  for (int u = 0; u < kMlpProjPre; ++u) wp[u] = proj_load(u);
  const float bias_a = p.fc_b[fa], bias_b = p.fc_b[fa + 1];
  for (const L2Range& range : p.l2_prefetch) {
    prefetch_l2_range(range.ptr, range.bytes, static_cast<int64_t>(blockIdx.x) * kMlpThreads + t,
                      static_cast<int64_t>(gridDim.x) * kMlpThreads);
  }
  pdl_wait();
  pdl_launch_dependents();
  __shared__ float hs[R][kMlpSlice];  // the slice's GELU outputs, bf16-rounded as the fused path stores them
  __shared__ float red[kMlpWarps][R][kMlpChunk];
  __shared__ unsigned long long ticket_s;
  // ln2 from the statistics attention_proj left: no reduction over the row.
  float2 ms[R];
#pragma unroll
  for (int r = 0; r < R; ++r) ms[r] = ln_stats_merge(p.ln_stats + r * p.ln_parts, p.ln_parts, p.ln_width, C);
  const float4* g4 = reinterpret_cast<const float4*>(p.ln_w);
  const float4* h4 = reinterpret_cast<const float4*>(p.ln_b);
  float acc_a[R] = {}, acc_b[R] = {};
  auto fc_chunk = [&](int i, const uint4& va, const uint4& vb) {
    const float4 g0 = g4[2 * i], g1 = g4[2 * i + 1], b0 = h4[2 * i], b1 = h4[2 * i + 1];
    const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
    const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
    float fa8[8], fb8[8];
    bf16x8_to_float(va, fa8);
    bf16x8_to_float(vb, fb8);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4* x4 = reinterpret_cast<const float4*>(p.x + static_cast<int64_t>(r) * C) + 2 * i;
      const float4 x0 = x4[0], x1 = x4[1];
      const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float xn = __bfloat162float(__float2bfloat16((xv[k] - ms[r].x) * ms[r].y * g[k] + b[k]));
        acc_a[r] += fa8[k] * xn;
        acc_b[r] += fb8[k] * xn;
      }
    }
  };
#pragma unroll
  for (int u = 0; u < kMlpFcPre; ++u) {
    const int i = lane + 32 * u;
    if (i < chunks) fc_chunk(i, wfa[u], wfb[u]);
  }
  for (int i = lane + 32 * kMlpFcPre; i < chunks; i += 32) fc_chunk(i, load_stream(wa + i), load_stream(wb + i));
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float a = warp_sum(acc_a[r]), b = warp_sum(acc_b[r]);
    if (lane == 0) {
      hs[r][2 * warp] = __bfloat162float(__float2bfloat16(gelu_tanh(a + bias_a)));
      hs[r][2 * warp + 1] = __bfloat162float(__float2bfloat16(gelu_tanh(b + bias_b)));
    }
  }
  __syncthreads();
  // The block's partial of fc_proj over its slice, every output column; a pair of threads
  // per column adds its two halves.
  float* part = p.partials + static_cast<int64_t>(blockIdx.x) * R * C;
  auto proj = [&](int u, const uint4& w) {
    const int c = t / 2 + (kMlpThreads / 2) * u;
    float wf[8];
    bf16x8_to_float(w, wf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k) s += wf[k] * hs[r][8 * half + k];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      if (half == 0 && c < C) part[r * C + c] = s;
    }
  };
#pragma unroll
  for (int u = 0; u < kMlpProjPre; ++u) proj(u, wp[u]);
  for (int u = kMlpProjPre; (kMlpThreads / 2) * u < C; ++u) proj(u, proj_load(u));  // C > 768
  // Arrival. The last K = C / 32 blocks to arrive reduce a 32-column chunk each, once
  // every block has arrived (all are resident: mlp_fused_plan). The ticket counter only
  // grows (a launch adds exactly its grid), so nothing resets it.
  __threadfence();
  __syncthreads();
  if (t == 0) ticket_s = atomicAdd(p.arrive, 1ull);
  __syncthreads();
  const unsigned long long ticket = ticket_s;
  const int G = static_cast<int>(gridDim.x), K = C / kMlpChunk;
  const int pos = static_cast<int>(ticket % static_cast<unsigned long long>(G));
  if (pos < G - K) return;
  const int k = pos - (G - K);
  if (t == 0) {
    const unsigned long long all = ticket - static_cast<unsigned long long>(pos) + static_cast<unsigned long long>(G);
    while (load_acquire_u64(p.arrive) < all) {
    }
  }
  __syncthreads();
  __threadfence();
  // Warp w sums blocks w, w + 8, ... in order; warp 0 adds the warps' sums in order.
  const int c = kMlpChunk * k + lane;
  float s[R] = {};
#pragma unroll 4
  for (int b = warp; b < G; b += kMlpWarps) {
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] += __ldcg(p.partials + (static_cast<int64_t>(b) * R + r) * C + c);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) red[warp][r][lane] = s[r];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kMlpWarps; ++w) total += red[w][r][lane];
    float* xr = p.x + static_cast<int64_t>(r) * C + c;
    const float v = *xr + (total + p.fcp_b[c]);
    *xr = v;
    const float2 st = warp_chunk_stats(v);  // the next LayerNorm's statistics of this chunk
    if (lane == 0) p.stats_out[r * K + k] = st;
  }
}

using MlpKernel = void (*)(MlpParams);
MlpKernel mlp_kernel_for(int rows) {
  switch (rows) {
    case 1: return mlp_kernel<1>;
    case 2: return mlp_kernel<2>;
    case 3: return mlp_kernel<3>;
    default: return mlp_kernel<4>;
  }
}
static_assert(kMlpMaxRows == 4, "mlp_kernel_for");

}  // namespace

MlpPlan mlp_fused_plan(int rows_max, int C, int F) {
  MlpPlan plan;
  auto refuse = [&](std::string why) {
    plan.why = std::move(why);
    return plan;
  };
  if (C <= 0 || C % kMlpChunk != 0 || C > 2048) {
    return refuse("d_model " + std::to_string(C) + " is not a multiple of 32 up to 2048");
  }
  if (F <= 0 || F % kMlpSlice != 0) return refuse("d_ff " + std::to_string(F) + " is not a multiple of 16");
  const int grid = F / kMlpSlice;
  if (C / kMlpChunk > grid) {
    return refuse("d_model / 32 = " + std::to_string(C / kMlpChunk) + " reducing blocks exceed the grid of d_ff / 16 = " +
                  std::to_string(grid));
  }
  if (rows_max < 1) return refuse("no rows");
  int device = 0, sms = 0;
  FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int rows = 0;
  for (int r = 1; r <= std::min(rows_max, kMlpMaxRows); ++r) {
    int per_sm = 0;
    FLASHGPT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mlp_kernel_for(r), kMlpThreads, 0));
    if (per_sm * sms < grid) break;
    rows = r;
  }
  if (rows == 0) {
    return refuse("its grid of " + std::to_string(grid) + " blocks is not resident at once on " + std::to_string(sms) +
                  " multiprocessors");
  }
  plan.ok = true, plan.rows_max = rows, plan.grid = grid;
  return plan;
}

void mlp_fused(const MlpParams& p, const MlpPlan& plan, cudaStream_t stream) {
  if (!p.x || !p.ln_w || !p.ln_b || !p.ln_stats || !p.fc_w || !p.fc_b || !p.fcp_w || !p.fcp_b || !p.partials ||
      !p.arrive || !p.stats_out) {
    throw std::invalid_argument("mlp_fused: null pointer");
  }
  if (!plan.ok || p.rows < 1 || p.rows > plan.rows_max || p.F / kMlpSlice != plan.grid || p.F % kMlpSlice != 0 ||
      p.C % kMlpChunk != 0 || p.ln_parts < 1 || p.ln_width < 1) {
    throw std::invalid_argument("mlp_fused: shape its plan does not take (rows " + std::to_string(p.rows) + ", C " +
                                std::to_string(p.C) + ", F " + std::to_string(p.F) + ", plan rows " +
                                std::to_string(plan.rows_max) + ")");
  }
  launch(mlp_kernel_for(p.rows), dim3(plan.grid), dim3(kMlpThreads), 0, stream, p.programmatic, "mlp_kernel", p);
}

}  // namespace inference_cuda

// ---- flash-decoding --------------------------------------------------------------------

namespace {

using inference_cuda::bf16;
using inference_cuda::pdl_launch_dependents;
using inference_cuda::pdl_wait;
using inference_cuda::prefetch_l2;
using inference_cuda::warp_sum;
constexpr int kDecodeWarps = 4;

__host__ __device__ inline int max_splits(int max_length, int keys_per_split) { return (max_length + keys_per_split - 1) / keys_per_split; }

// Combines row r, head h's `used` partials (one warp): o = sum_s 2^(m_s - M) o_s /
// sum_s 2^(m_s - M) l_s. Loads through L2 (__ldcg): other blocks of the same grid wrote them.
template <int E>
__device__ void decode_combine_warp(const DecodeAttentionCudaParams& p, int r, int h, int lane) {
  constexpr int D = 32 * E;
  const int len = p.lengths[r];
  const int used = (len + p.keys_per_split - 1) / p.keys_per_split;
  const int splits = max_splits(p.max_length, p.keys_per_split);
  const float* parts = p.partials + (static_cast<int64_t>(r) * p.heads + h) * splits * (D + 2);
  float M = -FLT_MAX;
  for (int s = lane; s < used; s += 32) M = fmaxf(M, __ldcg(parts + s * (D + 2) + D));
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  float L = 0.0f, acc[E] = {};
#pragma unroll 4
  for (int s = 0; s < used; ++s) {
    const float* part = parts + s * (D + 2);
    const float f = exp2f(__ldcg(part + D) - M);
    L += f * __ldcg(part + D + 1);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += f * __ldcg(part + lane * E + e);
  }
  bf16* o = static_cast<bf16*>(p.o) + p.q_rows[r] * p.o_row_stride + h * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) o[e] = __float2bfloat16(acc[e] / L);
}

// Block (split s, head h, row r): keys s*KS .. min(len, (s+1)*KS) - 1. Lane l holds the
// head's dims l*E .. l*E + E - 1; warp w takes keys start + w, start + w + 4, ..., loading
// G keys before it uses the first (each load is E bf16 a lane, so G bounds the bytes a warp
// has in flight: at batch 64 every block waits on its own short chain of loads). Scores are kept in the log2 domain (q
// pre-scaled by scale * log2(e)). With counters, the last block of (h, r) combines.
template <int E, int G>
__global__ void __launch_bounds__(32 * kDecodeWarps) decode_partial_kernel(DecodeAttentionCudaParams p, float scale_log2) {
  constexpr int D = 32 * E;
  // The rows, slots and lengths come from the step's host copy, which every kernel of the
  // chain follows: readable before the wait. So is the cache toward L2: the kernel before
  // this one writes the newest K/V row, and a prefetch toward L2 cannot see a stale line.
  const int s = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
  const int len = p.lengths[r];
  const int start = s * p.keys_per_split;
  const int end = min(len, start + p.keys_per_split);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t head0 = static_cast<int64_t>(p.slots[r]) * p.slot_stride + h * D;  // key 0 of this head
  const int64_t base = head0 + lane * E;
  for (int j = start + static_cast<int>(threadIdx.x) / 2; j < end; j += blockDim.x / 2) {
    const bf16* row = (threadIdx.x & 1 ? static_cast<const bf16*>(p.v) : static_cast<const bf16*>(p.k)) + head0 +
                      static_cast<int64_t>(j) * p.row_stride;
#pragma unroll
    for (int c = 0; c < D; c += 64) prefetch_l2(row + c);  // 128-byte lines
  }
  pdl_wait();
  pdl_launch_dependents();
  if (start >= len) return;
  extern __shared__ float shared[];
  float* scores = shared;                          // (keys_per_split)
  float* red = scores + p.keys_per_split;          // (warps, D)
  float* red_l = red + kDecodeWarps * D;           // (warps)
  const bf16* q = static_cast<const bf16*>(p.q) + p.q_rows[r] * p.q_row_stride + h * D + lane * E;
  float qf[E];
#pragma unroll
  for (int e = 0; e < E; ++e) qf[e] = __bfloat162float(q[e]) * scale_log2;
  const bf16* k = static_cast<const bf16*>(p.k) + base;
  const bf16* v = static_cast<const bf16*>(p.v) + base;
  constexpr int kStep = kDecodeWarps * G;
  for (int j0 = start + warp; j0 < end; j0 += kStep) {
    float kf[G][E];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int j = j0 + g * kDecodeWarps;
      const bf16* kj = k + static_cast<int64_t>(j < end ? j : j0) * p.row_stride;
#pragma unroll
      for (int e = 0; e < E; ++e) kf[g][e] = __bfloat162float(kj[e]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot += qf[e] * kf[g][e];
      dot = warp_sum(dot);
      const int j = j0 + g * kDecodeWarps;
      if (lane == 0 && j < end) scores[j - start] = dot;
    }
  }
  __syncthreads();
  float m = -FLT_MAX;
  for (int i = lane; i < end - start; i += 32) m = fmaxf(m, scores[i]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float acc[E] = {};
  float l = 0.0f;
  for (int j0 = start + warp; j0 < end; j0 += kStep) {
    float vf[G][E];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int j = j0 + g * kDecodeWarps;
      const bf16* vj = v + static_cast<int64_t>(j < end ? j : j0) * p.row_stride;
#pragma unroll
      for (int e = 0; e < E; ++e) vf[g][e] = __bfloat162float(vj[e]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int j = j0 + g * kDecodeWarps;
      if (j < end) {
        const float pj = exp2f(scores[j - start] - m);
        l += pj;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += pj * vf[g][e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) red[warp * D + lane * E + e] = acc[e];
  if (lane == 0) red_l[warp] = l;
  __syncthreads();
  if (warp != 0) return;
  const int splits = max_splits(p.max_length, p.keys_per_split);
  float* out = p.partials + ((static_cast<int64_t>(r) * p.heads + h) * splits + s) * (D + 2);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    float o = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) o += red[w * D + lane * E + e];
    out[lane * E + e] = o;
  }
  if (lane == 0) {
    float L = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) L += red_l[w];
    out[D] = m;
    out[D + 1] = L;
  }
  if (!p.counters) return;
  // The last block of (h, r) to get here combines (the threadfence-reduction pattern).
  __threadfence();
  __syncwarp();
  unsigned ticket = 0;
  unsigned* counter = p.counters + r * p.heads + h;
  if (lane == 0) ticket = atomicAdd(counter, 1u);
  ticket = __shfl_sync(0xffffffffu, ticket, 0);
  const unsigned used = static_cast<unsigned>((len + p.keys_per_split - 1) / p.keys_per_split);
  if (ticket != used - 1) return;
  if (lane == 0) *counter = 0;  // ready for the next launch
  __threadfence();
  decode_combine_warp<E>(p, r, h, lane);
}

// One warp per (head, row).
template <int E>
__global__ void decode_combine_kernel(DecodeAttentionCudaParams p) {
  pdl_wait();
  pdl_launch_dependents();
  decode_combine_warp<E>(p, /*r=*/blockIdx.y, /*h=*/blockIdx.x, threadIdx.x);
}

// FLASHGPT_DECODE_KEY_GROUP=4|8|16: the keys a warp loads before it uses the first (default 8,
// docs/generate.md has the timings).
int decode_key_group() {
  static const int group = [] {
    const char* v = std::getenv("FLASHGPT_DECODE_KEY_GROUP");
    if (v == nullptr || *v == '\0') return 8;
    const std::string s(v);
    if (s != "4" && s != "8" && s != "16") {
      throw std::invalid_argument("FLASHGPT_DECODE_KEY_GROUP must be 4, 8 or 16, got '" + s + "'");
    }
    return std::stoi(s);
  }();
  return group;
}

template <int E>
void launch_decode(const DecodeAttentionCudaParams& p, cudaStream_t stream) {
  constexpr int D = 32 * E;
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(D));
  const dim3 grid(max_splits(p.max_length, p.keys_per_split), p.heads, p.rows);
  const size_t shared = (p.keys_per_split + kDecodeWarps * D + kDecodeWarps) * sizeof(float);
  const int group = p.key_group != 0 ? p.key_group : decode_key_group();
  auto* kernel = group == 16 ? decode_partial_kernel<E, 16> : group == 8 ? decode_partial_kernel<E, 8>
                                                                            : decode_partial_kernel<E, 4>;
  inference_cuda::launch(kernel, grid, dim3(32 * kDecodeWarps), shared, stream, p.programmatic,
                         "decode_partial_kernel", p, scale_log2);
  if (p.counters) return;
  inference_cuda::launch(decode_combine_kernel<E>, dim3(p.heads, p.rows), dim3(32), 0, stream, p.programmatic,
                         "decode_combine_kernel", p);
}

}  // namespace

size_t attention_decode_cuda_partial_floats(int rows, int heads, int head_dim, int max_length, int keys_per_split) {
  return static_cast<size_t>(rows) * heads * max_splits(max_length, keys_per_split) * (head_dim + 2);
}

void attention_decode_cuda(const DecodeAttentionCudaParams& p, cudaStream_t stream) {
  if (!p.q || !p.k || !p.v || !p.o || !p.partials || !p.q_rows || !p.slots || !p.lengths) {
    throw std::invalid_argument("attention_decode_cuda: null pointer");
  }
  if (p.rows < 0 || p.heads <= 0 || p.max_length <= 0 || p.keys_per_split < 8 || p.keys_per_split > 256 ||
      p.keys_per_split % 8 != 0) {
    throw std::invalid_argument("attention_decode_cuda: bad shape (rows " + std::to_string(p.rows) + ", heads " +
                                std::to_string(p.heads) + ", max_length " + std::to_string(p.max_length) +
                                ", keys_per_split " + std::to_string(p.keys_per_split) + ")");
  }
  if (p.key_group != 0 && p.key_group != 4 && p.key_group != 8 && p.key_group != 16) {
    throw std::invalid_argument("attention_decode_cuda: key_group must be 0 (the default), 4, 8 or 16, got " +
                                std::to_string(p.key_group));
  }
  if (p.rows == 0) return;
  switch (p.head_dim) {
    case 32: return launch_decode<1>(p, stream);
    case 64: return launch_decode<2>(p, stream);
    case 96: return launch_decode<3>(p, stream);
    case 128: return launch_decode<4>(p, stream);
    default:
      throw std::invalid_argument("attention_decode_cuda: head_dim " + std::to_string(p.head_dim) +
                                  " is not one of 32, 64, 96, 128");
  }
}

}  // namespace flashgpt

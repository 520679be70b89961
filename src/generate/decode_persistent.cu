// The persistent decode kernel: every layer of a decode step (batch 1 .. 8) in one
// cooperative launch, phases separated by grid-wide barriers, the weights streamed into
// shared memory ahead of the dependent chain. See inference_cuda_kernels.h
// (persistent_decode) and docs/generate.md ("The CUDA engine").
//
// Per layer l, five phases: (1) ln1 + qkv + bias -> q and the K/V cache rows, (2) attention
// of each (row, head) over its whole cache, (3) proj + bias + residual, (4) ln2 + fc + bias
// + GELU, (5) fc_proj + bias + residual. Every product phase gives block b a contiguous run
// of output rows, so its slice of W is one contiguous run of bytes: thread 0 copies it with
// one cp.async.bulk into a ring of `slots` shared-memory buffers, completing on an
// mbarrier, up to `slots` product phases ahead of the one being computed (weights do not
// depend on activations). Biases and LayerNorm parameters go to shared memory through
// cp.async before the barrier that precedes their phase; the residual slice a block owns
// (the same output rows in proj and fc_proj) stays in shared memory all step, so the
// residual add reads nothing from global memory. After the barrier a phase reads only
// activations (L2), computes from shared memory and stores.
#include "inference_cuda_device.cuh"
#include "inference_cuda_kernels.h"

#include <flashgpt/cuda_check.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flashgpt::inference_cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kPWarps = 16;
constexpr int kPThreads = 32 * kPWarps;
constexpr int kMaxSlots = 4;
constexpr int kLnVec = 16;  // float4 per lane of a LayerNorm row: C <= 32 * 4 * 16 = 2048
constexpr float kEps = 1e-5f;

// ---- cp.async (the mbarrier and bulk-copy helpers are in inference_cuda_device.cuh) -----

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

__host__ __device__ inline int max_slice(int out, int G) { return (out + G - 1) / G; }

// Product phase j (4 per layer: qkv, proj, fc, fc_proj): its weights and shape.
__device__ __forceinline__ void phase_shape(const PersistentDecodeParams& p, int j, const bf16*& w, int& out,
                                            int& in) {
  const int l = j / 4, k = j % 4;
  const int64_t C = p.C, F = p.F;
  if (k == 0) {
    w = p.qkv_w + l * 3 * C * C, out = 3 * p.C, in = p.C;
  } else if (k == 1) {
    w = p.proj_w + l * C * C, out = p.C, in = p.C;
  } else if (k == 2) {
    w = p.fc_w + l * F * C, out = p.F, in = p.C;
  } else {
    w = p.fcp_w + l * C * F, out = p.C, in = p.F;
  }
}

template <int R, int HD>
__global__ void __launch_bounds__(kPThreads, 1) persistent_decode_kernel(const PersistentDecodeParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  cg::grid_group grid = cg::this_grid();
  const int G = gridDim.x, b = blockIdx.x, t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int C = p.C, F = p.F, rows = p.rows;
  uint64_t* mbar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* ring = smem + 128;
  bf16* xin = reinterpret_cast<bf16*>(smem + p.off_xin);       // (R, in) the phase's input rows
  float* xres = reinterpret_cast<float*>(smem + p.off_xres);   // (R, xres_stride) this block's residual slice
  float* lnw = reinterpret_cast<float*>(smem + p.off_ln);      // (C)
  float* lnb = lnw + C;                                        // (C)
  float* bias_s = reinterpret_cast<float*>(smem + p.off_bias); // (rows of the slice)
  float* red = reinterpret_cast<float*>(smem + p.off_red);     // (units, R)
  float* scores = reinterpret_cast<float*>(smem + p.off_att);  // (T)
  float* red_o = scores + p.max_length;                        // (warps, HD)
  float* red_m = red_o + kPWarps * HD;                         // (warps)
  float* red_l = red_m + kPWarps;                              // (warps)
  const Slice slice_c = slice_of(C, b, G);  // the residual slice (proj and fc_proj)
  // With the head (p.head_w): this block's rows of it, in chunks of head_chunk rows, are
  // product phases 4 L, 4 L + 1, ... (their weights stream in during the last layer).
  const Slice slice_v = p.head_w ? slice_of(p.head_rows, b, G) : Slice{0, 0};
  const int head_chunks = p.head_w ? (slice_v.rows + p.head_chunk - 1) / p.head_chunk : 0;
  const int nphases = 4 * p.L + head_chunks;
  // Timing (p.trace): block 0's thread 0 records clock64 at the start, before and after
  // each grid barrier, and at the end.
  const bool tracing = p.trace && b == 0 && t == 0;
  int trace_at = 0;
  auto stamp = [&] {
    if (tracing) p.trace[trace_at++] = clock64();
  };
  auto sync = [&] {
    stamp();
    grid.sync();
    stamp();
  };
  stamp();

  if (t == 0) {
    for (int s = 0; s < p.slots; ++s) mbar_init(&mbar[s], 1);
    fence_mbarrier_init();
    fence_proxy_async_shared();
  }
  __syncthreads();
  // Head chunk k of this block: rows slice_v.row0 + k * head_chunk, at most head_chunk.
  auto head_slice = [&](int k) {
    const int first = k * p.head_chunk;
    return Slice{slice_v.row0 + first, min(p.head_chunk, slice_v.rows - first)};
  };
  auto issue = [&](int j) {  // thread 0: phase j's weight slice into its ring slot
    const bf16* w;
    int in;
    Slice s;
    if (j < 4 * p.L) {
      int out;
      phase_shape(p, j, w, out, in);
      s = slice_of(out, b, G);
    } else {
      w = p.head_w, in = C, s = head_slice(j - 4 * p.L);
    }
    const auto bytes = static_cast<uint32_t>(s.rows) * static_cast<uint32_t>(in) * 2u;
    uint64_t* bar = &mbar[j % p.slots];
    mbar_expect_tx(bar, bytes);
    if (bytes) bulk_copy(ring + static_cast<size_t>(j % p.slots) * p.slot_bytes, w + s.row0 * in, bytes, bar);
  };
  if (t == 0) {
    for (int j = 0; j < min(p.slots, nphases); ++j) issue(j);
  }
  auto wait_weights = [&](int j) -> const bf16* {
    mbar_wait(&mbar[j % p.slots], static_cast<uint32_t>((j / p.slots) & 1));
    return reinterpret_cast<const bf16*>(ring + static_cast<size_t>(j % p.slots) * p.slot_bytes);
  };
  auto release = [&](int j) {  // after a __syncthreads that follows the last read of slot j
    if (t == 0 && j + p.slots < nphases) {
      fence_proxy_async_shared();
      issue(j + p.slots);
    }
  };
  auto prefetch_bias = [&](const float* bias, Slice s) {
    for (int i = t; i < s.rows; i += kPThreads) cp_async4(bias_s + i, bias + s.row0 + i);
  };
  auto prefetch_ln = [&](const float* w, const float* bb) {
    for (int i = t; i < C; i += kPThreads) cp_async4(lnw + i, w + i), cp_async4(lnb + i, bb + i);
  };

  // The R input rows, LayerNorm(x) * lnw + lnb in bf16 (stride C); x is the embedding
  // (wte[token] + wpe[pos]) in layer 0, else the residual stream other blocks wrote (read
  // through L2: L1 is not coherent within a launch). Rows >= rows are zero.
  auto load_ln = [&](bool embed) {
    if (warp >= R) return;
    const int r = warp;
    __nv_bfloat162* out2 = reinterpret_cast<__nv_bfloat162*>(xin + r * C);
    const int n4 = C / 4;
    if (r >= rows) {
      for (int i = lane; i < n4; i += 32) out2[2 * i] = out2[2 * i + 1] = __floats2bfloat162_rn(0.0f, 0.0f);
      return;
    }
    float4 v[kLnVec];
    const TokenPlace pl = p.places[r];
    const float4* a = reinterpret_cast<const float4*>(embed ? p.wte + static_cast<int64_t>(pl.token) * C
                                                            : p.x + static_cast<int64_t>(r) * C);
    const float4* e = reinterpret_cast<const float4*>(p.wpe + static_cast<int64_t>(pl.pos) * C);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kLnVec; ++k) {
      const int i = lane + 32 * k;
      if (i < n4) {
        if (embed) {
          const float4 x = a[i], y = e[i];
          v[k] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
        } else {
          v[k] = __ldcg(a + i);
        }
        sum += (v[k].x + v[k].y) + (v[k].z + v[k].w);
      }
    }
    const float mean = warp_sum(sum) / C;
    float var = 0.0f;
#pragma unroll
    for (int k = 0; k < kLnVec; ++k) {
      const int i = lane + 32 * k;
      if (i < n4) {
        const float a0 = v[k].x - mean, a1 = v[k].y - mean, a2 = v[k].z - mean, a3 = v[k].w - mean;
        var += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
      }
    }
    const float rstd = rsqrtf(warp_sum(var) / C + kEps);
#pragma unroll
    for (int k = 0; k < kLnVec; ++k) {
      const int i = lane + 32 * k;
      if (i < n4) {
        const int c = 4 * i;
        out2[2 * i] = __floats2bfloat162_rn((v[k].x - mean) * rstd * lnw[c] + lnb[c],
                                            (v[k].y - mean) * rstd * lnw[c + 1] + lnb[c + 1]);
        out2[2 * i + 1] = __floats2bfloat162_rn((v[k].z - mean) * rstd * lnw[c + 2] + lnb[c + 2],
                                                (v[k].w - mean) * rstd * lnw[c + 3] + lnb[c + 3]);
      }
    }
  };
  // The R input rows copied from a bf16 activation (rows, in) another phase wrote.
  auto load_rows = [&](const bf16* src, int in) {
    const int per_row = in / 8;
    uint4* dst = reinterpret_cast<uint4*>(xin);
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    for (int i = t; i < R * per_row; i += kPThreads) {
      dst[i] = i / per_row < rows ? __ldcg(s4 + i) : make_uint4(0, 0, 0, 0);
    }
  };
  // red[(i * nseg + g) * R + r] = the dot of input row r with weight row i over segment g
  // of the chunks of 8; returns nseg. Ends with a __syncthreads.
  auto matvec = [&](const bf16* ws, int nrows, int in) {
    const int chunks = in / 8;
    const int nseg = nrows == 0 ? 1 : max(1, min(kPWarps / nrows, (chunks + 31) / 32));
    const int cps = (chunks + nseg - 1) / nseg;
    const uint4* w4 = reinterpret_cast<const uint4*>(ws);
    const uint4* x4 = reinterpret_cast<const uint4*>(xin);
    for (int u = warp; u < nrows * nseg; u += kPWarps) {
      const int i = u / nseg, g = u % nseg;
      const int c1 = min(chunks, (g + 1) * cps);
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.0f;
      for (int c = g * cps + lane; c < c1; c += 32) {
        float wf[8];
        bf16x8_to_float(w4[static_cast<int64_t>(i) * chunks + c], wf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float xf[8];
          bf16x8_to_float(x4[r * chunks + c], xf);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[r] += wf[k] * xf[k];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) red[u * R + r] = acc[r];
      }
    }
    __syncthreads();
    return nseg;
  };
  // Calls f(i, r, acc + bias) for each output row i of the slice and input row r < rows.
  auto epilogue = [&](int nrows, int nseg, auto&& f) {
    for (int idx = t; idx < nrows * R; idx += kPThreads) {
      const int i = idx / R, r = idx % R;
      if (r >= rows) continue;
      float v = bias_s[i];
      for (int g = 0; g < nseg; ++g) v += red[(i * nseg + g) * R + r];
      f(i, r, v);
    }
  };

  // The residual slice starts as the embedding.
  for (int idx = t; idx < R * slice_c.rows; idx += kPThreads) {
    const int r = idx / slice_c.rows, i = idx % slice_c.rows;
    float v = 0.0f;
    if (r < rows) {
      const TokenPlace pl = p.places[r];
      const int64_t c = slice_c.row0 + i;
      v = p.wte[static_cast<int64_t>(pl.token) * C + c] + p.wpe[static_cast<int64_t>(pl.pos) * C + c];
    }
    xres[r * p.xres_stride + i] = v;
  }

  constexpr int LPK = HD / 8;   // lanes per key (8 dims each)
  constexpr int KPW = 32 / LPK; // keys per warp and step
  const float scale_log2 = 1.4426950408889634f * rsqrtf(static_cast<float>(HD));

  // Phases (3) and (5): x += in[in_width] W^T + bias on this block's residual slice, written
  // back to p.x for the next phase's LayerNorm. Weight slot j holds W's rows of the slice.
  auto residual_phase = [&](int j, const float* bias, const bf16* in, int in_width) {
    prefetch_bias(bias, slice_c);
    cp_async_commit();
    sync();
    load_rows(in, in_width);
    cp_async_wait_all();
    const bf16* ws = wait_weights(j);
    __syncthreads();
    const int nseg = matvec(ws, slice_c.rows, in_width);
    release(j);
    epilogue(slice_c.rows, nseg, [&](int i, int r, float v) {
      float& x = xres[r * p.xres_stride + i];
      x += v;
      p.x[static_cast<int64_t>(r) * C + slice_c.row0 + i] = x;
    });
    __syncthreads();
  };
  for (int l = 0; l < p.L; ++l) {
    const int64_t layer_off = l * p.layer_stride;
    // ---- (1) ln1 + qkv -> q, K/V cache rows -------------------------------------------
    {
      const int j = 4 * l;
      const Slice s = slice_of(3 * C, b, G);
      prefetch_ln(p.ln1_w + static_cast<int64_t>(l) * C, p.ln1_b + static_cast<int64_t>(l) * C);
      prefetch_bias(p.qkv_b + static_cast<int64_t>(l) * 3 * C, s);
      cp_async_commit();
      if (l > 0) sync();
      cp_async_wait_all();
      __syncthreads();
      load_ln(l == 0);
      const bf16* ws = wait_weights(j);
      __syncthreads();
      const int nseg = matvec(ws, s.rows, C);
      release(j);
      epilogue(s.rows, nseg, [&](int i, int r, float v) {
        const int64_t o = s.row0 + i;
        const int part = static_cast<int>(o / C), c = static_cast<int>(o - static_cast<int64_t>(part) * C);
        const bf16 h = __float2bfloat16(v);
        if (part == 0) {
          p.q[static_cast<int64_t>(r) * C + c] = h;
        } else {
          const TokenPlace pl = p.places[r];
          const int64_t at = layer_off + pl.slot * p.slot_stride + static_cast<int64_t>(pl.pos) * C + c;
          (part == 1 ? p.k_cache : p.v_cache)[at] = h;
        }
      });
      __syncthreads();
    }
    // ---- (2) attention: one (row, head) per block at a time, all its keys ------------
    {
      // The older K/V rows do not depend on this step: toward L2 before the barrier.
      for (int item = b; item < rows * p.heads; item += G) {
        const int r = item / p.heads, h = item % p.heads;
        const TokenPlace pl = p.places[r];
        const int64_t base = layer_off + pl.slot * p.slot_stride + h * HD;
        for (int idx = t; idx < 2 * pl.pos; idx += kPThreads) {
          const int64_t at = base + static_cast<int64_t>(idx >> 1) * C;
          prefetch_l2((idx & 1 ? p.v_cache : p.k_cache) + at);
        }
      }
      sync();
      for (int item = b; item < rows * p.heads; item += G) {
        const int r = item / p.heads, h = item % p.heads;
        const TokenPlace pl = p.places[r];
        const int len = pl.pos + 1;
        const int64_t base = layer_off + pl.slot * p.slot_stride + h * HD + (lane % LPK) * 8;
        const uint4* kb = reinterpret_cast<const uint4*>(p.k_cache + base);
        const uint4* vb = reinterpret_cast<const uint4*>(p.v_cache + base);
        const int64_t key_stride = C / 8;  // in uint4
        float qf[8];
        bf16x8_to_float(__ldcg(reinterpret_cast<const uint4*>(p.q + static_cast<int64_t>(r) * C + h * HD) + lane % LPK), qf);
#pragma unroll
        for (int k = 0; k < 8; ++k) qf[k] *= scale_log2;
        constexpr int kGroup = 4;
        const int step = kPWarps * KPW;
        // This lane's 16 bytes of the kGroup cache rows j0 + u * step + lane / LPK (zeros past len).
        auto load_group = [&](const uint4* rows, int j0, uint4 (&out)[kGroup]) {
#pragma unroll
          for (int u = 0; u < kGroup; ++u) {
            const int j = j0 + u * step + lane / LPK;
            out[u] = j < len ? __ldcg(rows + j * key_stride) : make_uint4(0, 0, 0, 0);
          }
        };
        for (int j0 = warp * KPW; j0 < len; j0 += kGroup * step) {
          uint4 kv[kGroup];
          load_group(kb, j0, kv);
#pragma unroll
          for (int u = 0; u < kGroup; ++u) {
            float kf[8];
            bf16x8_to_float(kv[u], kf);
            float d = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) d += qf[k] * kf[k];
#pragma unroll
            for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            const int j = j0 + u * step + lane / LPK;
            if (lane % LPK == 0 && j < len) scores[j] = d;
          }
        }
        __syncthreads();
        float m = -FLT_MAX;
        for (int i = t; i < len; i += kPThreads) m = fmaxf(m, scores[i]);
        m = warp_max(m);
        if (lane == 0) red_m[warp] = m;
        __syncthreads();
        m = red_m[0];
        for (int w = 1; w < kPWarps; ++w) m = fmaxf(m, red_m[w]);
        float o8[8] = {};
        float lsum = 0.0f;
        for (int j0 = warp * KPW; j0 < len; j0 += kGroup * step) {
          uint4 vv[kGroup];
          load_group(vb, j0, vv);
#pragma unroll
          for (int u = 0; u < kGroup; ++u) {
            const int j = j0 + u * step + lane / LPK;
            if (j < len) {
              const float pj = exp2f(scores[j] - m);
              if (lane % LPK == 0) lsum += pj;
              float vf[8];
              bf16x8_to_float(vv[u], vf);
#pragma unroll
              for (int k = 0; k < 8; ++k) o8[k] += pj * vf[k];
            }
          }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          for (int o = LPK; o < 32; o <<= 1) o8[k] += __shfl_xor_sync(0xffffffffu, o8[k], o);
        }
        lsum = warp_sum(lsum);
        if (lane < LPK) {
#pragma unroll
          for (int k = 0; k < 8; ++k) red_o[warp * HD + lane * 8 + k] = o8[k];
        }
        if (lane == 0) red_l[warp] = lsum;
        __syncthreads();
        if (t < HD) {
          float o = 0.0f, L = 0.0f;
          for (int w = 0; w < kPWarps; ++w) o += red_o[w * HD + t], L += red_l[w];
          p.att[static_cast<int64_t>(r) * C + h * HD + t] = __float2bfloat16(o / L);
        }
        __syncthreads();
      }
    }
    // ---- (3) proj + bias + residual ---------------------------------------------------
    residual_phase(4 * l + 1, p.proj_b + static_cast<int64_t>(l) * C, p.att, C);
    // ---- (4) ln2 + fc + bias + GELU ---------------------------------------------------
    {
      const int j = 4 * l + 2;
      const Slice s = slice_of(F, b, G);
      prefetch_ln(p.ln2_w + static_cast<int64_t>(l) * C, p.ln2_b + static_cast<int64_t>(l) * C);
      prefetch_bias(p.fc_b + static_cast<int64_t>(l) * F, s);
      cp_async_commit();
      sync();
      cp_async_wait_all();
      __syncthreads();
      load_ln(false);
      const bf16* ws = wait_weights(j);
      __syncthreads();
      const int nseg = matvec(ws, s.rows, C);
      release(j);
      epilogue(s.rows, nseg, [&](int i, int r, float v) {
        p.ff[static_cast<int64_t>(r) * F + s.row0 + i] = __float2bfloat16(gelu_tanh(v));
      });
      __syncthreads();
    }
    // ---- (5) fc_proj + bias + residual ------------------------------------------------
    residual_phase(4 * l + 3, p.fcp_b + static_cast<int64_t>(l) * C, p.ff, F);
  }
  if (p.head_w) {
    // ---- lnf + head -> logits and per-block argmax partials ---------------------------
    prefetch_ln(p.lnf_w, p.lnf_b);
    for (int i = t; i < p.head_chunk; i += kPThreads) bias_s[i] = 0.0f;  // no bias
    cp_async_commit();
    sync();
    cp_async_wait_all();
    __syncthreads();
    load_ln(false);
    __syncthreads();
    // A thread's epilogue row r = t % R is fixed (kPThreads % R == 0): it keeps a running
    // argmax over its columns (lowest id on a tie; padding columns skipped).
    float best_v = -FLT_MAX;
    int best_i = 0x7fffffff;
    for (int k = 0; k < head_chunks; ++k) {
      const int j = 4 * p.L + k;
      const Slice s = head_slice(k);
      const bf16* ws = wait_weights(j);
      const int nseg = matvec(ws, s.rows, C);
      release(j);
      epilogue(s.rows, nseg, [&](int i, int r, float v) {
        const int64_t col = s.row0 + i;
        p.logits[static_cast<int64_t>(r) * p.ldl + col] = v;
        if (col < p.valid_out && (v > best_v || (v == best_v && col < best_i))) best_v = v, best_i = static_cast<int>(col);
      });
      __syncthreads();
    }
    // Block reduction per row: lanes that share t % R, then warps.
    for (int o = 16; o >= R; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (ov > best_v || (ov == best_v && oi < best_i)) best_v = ov, best_i = oi;
    }
    float* sv = red;  // (warps, R)
    int* si = reinterpret_cast<int*>(red + kPWarps * R);
    if (lane < R) sv[warp * R + lane] = best_v, si[warp * R + lane] = best_i;
    __syncthreads();
    if (t < R && t < rows) {
      float bv = -FLT_MAX;
      int bi = 0x7fffffff;
      for (int w = 0; w < kPWarps; ++w) {
        const float v = sv[w * R + t];
        const int i = si[w * R + t];
        if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
      }
      p.part_val[t * G + b] = bv;
      p.part_idx[t * G + b] = bi;
    }
  }
  stamp();
}

using KernelFn = void (*)(PersistentDecodeParams);

template <int HD>
KernelFn kernel_for_rows(int R) {
  if (R <= 1) return persistent_decode_kernel<1, HD>;
  if (R <= 2) return persistent_decode_kernel<2, HD>;
  if (R <= 4) return persistent_decode_kernel<4, HD>;
  return persistent_decode_kernel<8, HD>;
}

KernelFn kernel_for(int R, int head_dim) {
  switch (head_dim) {
    case 32: return kernel_for_rows<32>(R);
    case 64: return kernel_for_rows<64>(R);
    case 128: return kernel_for_rows<128>(R);
    default: return nullptr;
  }
}

int bucket(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

size_t round128(size_t n) { return (n + 127) / 128 * 128; }

}  // namespace

PersistentDecodePlan persistent_decode_plan(int rows_max, int C, int F, int heads, int head_dim, int max_length) {
  PersistentDecodePlan plan;
  auto refuse = [&](std::string why) {
    plan.why = std::move(why);
    return plan;
  };
  if (rows_max < 1 || rows_max > kGemvMaxRows) return refuse("batch above " + std::to_string(kGemvMaxRows));
  if (head_dim != 32 && head_dim != 64 && head_dim != 128) {
    return refuse("head dim " + std::to_string(head_dim) + " (takes 32, 64, 128)");
  }
  if (C % 8 != 0 || F % 8 != 0 || C > 32 * 4 * kLnVec || C != heads * head_dim) {
    return refuse("d_model " + std::to_string(C) + " / d_ff " + std::to_string(F));
  }
  int device = 0, sms = 0, optin = 0, coop = 0, major = 0;
  FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return refuse("compute capability below 9.0 (cp.async.bulk)");
  if (!coop) return refuse("the device has no cooperative launch");
  const int G = sms;  // one block per multiprocessor
  const int R = bucket(rows_max);
  const int rows_any = std::max({max_slice(3 * C, G), max_slice(F, G), max_slice(C, G)});
  const size_t slot = round128(2 * static_cast<size_t>(std::max(
                                       {max_slice(3 * C, G) * C, max_slice(F, G) * C, max_slice(C, G) * F})));
  size_t rest = 128;  // the mbarriers
  const size_t xin = round128(static_cast<size_t>(R) * std::max(C, F) * 2);
  const size_t xres = round128(static_cast<size_t>(R) * max_slice(C, G) * 4);
  const size_t ln = round128(static_cast<size_t>(2) * C * 4);
  const int head_chunk = static_cast<int>(slot / (static_cast<size_t>(C) * 2));  // head rows a buffer holds
  const int rows_all = std::max(rows_any, head_chunk);
  const size_t bias = round128(static_cast<size_t>(rows_all) * 4);
  const size_t red = round128(static_cast<size_t>(std::max(rows_all, 2 * kPWarps)) * R * 4);
  const size_t att = round128((static_cast<size_t>(max_length) + kPWarps * head_dim + 2 * kPWarps) * 4);
  rest += xin + xres + ln + bias + red + att;
  if (static_cast<size_t>(optin) < rest + 2 * slot) return refuse("shared memory (" + std::to_string(optin) + " bytes)");
  const int slots = static_cast<int>(std::min<size_t>(kMaxSlots, (optin - rest) / slot));
  size_t at = 128 + static_cast<size_t>(slots) * slot;  // the ring, then the rest
  plan.off_xin = at, at += xin;
  plan.off_xres = at, at += xres;
  plan.off_ln = at, at += ln;
  plan.off_bias = at, at += bias;
  plan.off_red = at, at += red;
  plan.off_att = at, at += att;
  plan.shared = at;
  plan.slots = slots;
  plan.slot_bytes = slot;
  plan.xres_stride = max_slice(C, G);
  plan.head_chunk = head_chunk;
  plan.grid = G;
  plan.rows_max = R;
  plan.head_dim = head_dim;
  // Every block of the grid must be resident at once (the grid-wide barriers).
  for (int r = 1; r <= R; r *= 2) {
    const KernelFn k = kernel_for(r, head_dim);
    // The device's limit, not this plan's size: engines of other shapes share the kernel.
    FLASHGPT_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    int per_sm = 0;
    FLASHGPT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kPThreads, plan.shared));
    if (per_sm < 1) return refuse("a block does not fit a multiprocessor (" + std::to_string(plan.shared) + " bytes)");
  }
  plan.ok = true;
  return plan;
}

void persistent_decode(const PersistentDecodeParams& params, const PersistentDecodePlan& plan, cudaStream_t stream) {
  if (!plan.ok) throw std::invalid_argument("persistent_decode: no plan (" + plan.why + ")");
  if (params.rows < 1 || params.rows > plan.rows_max || params.head_dim != plan.head_dim) {
    throw std::invalid_argument("persistent_decode: " + std::to_string(params.rows) + " rows, head dim " +
                                std::to_string(params.head_dim) + " outside the plan");
  }
  PersistentDecodeParams p = params;
  p.slots = plan.slots, p.slot_bytes = plan.slot_bytes;
  p.off_xin = plan.off_xin, p.off_xres = plan.off_xres, p.off_ln = plan.off_ln, p.off_bias = plan.off_bias;
  p.off_red = plan.off_red, p.off_att = plan.off_att, p.xres_stride = plan.xres_stride;
  p.head_chunk = plan.head_chunk;
  if (p.head_w && (!p.logits || !p.part_val || !p.part_idx || !p.lnf_w || !p.lnf_b || p.head_rows <= 0)) {
    throw std::invalid_argument("persistent_decode: the head needs logits, argmax partials and lnf");
  }
  const KernelFn k = kernel_for(bucket(p.rows), p.head_dim);
  void* args[] = {&p};
  const cudaError_t status = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(k), dim3(plan.grid),
                                                         dim3(kPThreads), args, plan.shared, stream);
  if (status != cudaSuccess) cuda_error_throw(status, "persistent_decode_kernel", __FILE__, __LINE__);
}

}  // namespace flashgpt::inference_cuda

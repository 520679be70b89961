// The backward pass in the FlashAttention-2 manner, three kernels:
//   1. preprocess: D[i] = rowsum(dO[i] * O[i]) (fp32) into the workspace;
//   2. main: one CTA per (key block, kv head, batch entry). It keeps its K and V block in
//      shared memory and dK, dV in registers, and walks over every query head of its GQA
//      group and every query block that sees the key block. For each it recomputes
//      P^T = exp(scale K Q^T - LSE) from the saved LSE (the warp owns 16 or 32 keys, one or
//      two m16 tiles, so P^T's C fragments are directly the A fragments of dV += P^T dO),
//      dP^T = V dO^T,
//      dS^T = P^T * (dP^T - D), dK += dS^T Q, and dQ += dS K, the latter through shared
//      memory and fp32 atomics into a workspace accumulator (in deterministic mode the
//      CTAs of one query block add in key-block order behind a per-block semaphore);
//   3. convert: dQ = accumulator, cast to the input type, strided.
// The wgmma kernel (flash_bwd_wgmma_kernel.cuh) shares 1 and 3 (with its own dQ layout).
// With dropout Z = mask * 256 / (256 - t) (philox.h): dV += (P Z)^T dO and dS = P (dP Z - D).
#pragma once

#include "flash_tiles.cuh"
#include "flash_common.cuh"

// Lab hook, the fused dQ convert (below): 1 makes a warp's arrival at a strip one query block
// late (its release fence then finds the block's atomics completed instead of waiting for them),
// 0 right after the atomics. Not yet timed on a GPU; ptxas (bf16, spill stores/loads bytes, fused
// kernels; the separate-convert kernels are unchanged): 1: wgmma d64 40/44, d64 dropout 118/136,
// d128 0/0, d128 dropout 82/112; 0: 36/40, 174/192, 4/4, 58/92.
#ifndef FLASHGPT_BWD_DQ_ARRIVE_LATE
#define FLASHGPT_BWD_DQ_ARRIVE_LATE 1
#endif
#ifndef FLASHGPT_DQ_ATOMIC_WIDTH
#define FLASHGPT_DQ_ATOMIC_WIDTH 2
#endif

namespace flashgpt::attn {

// kKTiles: m16 key tiles per warp. With 2, every Q / dO fragment that a warp ldmatrix'es
// feeds the MMAs of both of its key tiles (shared-memory bandwidth, as in the forward's
// kFwdMTiles), at the price of twice the dK, dV, S^T and dP^T registers.
template <int kHeadDim_, int kBlockM_, int kNWarps_, typename Element_, int kKTiles_ = 1>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kKTiles = kKTiles_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kBlockN = 16 * kKTiles * kNWarps;  // each warp owns 16 kKTiles keys
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kStrideDs = kBlockM + 8;
  static constexpr int kNTilesS = kBlockM / 8;   // n8 tiles of S^T (queries) per warp
  static constexpr int kNTilesD = kHeadDim / 8;  // n8 tiles of dK, dV per warp
  // dQ = dS K is a kBlockM x kHeadDim product: kBlockM / 16 row groups of warps, each row
  // group splits the head dimension among kDqColGroups warps.
  static constexpr int kDqRowGroups = kBlockM / 16;
  static constexpr int kDqColGroups = kNWarps / kDqRowGroups;
  static constexpr int kDqCols = kHeadDim / kDqColGroups;
  static_assert(kHeadDim % 16 == 0 && kBlockM % 16 == 0, "tiles are made of m16n8k16 steps");
  static_assert(kKTiles == 1 || kKTiles == 2, "one or two m16 key tiles per warp");
  static_assert(kNWarps % kDqRowGroups == 0, "dQ rows must split evenly over the warps");
  static_assert(kDqCols % 16 == 0, "each warp's dQ columns must be whole pairs of n8 tiles");
  static_assert((kBlockM / 8) % 2 == 0, "padded dS rows must be an odd number of 16-byte units");
  static constexpr int kSmemKV = kBlockN * kStride;
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemDs = kBlockN * kStrideDs;
  // K, V, Q x2, dO x2, dS^T (elements), then LSE x2 and D x2 (floats).
  static constexpr size_t kSmemBytes = sizeof(Element) * (2 * kSmemKV + 4 * kSmemQ + kSmemDs) + 4 * kBlockM * sizeof(float);
};

// The fused dQ convert of the wgmma and TMA backwards (FLASHGPT_ATTN_BWD_FUSED_CONVERT; the
// alternative to flash_bwd_convert_dq_kernel below). In their fragment-order accumulator, the
// 16-row x 64-column strip (rows 16 w .. 16 w + 15 of a 64 x 64 sub-tile, one column block) is
// written by exactly one warp of every CTA that adds to its query block: warp w of the warpgroup
// that owns the sub-tile. Each strip has a counter, set by the preprocess to the number of key
// blocks that add to the strip's query block (dq_block_contributors).
//   - In the loop, after its float4 atomics into a strip, the warp arrives (dq_strip_arrive:
//     __syncwarp, then lane 0 a gpu-scope release fence and a reduction of -1, whose value
//     nobody waits for); by default one query block later (FLASHGPT_BWD_DQ_ARRIVE_LATE above),
//     the last block's arrival after the loop.
//   - After the tile's loop, the warp tries to claim each strip it added to (lane i the i-th,
//     32 at a time): atomicCAS(counter, 0, -1), issued before the dK/dV epilogue and read after. Only a completed strip (every arrival made) reads
//     0 and only one claim succeeds; the last warp to arrive always sees 0 or -1 (already
//     claimed) after its own arrival, so every strip is claimed exactly once. The winner fences
//     (acquire) and its warp converts the strip: the 8 float4 of each lane (the ones it would
//     have added, read back from L2), packed as the convert kernel packs them.
// The loop's only extra work is the arrival (converting inside the loop made ptxas spill more in
// the register-bound dropout kernels). The sums are the same fp32 sums and the conversion the
// same, so dQ is bit-identical to the separate convert's wherever the atomics' order is
// (deterministic mode). Query blocks that no key block sees (causal with seqlen_q > seqlen_k,
// or no keys) are written as zeros by the preprocess.

// How many key blocks of block_n keys add to query block m_block (block_m rows) of a sequence:
// exactly the CTAs whose BwdGlobal iterates over it. A key block n with keys (n0 < seqlen_k)
// visits query blocks m_begin(n) .. m_end - 1, and m_begin(n) <= m iff (causal)
// n0 - diag < (m + 1) block_m: key blocks 0 .. ceil(((m + 1) block_m + diag) / block_n) - 1.
__device__ __forceinline__ int dq_block_contributors(const AttentionParams& p, const SeqInfo& seq, int m_block,
                                                     int block_m, int block_n) {
  if (seq.seqlen_k <= 0 || m_block * block_m >= seq.seqlen_q) return 0;
  const int n_blocks = (seq.seqlen_k + block_n - 1) / block_n;
  if (p.mask != Mask::causal) return n_blocks;
  const int limit = (m_block + 1) * block_m + (seq.seqlen_k - seq.seqlen_q);
  return limit <= 0 ? 0 : min(n_blocks, (limit + block_n - 1) / block_n);
}

// The counter of the strip of (b, head) whose first row is row0 (a multiple of 16), column
// block col_block.
template <int kHeadDim>
__device__ __forceinline__ int* dq_strip_counter(const AttentionParams& p, const BwdWorkspace& ws, int b, int head,
                                                 int row0, int col_block) {
  constexpr int kColBlocks = (kHeadDim + 63) / 64;
  return ws.dq_arrivals +
         ((int64_t(b) * p.heads_q + head) * (ws.dq_rows / kDqStripRows) + row0 / kDqStripRows) * kColBlocks + col_block;
}

// The warp's arrival after its atomics into a strip; every lane calls it.
__device__ __forceinline__ void dq_strip_arrive(int* counter, int lane) {
  __syncwarp();  // orders the lanes' atomics before lane 0's fence
  if (lane == 0) {
    __threadfence();  // release
    atomicAdd(counter, -1);
  }
}

// A warp's strips over one tile's loop: iteration i (query block m_begin + i % m_count of
// query head head0 + i / m_count, as BwdGlobal iterates) adds to the strip whose first row is
// that block's first row + row_offset (the warp's 16 rows of its warpgroup's 64 x 64
// sub-tile), column block col_block. One description for the wgmma and TMA kernels.
template <int kHeadDim>
struct DqStrips {
  int b, head0, m_begin, m_count, block_m, row_offset, col_block;
  // Strip i's (query head, first row).
  __device__ __forceinline__ int2 of(int i) const {
    return make_int2(head0 + i / m_count, (m_begin + i % m_count) * block_m + row_offset);
  }
  __device__ __forceinline__ int* counter(const AttentionParams& p, const BwdWorkspace& ws, int i) const {
    const int2 hr = of(i);
    return dq_strip_counter<kHeadDim>(p, ws, b, hr.x, hr.y, col_block);
  }
};

// After the tile's loop and the warp's last arrival: claims the completed strips among the
// warp's strips first .. first + 31 of `count` (lane i strip first + i); returns whether this
// lane's claim won. Every lane calls it. The answer is needed only by dq_strips_convert, so
// the round trip can overlap other work.
template <int kHeadDim>
__device__ __forceinline__ bool dq_strips_claim(const AttentionParams& p, const BwdWorkspace& ws,
                                                const DqStrips<kHeadDim>& strips, int lane, int count, int first) {
  __syncwarp();  // the warp's arrivals (lane 0) before its lanes' claims
  if (first + lane >= count) return false;
  return atomicCAS(strips.counter(p, ws, first + lane), 0, -1) == 0;
}

// Converts the strips the warp claimed: won0 is dq_strips_claim's answer for strips 0 .. 31;
// strips 32 and on are claimed here. Every lane calls it.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void dq_strips_convert(bool won0, const AttentionParams& p, const BwdWorkspace& ws,
                                                  const SeqInfo& seq, const DqStrips<kHeadDim>& strips, int lane,
                                                  int count) {
  const int b = strips.b, col_block = strips.col_block;
  for (int i0 = 0; i0 < count; i0 += 32) {
    const bool won = i0 == 0 ? won0 : dq_strips_claim(p, ws, strips, lane, count, i0);
    if (won) __threadfence();  // acquire: every warp's atomics into the strip are visible
    for (unsigned mine = __ballot_sync(0xffffffffu, won); mine != 0; mine &= mine - 1) {
      const int2 hr = strips.of(i0 + __ffs(mine) - 1);
      const int head = hr.x, row0 = hr.y;
      // Lane g * 4 + t: rows row0 + g and + 8, columns 64 col_block + 8 q + 2 t and + 1 of n8
      // tile q, the float4 at (q * 128 + 32 (row0 / 16 % 4) + lane) * 4 of the 64 x 64 sub-tile.
      const float4* src =
          reinterpret_cast<const float4*>(ws.dq_accum +
                                          ((int64_t(b) * p.heads_q + head) * ws.dq_rows + row0 / 64 * 64) * kHeadDim +
                                          col_block * 4096) +
          (row0 / kDqStripRows % 4) * 32 + lane;
      Element* dq = static_cast<Element*>(p.dq) +
                    seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, head) + col_block * 64 +
                    2 * (lane % 4);
      const int row = row0 + lane / 4;
      float4 v[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = __ldcg(src + q * 128);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (row < seq.seqlen_q)
          *reinterpret_cast<uint32_t*>(dq + int64_t{row} * p.dq_row_stride + q * 8) =
              ElementOps<Element>::pack(v[q].x, v[q].y);
        if (row + 8 < seq.seqlen_q)
          *reinterpret_cast<uint32_t*>(dq + int64_t{row + 8} * p.dq_row_stride + q * 8) =
              ElementOps<Element>::pack(v[q].z, v[q].w);
      }
    }
  }
}

// Preprocess: D = rowsum(dO * O) (fp32), and the zeroing of the fp32 dQ accumulator, in one
// pass (the accumulator is as large as O and dO together: a separate memset cost as much as
// the reduction). Each thread reads 16 bytes of a row of O and of dO at a time; kThreadsPerRow
// threads share a row. CTA x of (head, b) owns rows [x kRows, (x + 1) kRows) of the padded
// accumulator (ws.dq_rows, a multiple of kRows) and zeroes that many rows' worth of floats at
// that offset, which covers the accumulator once in either of its layouts. The first thread
// also zeroes the persistent backward's tile counter. With the fused dQ convert
// (ws.dq_arrivals not null; kFusedBlockM: the wgmma kernels' query block, 128 keys a key
// block) it sets the arrival counters of its rows' strips and writes the dQ rows of query
// blocks that no key block adds to as zeros (what the convert kernel would write).
template <int kHeadDim>
struct BwdPreprocessShape {
  static constexpr int kThreads = 256;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  static constexpr int kThreadsPerRow = kChunks >= 16 ? 16 : (kChunks >= 8 ? 8 : 4);
  static constexpr int kRows = kThreads / kThreadsPerRow;
  static_assert(kDqRowAlign % kRows == 0, "the padded accumulator is whole CTAs of rows");
};

template <typename Element, int kHeadDim, int kFusedBlockM>
__global__ void __launch_bounds__(BwdPreprocessShape<kHeadDim>::kThreads)
    flash_bwd_preprocess_kernel(const KernelParams p, BwdWorkspace ws) {
  using Shape = BwdPreprocessShape<kHeadDim>;
  const int head = blockIdx.y, b = p.batch_begin + int(blockIdx.z);
  const int tid = threadIdx.x;
  if (blockIdx.x == 0 && head == 0 && b == 0 && tid == 0) *ws.tile_counter = 0;
  {
    float4* zero = reinterpret_cast<float4*>(ws.dq_accum + ((int64_t(b) * p.heads_q + head) * ws.dq_rows +
                                                            int64_t{blockIdx.x} * Shape::kRows) * kHeadDim);
    for (int i = tid; i < Shape::kRows * kHeadDim / 4; i += Shape::kThreads) zero[i] = make_float4(0, 0, 0, 0);
  }
  const SeqInfo seq(p, b);
  const int row = blockIdx.x * Shape::kRows + tid / Shape::kThreadsPerRow;
  const int lane_in_row = tid % Shape::kThreadsPerRow;
  if constexpr (kFusedBlockM > 0) {
    static_assert(Shape::kRows % kDqStripRows == 0 && kHeadDim % 64 == 0, "whole strips per CTA");
    constexpr int kColBlocks = kHeadDim / 64, kStrips = Shape::kRows / kDqStripRows * kColBlocks;
    constexpr int kBlockN = 128;  // keys per CTA of the wgmma and TMA backwards
    if (ws.dq_arrivals != nullptr) {
      if (tid < kStrips) {
        const int row0 = blockIdx.x * Shape::kRows + tid / kColBlocks * kDqStripRows;
        *dq_strip_counter<kHeadDim>(p, ws, b, head, row0, tid % kColBlocks) =
            dq_block_contributors(p, seq, row0 / kFusedBlockM, kFusedBlockM, kBlockN);
      }
      if (row < seq.seqlen_q && dq_block_contributors(p, seq, row / kFusedBlockM, kFusedBlockM, kBlockN) == 0) {
        Element* dq = static_cast<Element*>(p.dq) +
                      seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, head) +
                      int64_t{row} * p.dq_row_stride;
#pragma unroll
        for (int c = lane_in_row * 8; c < kHeadDim; c += Shape::kThreadsPerRow * 8)
          *reinterpret_cast<uint4*>(dq + c) = make_uint4(0, 0, 0, 0);
      }
    }
  }
  const Element* o = static_cast<const Element*>(p.o) +
                     seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, head) + row * p.o_row_stride;
  const Element* d_o = static_cast<const Element*>(p.d_o) +
                       seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, head) + row * p.do_row_stride;
  float acc = 0.0f;
  if (row < seq.seqlen_q) {
#pragma unroll
    for (int c = lane_in_row * 8; c < kHeadDim; c += Shape::kThreadsPerRow * 8) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + c);
      const uint4 d = *reinterpret_cast<const uint4*>(d_o + c);
      const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, dw[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 af = ElementOps<Element>::unpack(aw[j]), df = ElementOps<Element>::unpack(dw[j]);
        acc += af.x * df.x + af.y * df.y;
      }
    }
  }
  // The threads of a row are kThreadsPerRow consecutive lanes of one warp.
#pragma unroll
  for (int off = Shape::kThreadsPerRow / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane_in_row == 0 && row < seq.seqlen_q) ws.dot_do_o[(int64_t(b) * p.heads_q + head) * p.seqlen_q + row] = acc;
}

// dQ = accumulator, cast and strided, with 16-byte reads of the accumulator.
//   Row-major layout (the mma.sync kernel): a thread per 4 consecutive elements of a row;
//     grid (ceil(seqlen_q * kHeadDim / 4 / 256), heads_q, batch).
//   Fragment layout (the wgmma kernel): 64 x 64 sub-tiles, row block major, each one
//     contiguous 16 KB range; inside a sub-tile, n8 tile q of thread i of the warpgroup (warp
//     i / 32, lane g * 4 + t) is the float4 at (q * 128 + i) * 4: its C fragment (rows
//     16 (i / 32) + g and + 8, columns 8 q + 2 t and + 1). A CTA per sub-tile: read in order, transposed
//     through shared memory, written as 4 consecutive elements a thread (a warp writes whole
//     rows); grid (ceil(seqlen_q / 64) * ceil(kHeadDim / 64), heads_q, batch). A head dim
//     that is not a multiple of 64 (the padded wgmma backward: 32, 96) ends each row block of
//     64 x kHeadDim floats with a partial sub-tile, 64 rows x kHeadDim % 64 columns: the same
//     order, n8 tiles 0 .. kHeadDim % 64 / 8 - 1 only.
template <int kHeadDim, bool kFragmentLayout>
inline int convert_dq_blocks(int seqlen_q) {
  return kFragmentLayout ? (seqlen_q + 63) / 64 * ((kHeadDim + 63) / 64) : (seqlen_q * (kHeadDim / 4) + 255) / 256;
}

template <typename Element, int kHeadDim, bool kFragmentLayout>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const KernelParams p, BwdWorkspace ws) {
  const int head = blockIdx.y, b = p.batch_begin + int(blockIdx.z), tid = threadIdx.x;
  const SeqInfo seq(p, b);
  const float* part = ws.dq_accum + (int64_t(b) * p.heads_q + head) * ws.dq_rows * kHeadDim;
  Element* dq = static_cast<Element*>(p.dq) + seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, head);
  auto store4 = [&](int row, int col, float4 v) {
    const uint2 packed = {ElementOps<Element>::pack(v.x, v.y), ElementOps<Element>::pack(v.z, v.w)};
    *reinterpret_cast<uint2*>(dq + int64_t{row} * p.dq_row_stride + col) = packed;
  };
  if constexpr (!kFragmentLayout) {
    const int idx = blockIdx.x * blockDim.x + tid;
    const int row = idx / (kHeadDim / 4), col = idx % (kHeadDim / 4) * 4;
    if (row < seq.seqlen_q) store4(row, col, *reinterpret_cast<const float4*>(part + int64_t{row} * kHeadDim + col));
  } else {
    static_assert(kHeadDim % 32 == 0, "the fragment layout is made of 64 x 64 (and 64 x 32) sub-tiles");
    constexpr bool kWhole = kHeadDim % 64 == 0;
    constexpr int kColBlocks = (kHeadDim + 63) / 64;
    constexpr int kStride = 64 + 8;  // floats; float2 stores of a half-warp hit 32 distinct banks
    __shared__ float tile[64 * kStride];
    const int row0 = blockIdx.x / kColBlocks * 64, col0 = blockIdx.x % kColBlocks * 64;
    if (row0 >= seq.seqlen_q) return;
    // The sub-tile's columns: 64, or the partial last sub-tile's kHeadDim % 64.
    const int width = kWhole ? 64 : min(64, kHeadDim - col0);
    const float4* src = kWhole ? reinterpret_cast<const float4*>(part) + int64_t{blockIdx.x} * 1024
                               : reinterpret_cast<const float4*>(part + int64_t{row0} * kHeadDim + col0 * 64);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // Float4 f is n8 tile f / 128 of warpgroup thread f % 128.
      const int f = tid + k * 256, n8 = f / 128, thread = f % 128;
      if (!kWhole && n8 * 8 >= width) break;
      const int r = (thread / 32) * 16 + (thread % 32) / 4, c = n8 * 8 + (thread % 4) * 2;
      const float4 v = src[f];
      *reinterpret_cast<float2*>(&tile[r * kStride + c]) = make_float2(v.x, v.y);
      *reinterpret_cast<float2*>(&tile[(r + 8) * kStride + c]) = make_float2(v.z, v.w);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = tid + k * 256, r = i / 16, c = i % 16 * 4;
      if (row0 + r < seq.seqlen_q && (kWhole || c < width))
        store4(row0 + r, col0 + c, *reinterpret_cast<const float4*>(&tile[r * kStride + c]));
    }
  }
}

// What one backward CTA reads and writes in global memory: K, V, dK and dV of its key block
// (first key n0 of key/value head head_kv), and the iterations it makes: every query head of
// the GQA group times every query block of block_m rows that sees the key block (causal: row i
// sees key j iff j <= i + diag, diag = seqlen_k - seqlen_q). Both backward main kernels use it.
template <typename Element>
struct BwdQueryBlock {  // iteration `it`: query head, query block, and where its rows start
  const Element *q, *d_o;
  const float *lse, *dot;  // the rows' LSE and D = rowsum(dO * O)
  int head, m_block, m0, valid_q;
};

template <typename Element>
struct BwdGlobal {
  const Element *k, *v;
  Element *dk, *dv;
  int head_kv, group, block_m, m_begin, m_count, iterations, valid_k;

  __device__ __forceinline__ BwdGlobal(const AttentionParams& p, const SeqInfo& seq, int b, int head_kv_, int n0,
                                       int block_m_)
      : head_kv(head_kv_), group(p.heads_q / p.heads_kv), block_m(block_m_), valid_k(seq.seqlen_k - n0) {
    k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, head_kv) +
        n0 * p.k_row_stride;
    v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, head_kv) +
        n0 * p.v_row_stride;
    dk = static_cast<Element*>(p.dk) + seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, head_kv) +
         n0 * p.dk_row_stride;
    dv = static_cast<Element*>(p.dv) + seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, head_kv) +
         n0 * p.dv_row_stride;
    const int m_end = (seq.seqlen_q + block_m - 1) / block_m;
    m_begin = 0;
    if (p.mask == Mask::causal) {
      const int first_row = n0 - (seq.seqlen_k - seq.seqlen_q);
      m_begin = first_row <= 0 ? 0 : first_row / block_m;
    }
    m_count = max(0, m_end - m_begin);
    iterations = m_count * group;
  }

  __device__ __forceinline__ BwdQueryBlock<Element> query_block(const AttentionParams& p, const SeqInfo& seq,
                                                                const BwdWorkspace& ws, int b, int it) const {
    BwdQueryBlock<Element> qb;
    qb.head = head_kv * group + it / m_count;
    qb.m_block = m_begin + it % m_count;
    qb.m0 = qb.m_block * block_m;
    qb.valid_q = seq.seqlen_q - qb.m0;
    qb.q = static_cast<const Element*>(p.q) +
           seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, qb.head) + qb.m0 * p.q_row_stride;
    qb.d_o = static_cast<const Element*>(p.d_o) +
             seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, qb.head) + qb.m0 * p.do_row_stride;
    qb.lse = p.lse + (seq.varlen ? 0 : b * p.lse_batch_stride) + qb.head * p.lse_head_stride + seq.q_start + qb.m0;
    qb.dot = ws.dot_do_o + (int64_t(b) * p.heads_q + qb.head) * p.seqlen_q + qb.m0;
    return qb;
  }
};

// Deterministic mode: the CTAs that add to one query block's dQ take turns in key-block order
// behind a per-(batch, head, query block) counter. Every thread calls both.
__device__ __forceinline__ int* dq_semaphore(const AttentionParams& p, const BwdWorkspace& ws, int b, int head,
                                             int m_block, int block_m) {
  const int m_blocks_total = (p.seqlen_q + block_m - 1) / block_m;  // semaphore row length
  return ws.semaphores + (int64_t(b) * p.heads_q + head) * m_blocks_total + m_block;
}
__device__ __forceinline__ void dq_semaphore_wait(int* semaphore, int n_block) {
  if (threadIdx.x == 0) {
    // Key blocks 0 .. n_block - 1 of this query block add before us (causal: the key blocks
    // that see a query block are always a prefix 0 .. k).
    while (atomicAdd(semaphore, 0) != n_block) {
    }
    __threadfence();
  }
  __syncthreads();
}
__device__ __forceinline__ void dq_semaphore_release(int* semaphore) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(semaphore, 1);
}

// Plain loads of a query block's LSE (times log2 e; +inf for padding rows, so that P = 0
// there) and D into shared memory, made visible by the next barrier.
template <int kBlockM, int kThreads>
__device__ __forceinline__ void load_lse_dot_rows(float* s_lse, float* s_dot, const float* lse, const float* dot,
                                                  int valid_q, int tid) {
  for (int i = tid; i < kBlockM; i += kThreads) {
    const bool valid = i < valid_q;
    s_lse[i] = valid ? lse[i] * kLog2e : INFINITY;
    s_dot[i] = valid ? dot[i] : 0.0f;
  }
}

// `deterministic` is a run-time flag, not a template parameter: the semaphore wait costs a
// uniform branch per iteration, and fewer kernels per instance save CI's nvcc time. Dropout is
// a template parameter (kDropout: p.dropout_p > 0), as in the wgmma kernel: as a run-time flag
// it cost 6-23% without dropout at d32 and d256.
template <typename Traits, bool kDropout>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_bwd_main_kernel(const KernelParams p, float scale, BwdWorkspace ws, bool deterministic) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kStride, kStrideDs = Traits::kStrideDs, kThreads = Traits::kThreads;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesD = Traits::kNTilesD, kKTiles = Traits::kKTiles;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);  // [kBlockN][kStride]
  Element* sV = sK + Traits::kSmemKV;                  // [kBlockN][kStride]
  Element* sQ = sV + Traits::kSmemKV;                  // [2][kBlockM][kStride]
  Element* sdO = sQ + 2 * Traits::kSmemQ;              // [2][kBlockM][kStride]
  Element* sdS = sdO + 2 * Traits::kSmemQ;             // [kBlockN][kStrideDs], dS^T
  float* sLse = reinterpret_cast<float*>(sdS + Traits::kSmemDs);  // [2][kBlockM], LSE * log2(e)
  float* sDot = sLse + 2 * kBlockM;                                 // [2][kBlockM]

  const int n_block = blockIdx.x, head_kv = blockIdx.y, b = p.batch_begin + int(blockIdx.z);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const SeqInfo seq(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.seqlen_k) return;
  const bool causal = p.mask == Mask::causal;
  const int diag = seq.seqlen_k - seq.seqlen_q;
  const BwdGlobal<Element> global(p, seq, b, head_kv, n0, kBlockM);
  const int iterations = global.iterations;

  // Issues the copies of iteration `it` (query head, query block) into buffer `buf`.
  auto load_q_block = [&](int it, int buf) {
    const BwdQueryBlock<Element> qb = global.query_block(p, seq, ws, b, it);
    load_tile_async<kBlockM, kHeadDim, kStride, kThreads>(sQ + buf * Traits::kSmemQ, qb.q, p.q_row_stride, qb.valid_q,
                                                          tid);
    load_tile_async<kBlockM, kHeadDim, kStride, kThreads>(sdO + buf * Traits::kSmemQ, qb.d_o, p.do_row_stride,
                                                          qb.valid_q, tid);
    load_lse_dot_rows<kBlockM, kThreads>(sLse + buf * kBlockM, sDot + buf * kBlockM, qb.lse, qb.dot, qb.valid_q, tid);
  };

  float acc_dk[kKTiles][kNTilesD][4], acc_dv[kKTiles][kNTilesD][4];  // rows: this warp's keys
#pragma unroll
  for (int j = 0; j < kKTiles; ++j)
#pragma unroll
    for (int i = 0; i < kNTilesD; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[j][i][e] = acc_dv[j][i][e] = 0.0f;

  const float scale_log2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const uint32_t dropout_top = dropout_top_threshold(threshold);
  const DropoutRng rng = p.rng_device != nullptr ? *p.rng_device : p.rng;  // a graph replay's per-step stream
  const float keep_scale = static_cast<float>(dropout_keep_scale(threshold));
  // This thread's keys in key tile j: key_local0 + 16 j and key_local0 + 16 j + 8.
  const int warp_key0 = warp * 16 * kKTiles;
  const int key_local0 = warp_key0 + g;

  if (iterations > 0) {
    load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sK, global.k, p.k_row_stride, global.valid_k, tid);
    load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sV, global.v, p.v_row_stride, global.valid_k, tid);
    load_q_block(0, 0);
    cp_async_commit();
  }

  for (int it = 0; it < iterations; ++it) {
    const int buf = it & 1;
    const BwdQueryBlock<Element> qb = global.query_block(p, seq, ws, b, it);
    const int head = qb.head, m_block = qb.m_block, m0 = qb.m0;
    cp_async_wait<0>();
    __syncthreads();  // tiles of `it` visible; everyone is done with iteration it - 1
    if (it + 1 < iterations) load_q_block(it + 1, buf ^ 1);
    cp_async_commit();

    const Element* sQb = sQ + buf * Traits::kSmemQ;
    const Element* sdOb = sdO + buf * Traits::kSmemQ;
    const float* sLseb = sLse + buf * kBlockM;
    const float* sDotb = sDot + buf * kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 kKTiles keys x kBlockM queries.
    float s[kKTiles][kNTilesS][4], dp[kKTiles][kNTilesS][4];
#pragma unroll
    for (int j = 0; j < kKTiles; ++j)
#pragma unroll
      for (int i = 0; i < kNTilesS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][i][e] = dp[j][i][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t ak[kKTiles][4], av[kKTiles][4];
#pragma unroll
      for (int j = 0; j < kKTiles; ++j) {
        const int a_off =
            (warp_key0 + 16 * j + ldm_row_pattern_row(lane)) * kStride + kk * 16 + ldm_row_pattern_col(lane);
        ldmatrix_x4(ak[j], smem_u32(sK + a_off));
        ldmatrix_x4(av[j], smem_u32(sV + a_off));
      }
#pragma unroll
      for (int np = 0; np < kNTilesS / 2; ++np) {
        const int b_off = (np * 16 + ldm_pair_pattern_row(lane)) * kStride + kk * 16 + ldm_pair_pattern_col(lane);
        uint32_t bq[4], bdo[4];
        ldmatrix_x4(bq, smem_u32(sQb + b_off));
        ldmatrix_x4(bdo, smem_u32(sdOb + b_off));
#pragma unroll
        for (int j = 0; j < kKTiles; ++j) {
          Ops::mma(s[j][2 * np], ak[j], bq[0], bq[1]);
          Ops::mma(s[j][2 * np + 1], ak[j], bq[2], bq[3]);
          Ops::mma(dp[j][2 * np], av[j], bdo[0], bdo[1]);
          Ops::mma(dp[j][2 * np + 1], av[j], bdo[2], bdo[3]);
        }
      }
    }

    // P^T (masked), dS^T, and the dropped P^T for dV. Element (key, query) of this thread:
    // key = n0 + key_local0 + 16 j + 8 * (e / 2), query = m0 + nt * 8 + 2 t + e % 2.
    const bool need_mask = n0 + kBlockN > seq.seqlen_k || (causal && n0 + kBlockN - 1 > m0 + diag);
    const int64_t batch_head = int64_t{b} * p.heads_q + head;
    // This thread's queries are nt * 8 + 2t + {0, 1}: read their LSE and D once, as float2.
    float2 lse_q[kNTilesS], dot_q[kNTilesS];
#pragma unroll
    for (int nt = 0; nt < kNTilesS; ++nt) {
      lse_q[nt] = *reinterpret_cast<const float2*>(sLseb + nt * 8 + 2 * t);
      dot_q[nt] = *reinterpret_cast<const float2*>(sDotb + nt * 8 + 2 * t);
    }
    static_assert(kNTilesS % 4 == 0, "dropout shares Philox calls over groups of 4 n8 tiles (32 queries)");
#pragma unroll
    for (int j = 0; j < kKTiles; ++j)
#pragma unroll
    for (int grp = 0; grp < kNTilesS / 4; ++grp) {
      // Dropout bytes of 4 n8 tiles at a time (flash_common.cuh: one Philox call per lane).
      uint32_t drop_bytes[4] = {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
      if constexpr (kDropout)
        dropout_key_column_bytes(rng, batch_head, m0 + grp * 32, n0 + warp_key0 + 16 * j, g, t, drop_bytes);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int nt = 4 * grp + i / 4, e = i % 4;
        const int q_local = nt * 8 + 2 * t + (e & 1);
        const int key = n0 + key_local0 + 16 * j + 8 * (e >> 1);
        const int query = m0 + q_local;
        const float lse_e = (e & 1) ? lse_q[nt].y : lse_q[nt].x;
        const float dot_e = (e & 1) ? dot_q[nt].y : dot_q[nt].x;
        float pv = exp2f(s[j][nt][e] * scale_log2 - lse_e);
        if (need_mask && (key >= seq.seqlen_k || (causal && key > query + diag))) pv = 0.0f;
        float dpv = dp[j][nt][e];
        float p_dropped = pv;
        if constexpr (kDropout) {
          const bool keep = !dropout_byte_dropped(drop_bytes[nt & 3], dropout_bwd_byte_pos(e), dropout_top);
          dpv = keep ? dpv * keep_scale : 0.0f;
          p_dropped = keep ? pv * keep_scale : 0.0f;
        }
        s[j][nt][e] = p_dropped;            // s now holds (P Z)^T
        dp[j][nt][e] = pv * (dpv - dot_e);  // dp now holds dS^T (unscaled)
      }
    }

    // dV += (P Z)^T dO and dK += dS^T Q: A from registers, B = dO, Q read transposed.
#pragma unroll
    for (int kt = 0; kt < kBlockM / 16; ++kt) {
      uint32_t ap[kKTiles][4], ads[kKTiles][4];
#pragma unroll
      for (int j = 0; j < kKTiles; ++j) {
        ap[j][0] = Ops::pack(s[j][2 * kt][0], s[j][2 * kt][1]);
        ap[j][1] = Ops::pack(s[j][2 * kt][2], s[j][2 * kt][3]);
        ap[j][2] = Ops::pack(s[j][2 * kt + 1][0], s[j][2 * kt + 1][1]);
        ap[j][3] = Ops::pack(s[j][2 * kt + 1][2], s[j][2 * kt + 1][3]);
        ads[j][0] = Ops::pack(dp[j][2 * kt][0], dp[j][2 * kt][1]);
        ads[j][1] = Ops::pack(dp[j][2 * kt][2], dp[j][2 * kt][3]);
        ads[j][2] = Ops::pack(dp[j][2 * kt + 1][0], dp[j][2 * kt + 1][1]);
        ads[j][3] = Ops::pack(dp[j][2 * kt + 1][2], dp[j][2 * kt + 1][3]);
        // dS^T to shared memory for dQ = dS K (rows: keys, columns: queries).
        Element* row0 = sdS + (key_local0 + 16 * j) * kStrideDs + kt * 16 + 2 * t;
        *reinterpret_cast<uint32_t*>(row0) = ads[j][0];
        *reinterpret_cast<uint32_t*>(row0 + 8 * kStrideDs) = ads[j][1];
        *reinterpret_cast<uint32_t*>(row0 + 8) = ads[j][2];
        *reinterpret_cast<uint32_t*>(row0 + 8 * kStrideDs + 8) = ads[j][3];
      }
#pragma unroll
      for (int dpair = 0; dpair < kNTilesD / 2; ++dpair) {
        const int off = (kt * 16 + ldm_row_pattern_row(lane)) * kStride + dpair * 16 + ldm_row_pattern_col(lane);
        uint32_t bdo[4], bq[4];
        ldmatrix_x4_trans(bdo, smem_u32(sdOb + off));
        ldmatrix_x4_trans(bq, smem_u32(sQb + off));
#pragma unroll
        for (int j = 0; j < kKTiles; ++j) {
          Ops::mma(acc_dv[j][2 * dpair], ap[j], bdo[0], bdo[1]);
          Ops::mma(acc_dv[j][2 * dpair + 1], ap[j], bdo[2], bdo[3]);
          Ops::mma(acc_dk[j][2 * dpair], ads[j], bq[0], bq[1]);
          Ops::mma(acc_dk[j][2 * dpair + 1], ads[j], bq[2], bq[3]);
        }
      }
    }
    __syncthreads();  // dS^T complete in shared memory

    // dQ (kBlockM x kHeadDim) += dS K: warp (row group, column group).
    constexpr int kDqNTiles = Traits::kDqCols / 8;
    const int rg = warp % Traits::kDqRowGroups, cg = warp / Traits::kDqRowGroups;
    float dq[kDqNTiles][4];
#pragma unroll
    for (int i = 0; i < kDqNTiles; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, smem_u32(sdS + (kt * 16 + ldm_pair_pattern_row(lane)) * kStrideDs + rg * 16 +
                                    ldm_pair_pattern_col(lane)));
#pragma unroll
      for (int dpair = 0; dpair < kDqNTiles / 2; ++dpair) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, smem_u32(sK + (kt * 16 + ldm_row_pattern_row(lane)) * kStride + cg * Traits::kDqCols +
                                       dpair * 16 + ldm_row_pattern_col(lane)));
        Ops::mma(dq[2 * dpair], a, bk[0], bk[1]);
        Ops::mma(dq[2 * dpair + 1], a, bk[2], bk[3]);
      }
    }

    int* const semaphore = deterministic ? dq_semaphore(p, ws, b, head, m_block, kBlockM) : nullptr;
    if (deterministic) dq_semaphore_wait(semaphore, n_block);
    float* gdq = ws.dq_accum + ((int64_t(b) * p.heads_q + head) * ws.dq_rows + m0) * kHeadDim;
    // dQ atomics are the backward's largest memory cost (every key block adds its part), so
    // they are vector atomics (sm_90). Width 2: each lane adds its own column pair.
    // Width 4: lanes t and t ^ 1 hold columns 2t..2t+1 of rows g and g + 8, i.e. 4
    // neighbouring columns of both rows; they swap halves so that the even lane adds row g's
    // 4 columns and the odd lane row g + 8's (FLASHGPT_DQ_ATOMIC_WIDTH picks, for the lab).
    if constexpr (FLASHGPT_DQ_ATOMIC_WIDTH == 4) {
      const bool odd = (t & 1) != 0;
      const int q_local = rg * 16 + g + (odd ? 8 : 0);
      const bool q_valid = m0 + q_local < seq.seqlen_q;
      float* dq_row = gdq + q_local * kHeadDim + cg * Traits::kDqCols + 4 * (t >> 1);
#pragma unroll
      for (int i = 0; i < kDqNTiles; ++i) {
        const float a0 = dq[i][0] * scale, a1 = dq[i][1] * scale;  // row g, columns 2t, 2t + 1
        const float b0 = dq[i][2] * scale, b1 = dq[i][3] * scale;  // row g + 8
        const float r0 = __shfl_xor_sync(0xffffffffu, odd ? a0 : b0, 1);
        const float r1 = __shfl_xor_sync(0xffffffffu, odd ? a1 : b1, 1);
        const float4 v = odd ? make_float4(r0, r1, b0, b1) : make_float4(a0, a1, r0, r1);
        if (q_valid) atomicAdd(reinterpret_cast<float4*>(dq_row + i * 8), v);
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int q_local = rg * 16 + g + 8 * r;
        if (m0 + q_local < seq.seqlen_q) {
#pragma unroll
          for (int i = 0; i < kDqNTiles; ++i) {
            float* dst = gdq + q_local * kHeadDim + cg * Traits::kDqCols + i * 8 + 2 * t;
            atomicAdd(reinterpret_cast<float2*>(dst), make_float2(dq[i][2 * r] * scale, dq[i][2 * r + 1] * scale));
          }
        }
      }
    }
    if (deterministic) dq_semaphore_release(semaphore);
  }
  cp_async_wait<0>();

  // dK = scale * dS^T Q, dV: rows of this warp, skipping keys past the sequence.
  Element* gdK = global.dk;
  Element* gdV = global.dv;
  const int valid_k = global.valid_k;
#pragma unroll
  for (int j = 0; j < kKTiles; ++j)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key_local = key_local0 + 16 * j + 8 * r;
    if (key_local < valid_k) {
#pragma unroll
      for (int i = 0; i < kNTilesD; ++i) {
        *reinterpret_cast<uint32_t*>(gdK + key_local * p.dk_row_stride + i * 8 + 2 * t) =
            Ops::pack(acc_dk[j][i][2 * r] * scale, acc_dk[j][i][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(gdV + key_local * p.dv_row_stride + i * 8 + 2 * t) =
            Ops::pack(acc_dv[j][i][2 * r], acc_dv[j][i][2 * r + 1]);
      }
    }
  }
}

}  // namespace flashgpt::attn

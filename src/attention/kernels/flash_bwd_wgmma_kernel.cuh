// The Hopper backward main kernel: the algorithm and contract of flash_bwd_main_kernel
// (flash_bwd_kernel.cuh: same preprocess, workspace, dQ accumulator, convert kernel and
// deterministic mode), with its five GEMMs on wgmma (sm_90a) instead of mma.sync. With
// ws.dq_arrivals set it converts dQ itself (the fused dQ convert, flash_bwd_kernel.cuh).
//
// A tile is a (128-key block, kv head, batch entry); without dropout one CTA per SM takes tile
// after tile (FLASHGPT_BWD_PERSISTENT below), with dropout a CTA per tile. Two warpgroups of
// 128 threads; warpgroup wg owns keys 64 wg .. 64 wg + 63 of the block (the rows of S^T, dP^T,
// dK and dV). For each query head of the GQA group and each block of kBlockM queries that
// sees the key block:
//   S^T  = K Q^T       wgmma SS,  A = K (K-major), B = Q (K-major)       m64 n(kBlockM)
//   dP^T = V dO^T      wgmma SS,  A = V, B = dO                            m64 n(kBlockM)
//   P^T = exp2(S^T scale log2 e - LSE log2 e), dS^T = P^T (dP^T Z - D)  (registers)
//   dV  += (P Z)^T dO  wgmma RS,  A = (P Z)^T from registers, B = dO MN-major   m64 n(d)
//   dK  += dS^T Q      wgmma RS,  A = dS^T from registers, B = Q MN-major        m64 n(d)
//   dQ   = dS K        wgmma SS with both operands MN-major: dS^T goes through shared memory
//                      (both warpgroups' keys are needed); the kBlockM x d product is cut
//                      into two 64 x 64 sub-tiles, one per warpgroup. The fp32 accumulator
//                      in the workspace keeps each sub-tile contiguous, in fragment order
//                      (flash_bwd_convert_dq_kernel), so that each thread's n8 tile is one float4
//                      atomic (8 a thread, instead of 16 float2 ones in row-major order).
//                      (A bulk reduce-add of the sub-tile from shared memory instead measured
//                      0.72-0.90x FA2 against the atomics' 0.89-1.03x.)
// The accumulator of m64nN is, per warp, the m16n8 C fragment layout tiled along N: this
// thread's rows (keys) are 16 (warp % 4) + lane / 4 (+ 8), exactly one m16 key tile of the
// mma.sync kernel, so the masking and the dropout bytes (dropout_key_column_bytes) are the same.
//
// Shared memory (wgmma_common.cuh's swizzled layout): K, V [128 keys], Q and dO [2 stages]
// [kBlockM queries], dS^T [128 keys][kBlockM] (as kBlockM / 64 column blocks), LSE and D
// [2 stages][kBlockM], dK and dV staged for the copy-out. Loads are cp.async by all threads,
// the next query block's in flight while this one is computed; two barriers per query block
// (loads landed, dS^T complete).
#pragma once

#include "flash_tiles.cuh"
#include "flash_bwd_kernel.cuh"
#include "flash_common.cuh"
#include "wgmma_common.cuh"

#ifndef FLASHGPT_BWD_DS_STORE_LATE
#define FLASHGPT_BWD_DS_STORE_LATE 0
#endif
// Lab hooks, per head dim: 1 copies the LSE and D rows with cp.async, 0 with plain loads by
// the first kBlockM threads (which then wait for them). Measured on the H100 in one run:
// cp.async wins at d64 (+3-8% backward) and loses at d128 (-4 to -13%). Not
// profiled; a guess is that at d128 the wait holds back only two warps of warpgroup 0, which
// staggers the two warpgroups' S and dP GEMMs instead of issuing them together.
#ifndef FLASHGPT_BWD64_LSE_ASYNC
#define FLASHGPT_BWD64_LSE_ASYNC 1
#endif
#ifndef FLASHGPT_BWD128_LSE_ASYNC
#define FLASHGPT_BWD128_LSE_ASYNC 0
#endif
// Lab hook: 1 builds the wgmma descriptors once and advances them by constants (3-5% faster
// backward on the H100 than 0, which builds each one at its use).
#ifndef FLASHGPT_BWD_DESC_PRECOMPUTE
#define FLASHGPT_BWD_DESC_PRECOMPUTE 1
#endif
// Lab hooks, how CTAs get their key blocks ("tiles"), for the kernel without and with dropout:
// 0 launches a CTA per tile (3-D grid); 1 runs one CTA per SM that takes tile after tile, the
// first by its block index, the next ones from a counter in the workspace, and issues the
// copies of its next tile's K, V and first query block while it writes out this tile's dK
// and dV. Measured on the H100, TFLOP/s backward at s 512-16k: without
// dropout 1 is 2-10% faster than 0 (d128 causal s512-2k: 3-5% slower, still 1.03-1.11x FA2);
// with dropout (the model's shape) 1 measured 92 and 0 (with a tile index from a division)
// 89, both spilling about 200 bytes. A counter-fed tile index is not warp-uniform to the
// compiler, so what derives from it takes ordinary registers, and the dropout kernel has none
// to spare: it keeps 0 with the tile read off the block index.
#ifndef FLASHGPT_BWD_PERSISTENT
#define FLASHGPT_BWD_PERSISTENT 1
#endif
#ifndef FLASHGPT_BWD_DROPOUT_PERSISTENT
#define FLASHGPT_BWD_DROPOUT_PERSISTENT 0
#endif
// Lab hook: 1 issues dK's GEMM after dQ's, so that the dQ atomics overlap it; 0 issues dV and
// dK together before the dQ barrier.
#ifndef FLASHGPT_BWD_DK_AFTER_DQ
#define FLASHGPT_BWD_DK_AFTER_DQ 1
#endif

namespace flashgpt::attn {

// load_tile_swizzled_async for the backward's tiles: with a head dim whose 16-byte chunks a row
// are not a power of two (d96: 12), the chunks are numbered over the padded row (16) instead,
// and a thread skips those of the pad, which it meets at every step or never (its column is fixed
// when kThreads is a multiple of the padded chunks a row): a shift and a mask where the real
// count took a division by 12 (with it the d96 kernel spilled 20 bytes instead of 12).
template <int kRows, int kHeadDim, int kHeadDimPadded, int kThreads, typename Element>
__device__ __forceinline__ void load_rows_swizzled_async(uint32_t smem, const Element* gmem, int64_t row_stride,
                                                         int valid_rows, int tid) {
  constexpr int kRealChunks = kHeadDim / 8;
  if constexpr ((kRealChunks & (kRealChunks - 1)) == 0) {
    load_tile_swizzled_async<kRows, kHeadDim, kThreads>(smem, gmem, row_stride, valid_rows, tid);
  } else {
    constexpr int kChunksPerRow = kHeadDimPadded / 8;
    constexpr int kChunks = kRows * kChunksPerRow;
    static_assert(kChunks % kThreads == 0 && kThreads % kChunksPerRow == 0, "a fixed column per thread");
    const int col = (tid % kChunksPerRow) * 8;
    if (col >= kHeadDim) return;
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
      const int row = (tid + i * kThreads) / kChunksPerRow;
      const bool valid = row < valid_rows;
      const Element* src = valid ? gmem + row * row_stride + col : gmem;
      cp_async_16(smem + swizzled_offset<kRows>(row, col), src, valid);
    }
  }
}

// kHeadDim: the API's head dim; kHeadDimPadded: the one the shared-memory tiles and the dK, dV
// and dQ GEMMs have, the next multiple of 64 (d32: d64's kernel, d96: d128's; 64 and 128 are
// their own). Padded rows: the loads write the kHeadDim real columns, the pad columns of K, V,
// Q and dO are zeroed once at the start and never written again, so the dK (B = Q), dV (B = dO)
// and dQ (B = K) GEMMs, whose N covers whole swizzle rows, read zeros there; S^T and dP^T
// reduce over the real columns only. The pad columns of dK and dV are computed and dropped in
// the epilogue, those of dQ never reach the accumulator (partial sub-tiles below).
template <int kHeadDim_, int kBlockM_, typename Element_>
struct BwdWgmmaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimPadded = (kHeadDim + 63) / 64 * 64;
  static constexpr int kBlockM = kBlockM_;  // queries per step
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockN = 64 * kWarpgroups;     // keys per CTA
  static constexpr int kNTilesS = kBlockM / 8;         // n8 tiles of S^T, dP^T per thread
  static constexpr int kNTilesD = kHeadDimPadded / 8;  // n8 tiles of dK, dV per thread, pad included
  static_assert(sizeof(Element) == 2, "the transpose bits and the 64-element swizzle rows assume 16-bit types");
  static_assert(kHeadDim % 32 == 0 && kBlockM % 64 == 0,
                "tiles are made of 64-element swizzle blocks; a padded row is at least half real");
  static_assert(kNTilesS % 4 == 0, "dropout shares Philox calls over groups of 4 n8 tiles (32 queries)");
  // dQ = dS K is cut into 64 x 64 sub-tiles, one per warpgroup.
  static constexpr bool kLseAsync = (kHeadDimPadded == 64 ? FLASHGPT_BWD64_LSE_ASYNC : FLASHGPT_BWD128_LSE_ASYNC) != 0;
  static constexpr int kDqQueryBlocks = kBlockM / 64;
  static_assert(kDqQueryBlocks * (kHeadDimPadded / 64) == kWarpgroups, "one 64 x 64 dQ sub-tile per warpgroup");
  static constexpr int kTileKVBytes = kBlockN * kHeadDimPadded * 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDimPadded * 2;
  static constexpr int kTileDsBytes = kBlockN * kBlockM * 2;
  // Whether the kernel with or without dropout is persistent (the hooks above).
  __host__ __device__ static constexpr bool persistent(bool dropout) {
    return (dropout ? FLASHGPT_BWD_DROPOUT_PERSISTENT : FLASHGPT_BWD_PERSISTENT) != 0;
  }
  using Staged = StagedTile<kBlockN, kHeadDim, Element>;  // dK and dV on their way out
  // K, V, Q x 2, dO x 2, dS^T, LSE x 2, D x 2, staged dK and dV, plus slack to align the base
  // to 1024 bytes.
  static constexpr size_t kSmemBytes = 1024 + 2 * size_t{kTileKVBytes} + 4 * size_t{kTileQBytes} + kTileDsBytes +
                                       4 * kBlockM * sizeof(float) + 2 * Staged::kBytes;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block can have");
};

// kDropout: the launcher's choice (dropout_p > 0). A run-time flag let nvcc turn the
// per-element dropout code into selects that ran without dropout too (d64: 7x the LOP3s
// in the loop, the backward 25% slower).
// kFusedDq: the fused dQ convert (flash_bwd_kernel.cuh; ws.dq_arrivals set), a variant of its
// own so that the kernels without it stay as they were (ptxas allocates the whole loop anew).
template <typename Traits, bool kDropout, bool kFusedDq>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_bwd_wgmma_kernel(const KernelParams p, float scale, BwdWorkspace ws, bool deterministic) {
#ifdef FLASHGPT_WGMMA_AVAILABLE
  static_assert(!kFusedDq || Traits::kHeadDimPadded == Traits::kHeadDim,
                "the fused dQ convert's strips are whole 64-column blocks: padded head dims use the convert kernel");
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using Mma = WgmmaOps<Element>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads, kNTilesS = Traits::kNTilesS, kNTilesD = Traits::kNTilesD;
  constexpr int kHeadDimPadded = Traits::kHeadDimPadded;
  constexpr int kKSteps = kHeadDim / 16;  // k16 steps of the S^T and dP^T GEMMs (the real columns)
  constexpr uint32_t kSwizzleAtom = 1024;  // 8 rows x 128 bytes: the descriptors' stride byte offset
  constexpr bool kDkAfterDq = FLASHGPT_BWD_DK_AFTER_DQ != 0;
  constexpr bool kPersistent = Traits::persistent(kDropout);
  constexpr bool kDqArriveLate = FLASHGPT_BWD_DQ_ARRIVE_LATE != 0;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base = smem_u32(smem_raw);
  const uint32_t sK = (smem_base + 1023u) & ~1023u;
  const uint32_t sV = sK + Traits::kTileKVBytes;
  const uint32_t sQ = sV + Traits::kTileKVBytes;        // [2 stages]
  const uint32_t sdO = sQ + 2 * Traits::kTileQBytes;    // [2 stages]
  const uint32_t sdS = sdO + 2 * Traits::kTileQBytes;   // dS^T
  unsigned char* const sdS_ptr = smem_raw + (sdS - smem_base);
  float* const sLse = reinterpret_cast<float*>(sdS_ptr + Traits::kTileDsBytes);  // [2][kBlockM]
  float* const sDot = sLse + 2 * kBlockM;                                          // [2][kBlockM]

  const int tid = threadIdx.x, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wg = tid / 128, warp_in_wg = (tid / 32) % 4;
  const bool causal = p.mask == Mask::causal;
  // Tiles: (key block, kv head, batch entry), numbered key block fastest, so that tiles that
  // run at the same time share their query blocks' loads in L2. Without kPersistent the one
  // tile is the 3-D block index, which the compiler keeps in uniform registers.
  const int n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int num_tiles = n_blocks * p.heads_kv * p.batch;
  struct Tile {
    int n_block, head_kv, b;
  };
  auto tile_at = [&](int index) {
    if constexpr (!kPersistent) return Tile{int(blockIdx.x), int(blockIdx.y), p.batch_begin + int(blockIdx.z)};
    return Tile{index % n_blocks, index / n_blocks % p.heads_kv, index / n_blocks / p.heads_kv};
  };

  // Issues the copies of a query block (iteration `it` of a tile) into stage `buf`: Q and dO,
  // and with kLseAsync the LSE and D rows.
  auto copy_q_block = [&](const BwdQueryBlock<Element>& qb, int buf) {
    load_rows_swizzled_async<kBlockM, kHeadDim, kHeadDimPadded, kThreads>(sQ + buf * Traits::kTileQBytes, qb.q,
                                                                          p.q_row_stride, qb.valid_q, tid);
    load_rows_swizzled_async<kBlockM, kHeadDim, kHeadDimPadded, kThreads>(sdO + buf * Traits::kTileQBytes, qb.d_o,
                                                                          p.do_row_stride, qb.valid_q, tid);
    // With cp.async, rows past the sequence read LSE = D = 0: their Q and dO are zero-filled,
    // so S = 0, P = 1 and dP = 0, which makes their dS and their part of dV zero.
    static_assert(2 * kBlockM <= kThreads, "one statistic per thread");
    if constexpr (Traits::kLseAsync) {
      if (tid < 2 * kBlockM) {
        const int i = tid % kBlockM;
        const bool valid = i < qb.valid_q;
        if (tid < kBlockM) {
          cp_async_4(smem_u32(sLse + buf * kBlockM + i), valid ? qb.lse + i : qb.lse, valid);
        } else {
          cp_async_4(smem_u32(sDot + buf * kBlockM + i), valid ? qb.dot + i : qb.dot, valid);
        }
      }
    }
  };
  // Without kLseAsync the LSE and D rows are plain loads by the first kBlockM threads.
  auto load_stats_plain = [&](const BwdQueryBlock<Element>& qb, int buf) {
    if constexpr (!Traits::kLseAsync)
      load_lse_dot_rows<kBlockM, kThreads>(sLse + buf * kBlockM, sDot + buf * kBlockM, qb.lse, qb.dot, qb.valid_q, tid);
  };
  // Issues the copies of a tile's K, V and first query block (stage 0), if it has work. It
  // builds the tile's SeqInfo and BwdGlobal itself (the loop builds them again when the tile
  // starts) rather than keep them live in registers across the epilogue.
  auto copy_tile_start = [&](int index) {
    const Tile tile = tile_at(index);
    const SeqInfo seq(p, tile.b);
    const int n0 = tile.n_block * kBlockN;
    if (n0 >= seq.seqlen_k) return;
    const BwdGlobal<Element> global(p, seq, tile.b, tile.head_kv, n0, kBlockM);
    if (global.iterations == 0) return;
    load_rows_swizzled_async<kBlockN, kHeadDim, kHeadDimPadded, kThreads>(sK, global.k, p.k_row_stride, global.valid_k,
                                                                          tid);
    load_rows_swizzled_async<kBlockN, kHeadDim, kHeadDimPadded, kThreads>(sV, global.v, p.v_row_stride, global.valid_k,
                                                                          tid);
    copy_q_block(global.query_block(p, seq, ws, tile.b, 0), 0);
    cp_async_commit();
  };

  const float scale_log2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  // The launcher picks kDropout = dropout_p > 0, so the run-time test is redundant, but
  // without it ptxas spilled 220 bytes in the d64 dropout kernel instead of 96.
  const bool use_dropout = kDropout && dropout_enabled(threshold);
  const uint32_t dropout_top = dropout_top_threshold(threshold);
  const DropoutRng rng = p.rng_device != nullptr ? *p.rng_device : p.rng;  // a graph replay's per-step stream
  const float keep_scale = static_cast<float>(dropout_keep_scale(threshold));
  const int warp_key0 = wg * 64 + warp_in_wg * 16;  // this warp's m16 key tile
  const int key_local0 = warp_key0 + g;             // this thread's keys: key_local0 and + 8
  // This warpgroup's dQ sub-tile: queries 64 dq_qb .., head-dim columns 64 dq_db ..
  const int dq_qb = wg % Traits::kDqQueryBlocks, dq_db = wg / Traits::kDqQueryBlocks;
  // Descriptors: FLASHGPT_BWD_DESC_PRECOMPUTE=1 builds them once here and advances them by
  // constant offsets in the loop (wgmma_desc_advance; 16 more live registers), 0 builds each
  // one from its address where it is used. K-major operands (S^T, dP^T): this warpgroup's 64
  // rows of K and V, stage 0 of Q and dO. MN-major ones: Q and dO as B of dK and dV, dS^T and K
  // as A and B of dQ.
  struct Desc {
    uint32_t addr, lead;
    uint64_t built;
    __device__ __forceinline__ Desc(uint32_t a, uint32_t l) : addr(a), lead(l), built(0) {
      if constexpr (FLASHGPT_BWD_DESC_PRECOMPUTE) built = wgmma_desc_sw128(a, l, kSwizzleAtom);
    }
    __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
      if constexpr (FLASHGPT_BWD_DESC_PRECOMPUTE) return wgmma_desc_advance(built, bytes);
      return wgmma_desc_sw128(addr + bytes, lead, kSwizzleAtom);
    }
  };
  const Desc desc_k_rows(sK + wg * 64 * 128, 16), desc_v_rows(sV + wg * 64 * 128, 16);
  const Desc desc_q_kmajor(sQ, 16), desc_do_kmajor(sdO, 16);
  const Desc desc_q_mnmajor(sQ, kBlockM * 128), desc_do_mnmajor(sdO, kBlockM * 128);
  const Desc desc_ds(sdS + dq_qb * kBlockN * 128, kBlockN * 128), desc_k_cols(sK + dq_db * kBlockN * 128, kBlockN * 128);

  // Persistent: every tile, the first included, comes from the counter. Thread 0 claims the
  // next tile when it starts one and publishes the answer at the tile's end, in slot (tile
  // count parity) so that a fast thread 0 cannot overwrite the slot that slower threads are
  // still reading (the first claim goes through slot 1, read before the loop's first barrier).
  // Claims happen only in running CTAs and in tile order, so in deterministic mode a tile waits
  // only for lower tiles of running CTAs: the lowest unfinished tile always progresses, even
  // when not every CTA of the grid is resident (a first tile read off blockIdx.x could wait for
  // a CTA that has no SM yet).
  __shared__ int next_tile_slot[2];
  // Padded head dims: the pad columns of every tile, zeroed once (the loads write only the real
  // columns, and nothing else writes these tiles). The first iteration's fence and barrier make
  // the stores visible to the tensor cores. V's pad is never read (dP^T reduces over the real
  // columns) but is zeroed too, so that no GEMM can ever meet unwritten shared memory.
  if constexpr (kHeadDimPadded != kHeadDim) {
    zero_tile_pad_columns_unrolled<kBlockN, kHeadDim, kHeadDimPadded, kThreads>(sK, tid);
    zero_tile_pad_columns_unrolled<kBlockN, kHeadDim, kHeadDimPadded, kThreads>(sV, tid);
#pragma unroll
    for (int stage = 0; stage < 2; ++stage) {
      zero_tile_pad_columns_unrolled<kBlockM, kHeadDim, kHeadDimPadded, kThreads>(sQ + stage * Traits::kTileQBytes, tid);
      zero_tile_pad_columns_unrolled<kBlockM, kHeadDim, kHeadDimPadded, kThreads>(sdO + stage * Traits::kTileQBytes, tid);
    }
  }
  int tile_index = 0;
  if constexpr (kPersistent) {
    if (tid == 0) next_tile_slot[1] = atomicAdd(ws.tile_counter, 1);
    __syncthreads();
    tile_index = next_tile_slot[1];
  }
  if (tile_index < num_tiles) copy_tile_start(tile_index);
  for (int tiles_done = 0; tile_index < num_tiles; ++tiles_done) {
    int claimed = num_tiles;
    if (kPersistent && tid == 0) claimed = atomicAdd(ws.tile_counter, 1);
    const Tile tile = tile_at(tile_index);
    const int n_block = tile.n_block, head_kv = tile.head_kv, b = tile.b;
    const SeqInfo seq(p, b);
    const int n0 = n_block * kBlockN;
    const bool has_keys = n0 < seq.seqlen_k;
    if (!kPersistent && !has_keys) return;  // (d64 with dropout: 96 bytes of spills with this exit, 144 without)
    const int diag = seq.seqlen_k - seq.seqlen_q;
    const BwdGlobal<Element> global(p, seq, b, head_kv, has_keys ? n0 : 0, kBlockM);
    const int iterations = has_keys ? global.iterations : 0;
    // The fused dQ convert: this warp's strips (iteration i's: strips.of(i)).
    [[maybe_unused]] const DqStrips<kHeadDim> strips{b, head_kv * global.group, global.m_begin, global.m_count, kBlockM,
                                                     dq_qb * 64 + kDqStripRows * warp_in_wg, dq_db};

    float acc_dk[kNTilesD][4], acc_dv[kNTilesD][4];  // rows: this thread's two keys
#pragma unroll
    for (int i = 0; i < kNTilesD; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.0f;
    if (iterations > 0) load_stats_plain(global.query_block(p, seq, ws, b, 0), 0);

    for (int it = 0; it < iterations; ++it) {
      const int buf = it & 1;
      const BwdQueryBlock<Element> qb = global.query_block(p, seq, ws, b, it);
      const int head = qb.head, m_block = qb.m_block, m0 = qb.m0;
      // This block's tiles landed and are visible to the async proxy; every thread's GEMMs of
      // iteration it - 1 (which read the other stage and dS^T) were waited for.
      cp_async_wait<0>();
      fence_proxy_async_smem();
      __syncthreads();
      if (it + 1 < iterations) {
        const BwdQueryBlock<Element> next = global.query_block(p, seq, ws, b, it + 1);
        copy_q_block(next, buf ^ 1);
        load_stats_plain(next, buf ^ 1);
      }
      cp_async_commit();
      const float* sLseb = sLse + buf * kBlockM;
      const float* sDotb = sDot + buf * kBlockM;

      // S^T and dP^T for this warpgroup's 64 keys: two commit groups, so that P^T is computed
      // while the tensor cores still work on dP^T.
      float s[kNTilesS][4], dp[kNTilesS][4];
      const uint32_t stage_bytes = buf * Traits::kTileQBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t col_bytes = (kk % 4) * 32;  // k16 slice inside a 128-byte (64-element) row
        const uint32_t a_off = (kk / 4) * kBlockN * 128 + col_bytes;
        const uint32_t b_off = (kk / 4) * kBlockM * 128 + col_bytes;
        Mma::ss(s, desc_k_rows.at(a_off), desc_q_kmajor.at(stage_bytes + b_off),
                /*accumulate=*/kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t col_bytes = (kk % 4) * 32;
        const uint32_t a_off = (kk / 4) * kBlockN * 128 + col_bytes;
        const uint32_t b_off = (kk / 4) * kBlockM * 128 + col_bytes;
        Mma::ss(dp, desc_v_rows.at(a_off), desc_do_kmajor.at(stage_bytes + b_off),
                /*accumulate=*/kk > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(s);

      // P^T, masked. Element (nt, e) of this thread: key n0 + key_local0 + 8 (e / 2), query
      // m0 + 8 nt + 2 t + e % 2.
      const bool need_mask = n0 + kBlockN > seq.seqlen_k || (causal && n0 + kBlockN - 1 > m0 + diag);
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        const float2 lse = *reinterpret_cast<const float2*>(sLseb + nt * 8 + 2 * t);
        const float lse_factor = Traits::kLseAsync ? kLog2e : 1.0f;
        const float lse2[2] = {lse.x * lse_factor, lse.y * lse_factor};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pv = exp2f(s[nt][e] * scale_log2 - lse2[e & 1]);
          if (need_mask) {
            const int key = n0 + key_local0 + 8 * (e >> 1), query = m0 + nt * 8 + 2 * t + (e & 1);
            if (key >= seq.seqlen_k || (causal && key > query + diag)) pv = 0.0f;
          }
          s[nt][e] = pv;
        }
      }
      wgmma_wait<0>();
      fence_operands(dp);

      // dS^T = P^T (dP^T Z - D) and the dropped (P Z)^T, packed as the RS A fragments of the dV
      // and dK GEMMs (k16 slice kt = n8 tiles 2 kt and 2 kt + 1).
      const int64_t batch_head = int64_t{b} * p.heads_q + head;
      uint32_t pa[kNTilesS / 2][4], dsa[kNTilesS / 2][4];
#pragma unroll
      for (int grp = 0; grp < kNTilesS / 4; ++grp) {
        // Dropout bytes of 4 n8 tiles at a time (flash_common.cuh: one Philox call per lane).
        uint32_t drop_bytes[4] = {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
        if (use_dropout) dropout_key_column_bytes(rng, batch_head, m0 + grp * 32, n0 + warp_key0, g, t, drop_bytes);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int nt = 4 * grp + i;
          const float2 dot = *reinterpret_cast<const float2*>(sDotb + nt * 8 + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pv = s[nt][e];
            float dpv = dp[nt][e];
            float p_dropped = pv;
            if (use_dropout) {
              const bool keep = !dropout_byte_dropped(drop_bytes[i], dropout_bwd_byte_pos(e), dropout_top);
              dpv = keep ? dpv * keep_scale : 0.0f;
              p_dropped = keep ? pv * keep_scale : 0.0f;
            }
            s[nt][e] = p_dropped;
            dp[nt][e] = pv * (dpv - ((e & 1) ? dot.y : dot.x));
          }
        }
      }
      pack_rs_a_fragments<Element>(s, pa);
      pack_rs_a_fragments<Element>(dp, dsa);
      // dS^T to shared memory for dQ (rows: keys, columns: queries); the swizzle spreads the 8
      // rows of a store over 8 different 16-byte chunks, so the warp's stores hit 32 banks.
      auto store_ds = [&]() {
#pragma unroll
        for (int kt = 0; kt < kNTilesS / 2; ++kt)
#pragma unroll
          for (int half = 0; half < 2; ++half)    // columns 16 kt + 8 half + 2 t, + 1
#pragma unroll
            for (int r = 0; r < 2; ++r) {         // rows key_local0 + 8 r
              const uint32_t off = swizzled_offset<kBlockN>(key_local0 + 8 * r, kt * 16 + half * 8) + 4 * t;
              *reinterpret_cast<uint32_t*>(sdS_ptr + off) = dsa[kt][2 * half + r];
            }
      };
      // Lab hook FLASHGPT_BWD_DS_STORE_LATE=1: issue the dV and dK GEMMs first and store dS^T
      // while they run (the stores only read the A registers that the GEMMs read).
      if constexpr (!FLASHGPT_BWD_DS_STORE_LATE) store_ds();

      // dV += (P Z)^T dO and dK += dS^T Q: B MN-major, k16 slice kt = 16 query rows (2048
      // bytes); the head dim's 64-element blocks are kBlockM * 128 bytes apart.
      auto issue_dk_gemm = [&]() {
#pragma unroll
        for (int kt = 0; kt < kBlockM / 16; ++kt)
          Mma::rs_trans_b(acc_dk, dsa[kt], desc_q_mnmajor.at(stage_bytes + kt * 16 * 128), 1);
      };
      fence_operands(acc_dv);
      fence_operands(acc_dk);
      wgmma_fence();
#pragma unroll
      for (int kt = 0; kt < kBlockM / 16; ++kt)
        Mma::rs_trans_b(acc_dv, pa[kt], desc_do_mnmajor.at(stage_bytes + kt * 16 * 128), 1);
      if constexpr (!kDkAfterDq) issue_dk_gemm();
      wgmma_commit();

      if constexpr (FLASHGPT_BWD_DS_STORE_LATE) store_ds();

      // dQ sub-tile = dS[queries 64 dq_qb ..][all keys] K[all keys][columns 64 dq_db ..]: A is
      // dS^T read MN-major (column block dq_qb), B is K read MN-major (column block dq_db);
      // k16 slice kt = 16 key rows. Needs every warpgroup's dS^T: fence the generic-proxy
      // stores for the tensor cores, then a barrier.
      fence_proxy_async_smem();
      __syncthreads();
      float dq[8][4];
      wgmma_fence();
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        Mma::ss_trans_ab(dq, desc_ds.at(kt * 16 * 128), desc_k_cols.at(kt * 16 * 128),
                         /*accumulate=*/kt > 0);
      }
      wgmma_commit();
      if constexpr (kDkAfterDq) {
        // dK's GEMM runs on the tensor cores while this thread adds its dQ (as in FlashAttention-3).
        issue_dk_gemm();
        wgmma_commit();
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      fence_operands(acc_dv);
      fence_operands(pa);
      fence_operands(dq);

      if constexpr (kFusedDq && kDqArriveLate) {
        // The fused dQ convert (flash_bwd_kernel.cuh): this warp's arrival at the previous query
        // block's strip, one iteration late, so that the release fence finds that block's
        // atomics completed instead of waiting for them.
        if (it > 0) dq_strip_arrive(strips.counter(p, ws, it - 1), lane);
      }
      int* const semaphore = deterministic ? dq_semaphore(p, ws, b, head, m_block, kBlockM) : nullptr;
      if (deterministic) dq_semaphore_wait(semaphore, n_block);
      // This warpgroup's dQ sub-tile in the accumulator: row block m0 / 64 + dq_qb, column
      // block dq_db; this thread's float4 of n8 tile q is at (q * 128 + tid % 128) * 4. Rows
      // past the sequence add zeros (their dS is zero) into padding that exists. A padded head
      // dim's last column block is a partial sub-tile of its real columns' n8 tiles (64 x 32
      // floats at d32 and d96): the pad columns' tiles are not added.
      float* gdq = ws.dq_accum + ((int64_t(b) * p.heads_q + head) * ws.dq_rows + m0 + dq_qb * 64) * kHeadDim +
                   dq_db * 4096;
#pragma unroll
      for (int q = 0; q < 8; ++q)
        if (kHeadDimPadded == kHeadDim || dq_db * 64 + q * 8 < kHeadDim)
          atomicAdd(reinterpret_cast<float4*>(gdq + (q * 128 + tid % 128) * 4),
                    make_float4(dq[q][0] * scale, dq[q][1] * scale, dq[q][2] * scale, dq[q][3] * scale));
      if (deterministic) dq_semaphore_release(semaphore);
      // dK's GEMM (still reading this stage's Q) is done before the next iteration's barrier.
      wgmma_wait<0>();
      fence_operands(acc_dk);
      fence_operands(dsa);
      // (FLASHGPT_BWD_DQ_ARRIVE_LATE=0: the arrival right after this block's atomics.)
      if constexpr (kFusedDq && !kDqArriveLate) dq_strip_arrive(strips.counter(p, ws, it), lane);
    }
    // The fused dQ convert: the arrival at the last query block's strip, then the claims, whose
    // answers are read after the epilogue.
    [[maybe_unused]] bool won = false;
    if constexpr (kFusedDq) {
      if (kDqArriveLate && iterations > 0) dq_strip_arrive(strips.counter(p, ws, iterations - 1), lane);
      won = dq_strips_claim(p, ws, strips, lane, iterations, 0);
    }
    // Every warpgroup's GEMMs of this tile are done (each thread waited for its own): K, V and
    // both stages are free for the next tile's copies, which run while dK and dV go out.
    cp_async_wait<0>();
    if (kPersistent && tid == 0) next_tile_slot[tiles_done & 1] = claimed;
    __syncthreads();
    const int next_index = kPersistent ? next_tile_slot[tiles_done & 1] : num_tiles;
    if (next_index < num_tiles) copy_tile_start(next_index);

    if (has_keys) {
      // dK = scale dS^T Q and dV, through their own staging buffers (the previous tile's
      // copy-out read them before the barrier above), written by rows.
      using Staged = typename Traits::Staged;
      Element* const s_dk = reinterpret_cast<Element*>(sDot + 2 * kBlockM);
      Element* const s_dv = s_dk + kBlockN * Staged::kStride;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int key_local = key_local0 + 8 * r;
#pragma unroll
        for (int i = 0; i < kHeadDim / 8; ++i) {  // the real columns' n8 tiles (padded: the pad's are dropped)
          Staged::put(s_dk, key_local, i * 8 + 2 * t,
                      Ops::pack(acc_dk[i][2 * r] * scale, acc_dk[i][2 * r + 1] * scale));
          Staged::put(s_dv, key_local, i * 8 + 2 * t, Ops::pack(acc_dv[i][2 * r], acc_dv[i][2 * r + 1]));
        }
      }
      __syncthreads();
      Staged::template copy_out<kThreads>(s_dk, global.dk, p.dk_row_stride, global.valid_k, tid);
      Staged::template copy_out<kThreads>(s_dv, global.dv, p.dv_row_stride, global.valid_k, tid);
    }
    // The fused dQ convert: the completed strips among this warp's (claimed above).
    if constexpr (kFusedDq) dq_strips_convert<Element>(won, p, ws, seq, strips, lane, iterations);
    tile_index = next_index;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma: the launcher never picks this kernel there
#endif
}

}  // namespace flashgpt::attn

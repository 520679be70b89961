// The warp-specialized Hopper backward main kernel (sm_90a): the algorithm and contract of
// flash_bwd_wgmma_kernel.cuh (same five GEMMs, descriptors and fragment layouts, same
// preprocess, workspace, fragment-order dQ accumulator, convert kernel or fused convert, Philox
// dropout mask and deterministic mode), fed by the copy engine instead of cp.async from every thread. Dense
// batches only; the entry point keeps the cp.async wgmma kernel for variable-length batches.
//
// Persistent: one CTA per SM takes (128-key block, kv head, batch entry) tiles, every one of
// them (the first included) claimed from the counter in the workspace, in tile order, by the
// producer when the consumers have released the previous tile's K and V.
//
// One CTA: a producer warpgroup and two consumer warpgroups.
//   - Producer (its first warp works; the warpgroup gives its registers away with setmaxnreg):
//     per tile, K and V (one TMA box per 64-column block) into their one buffer, completing on
//     the "K/V full" mbarrier, after waiting on "K/V empty"; the tile's index goes to shared
//     memory before the barrier's arrival. Then every query block of the tile into a ring of
//     kStages stages: Q and dO by TMA (128-byte swizzle: the layout the descriptors read), the
//     block's LSE (times log2 e, +inf past the sequence) and D = rowsum(dO * O) (0 past the
//     sequence) by plain loads of the warp's 32 lanes. Lane 0 arrives on the stage's "full"
//     mbarrier with the copies' transaction bytes before issuing them, then every lane arrives
//     after its loads (33 arrivals), so each lane's stores are released by its own arrival.
//   - Consumers (setmaxnreg raises their registers): warpgroup wg owns keys 64 wg .. 64 wg + 63
//     of the block, as in the cp.async kernel: S^T = K Q^T and dP^T = V dO^T (SS), P^T from LSE,
//     dS^T, dV += (P Z)^T dO and dK += dS^T Q (RS), dQ = dS K (SS through shared memory, 64 x 64
//     sub-tile per warpgroup, float4 atomics into the fragment-order accumulator). A consumer
//     warp releases a stage by arriving on its "empty" mbarrier once its GEMMs reading the
//     stage have completed, and K/V at the end of the tile.
//   - No CTA-wide barrier after the barriers' initialization. The consumers share only dS^T
//     (both warpgroups' keys make dQ) and the staging of dK and dV: named barriers of their 256
//     threads. dS^T is double-buffered where shared memory allows (d64): one barrier per query
//     block; at d128 a second one keeps the other warpgroup's dQ GEMM of the previous block
//     from reading a dS^T being overwritten. The deterministic mode's semaphore wait and release
//     use the consumers' barrier too.
//   - Rows past the sequence end are masked explicitly (P = 0 and dS = 0 there), whatever the
//     zero-filled TMA rows hold.
//   - kDqWarp (FLASHGPT_ATTN_BWD_DQ_WARP=1; neither the deterministic mode nor the fused dQ
//     convert): the consumers store their scaled dQ sub-tiles in fragment order into a staging
//     buffer (the two sub-tiles of a query block are the accumulator's 32 contiguous KB, and
//     the buffer holds them in that order), fence them for the async proxy and arrive on the
//     buffer's "dQ full" mbarrier, ctid 0 with the query block's index in the accumulator in
//     the buffer's slot (-1: no more blocks; an index, not an address: fewer live registers).
//     The first lane of the producer warpgroup's second warp waits on it, adds each sub-tile
//     with one bulk reduce-add (cp.reduce.async.bulk .add.f32), waits until the copy engine has
//     read the buffer and arrives on "dQ empty", which the consumers wait on before refilling
//     it. The buffers live in the staging of dK and dV (kDqBuffers of them: one at d64, two at
//     d128), so the consumers wait for every buffer's release before the epilogue; the next
//     tile's first dQ store comes after a consumers' barrier, so after the copy-out's reads.
//   - kDqSplitKeys (d64 with 64-query blocks, the d64 variant; always with kDqWarp): a query
//     block's dQ is one 64 x 64 sub-tile, so each warpgroup multiplies only its own 64 keys'
//     dS (its own dS^T rows: a barrier of its 128 threads, none between the warpgroups in the
//     loop) by their K. Two dQ buffers of their own (not over the staging of dK and dV);
//     buffer i is summed by warpgroup i: the other warpgroup stores its partial once the dQ
//     warp has released the buffer and arrives on the buffer's "partial" mbarrier, warpgroup i
//     waits on it, adds its own partial in place (each thread the float4s it stored into) and
//     arrives on "dQ full" (its four warps), with the slot, as above.
#pragma once

#include "flash_bwd_kernel.cuh"
#include "flash_common.cuh"
#include "hopper_common.cuh"
#include "pipeline_parity.h"
#include "wgmma_common.cuh"

namespace flashgpt::attn {

template <int kHeadDim_, int kBlockM_, int kStages_, int kDsBuffers_, typename Element_>
struct BwdTmaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // queries per stage
  static constexpr int kStages = kStages_;
  static constexpr int kDsBuffers = kDsBuffers_;
  static constexpr int kConsumers = 2;
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kBlockN = 64 * kConsumers;  // keys per tile
  static constexpr int kNTilesS = kBlockM / 8;
  static constexpr int kNTilesD = kHeadDim / 8;
  static constexpr int kColBlocks = kHeadDim / 64;
  static constexpr int kDqQueryBlocks = kBlockM / 64;
  static_assert(sizeof(Element) == 2, "16-bit elements only");
  static_assert(kHeadDim % 64 == 0 && kBlockM % 64 == 0, "tiles are made of 64-element swizzle blocks");
  static_assert(kBlockM <= 256, "a TMA box has at most 256 rows");
  static_assert(kNTilesS % 4 == 0, "dropout shares Philox calls over groups of 4 n8 tiles (32 queries)");
  // kDqSplitKeys (d64 with 64-query blocks): a query block's dQ is one 64 x 64 sub-tile, which the
  // warpgroups split by keys (each multiplies its own 64 keys' dS by their K: no warpgroup reads
  // the other's dS^T), and the two partial sums meet in the dQ warp's staging. Otherwise one
  // 64 x 64 sub-tile of the block per warpgroup, over all 128 keys.
  static constexpr bool kDqSplitKeys = kDqQueryBlocks * kColBlocks == 1;
  static_assert(kDqSplitKeys || kDqQueryBlocks * kColBlocks == kConsumers,
                "one 64 x 64 dQ sub-tile per consumer warpgroup, or one split between them");
  static_assert(kDsBuffers == 1 || kDsBuffers == 2, "dS^T is single- or double-buffered");
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kTileDsBytes = kBlockN * kBlockM * 2;
  using Staged = StagedTile<kBlockN, kHeadDim, Element>;  // dK and dV on their way out
  static constexpr size_t kStagedBytes = (Staged::kBytes + 127) / 128 * 128;
  // The dQ warp's staging (kDqWarp): a query block's fp32 dQ. Without kDqSplitKeys, as many
  // buffers (at most two) as the staging of dK and dV holds, over it; with it, two buffers of
  // their own after it (the epilogue then never waits for the dQ warp), the first summed by
  // warpgroup 0, the second by warpgroup 1.
  static constexpr int kDqStageBytes = kBlockM * kHeadDim * 4;
  static constexpr int kDqBuffers = kDqSplitKeys ? 2 : 2 * kStagedBytes / kDqStageBytes >= 2 ? 2 : 1;
  static constexpr bool kDqOwnStage = kDqSplitKeys;
  static_assert(kDqOwnStage || 2 * kStagedBytes >= size_t{kDqBuffers} * kDqStageBytes,
                "the dQ staging fits in dK's and dV's");
  static_assert(!kDqSplitKeys || kDqBuffers == kConsumers, "each warpgroup sums the partials of one buffer");
  // Barriers: K/V full, K/V empty, per stage "full" and "empty", per dQ buffer "full" and
  // "empty" (kDqSplitKeys: and "partial", the other warpgroup's partial sum stored); then the
  // tile slot (16 bytes) and the dQ buffers' slots (4 bytes each).
  static constexpr int kDqBarriers = kDqSplitKeys ? 3 : 2;
  static constexpr int kBarriers = 2 + 2 * kStages + kDqBarriers * kDqBuffers;
  static constexpr size_t kSmemBytes = 1024 + 2 * size_t{kTileKVBytes} + 2 * size_t{kStages} * kTileQBytes +
                                       size_t{kDsBuffers} * kTileDsBytes + 2 * size_t{kStages} * kBlockM * 4 +
                                       2 * kStagedBytes + (kDqOwnStage ? size_t{kDqBuffers} * kDqStageBytes : 0) +
                                       8 * kBarriers + 16 + 4 * kDqBuffers;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block can have");
  // Registers after reallocation: __launch_bounds__(384, 1) caps the entry at 168 a thread
  // (65536 / 384 rounded down to 8); the producer keeps 24, the consumers take the rest.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <= 65536 / kThreads / 8 * 8 * kThreads,
                "the reallocated registers exceed the CTA's share");
};

#ifdef FLASHGPT_WGMMA_AVAILABLE
// (The dQ warp's copies.) A bulk reduce-add of `bytes` (a multiple of 16; both addresses
// 16-byte aligned) of fp32 from shared memory into global memory, in the thread's current bulk
// async-group; then the group's commit and the waits: until at most kPending groups are still
// reading shared memory (.read) or still writing global memory.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
template <int kPending>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

// Named barriers of the 256 consumer threads (0 is __syncthreads, unused after the setup).
inline constexpr int kBwdTmaBarDsReady = 1;  // every warpgroup's dS^T of this query block is stored
inline constexpr int kBwdTmaBarDsFree = 2;   // (single dS^T buffer) the previous block's dQ GEMMs completed
inline constexpr int kBwdTmaBarEpilogue = 3;  // staging of dK and dV
inline constexpr int kBwdTmaBarSemaphore = 4;  // deterministic mode
// (kDqSplitKeys) warpgroup wg's own dS^T of this query block is stored: 5 + wg, its 128 threads.
inline constexpr int kBwdTmaBarDsReadyWg = 5;

// kFusedDq: the fused dQ convert (flash_bwd_kernel.cuh; ws.dq_arrivals set). kDqWarp: dQ
// added by the dQ warp's bulk reduce-adds (not with kFusedDq, nor in the deterministic mode:
// the launcher never passes `deterministic` to it).
template <typename Traits, bool kDropout, bool kFusedDq, bool kDqWarp = false>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_bwd_tma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_do,
                         const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
                         const KernelParams p, float scale, BwdWorkspace ws, bool deterministic) {
#ifdef FLASHGPT_WGMMA_AVAILABLE
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using Mma = WgmmaOps<Element>;
  using Staged = typename Traits::Staged;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages, kNTilesS = Traits::kNTilesS, kNTilesD = Traits::kNTilesD;
  constexpr int kCThreads = Traits::kConsumerThreads;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr uint32_t kSwizzleAtom = 1024;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sK = (raw + 1023u) & ~1023u;
  const uint32_t sV = sK + Traits::kTileKVBytes;
  const uint32_t sQ = sV + Traits::kTileKVBytes;              // [kStages]
  const uint32_t sdO = sQ + kStages * Traits::kTileQBytes;    // [kStages]
  const uint32_t sdS = sdO + kStages * Traits::kTileQBytes;   // dS^T [kDsBuffers]
  const uint32_t sStats = sdS + Traits::kDsBuffers * Traits::kTileDsBytes;
  float* const sLse = reinterpret_cast<float*>(smem_raw + (sStats - raw));  // [kStages][kBlockM]
  float* const sDot = sLse + kStages * kBlockM;                             // [kStages][kBlockM]
  const uint32_t sStaged = sStats + 2 * kStages * kBlockM * 4;
  Element* const s_dk = reinterpret_cast<Element*>(smem_raw + (sStaged - raw));
  Element* const s_dv = reinterpret_cast<Element*>(smem_raw + (sStaged + Traits::kStagedBytes - raw));
  // kDqOwnStage: the dQ buffers after the staging of dK and dV; otherwise over it.
  const uint32_t sDqStage = sStaged + (Traits::kDqOwnStage ? 2 * uint32_t(Traits::kStagedBytes) : 0u);
  const uint32_t bars = sStaged + 2 * uint32_t(Traits::kStagedBytes) +
                        (Traits::kDqOwnStage ? uint32_t(Traits::kDqBuffers * Traits::kDqStageBytes) : 0u);
  const uint32_t bar_kv_full = bars, bar_kv_empty = bars + 8;
  auto bar_full = [&](int s) { return bars + 16u + 8u * uint32_t(s); };
  auto bar_empty = [&](int s) { return bars + 16u + 8u * uint32_t(kStages + s); };
  volatile int* const tile_slot = reinterpret_cast<volatile int*>(smem_raw + (bars + 8 * Traits::kBarriers - raw));
  static_assert(!(kDqWarp && kFusedDq), "the dQ warp does not make the fused convert's arrivals");
  constexpr bool kSplit = Traits::kDqSplitKeys;
  static_assert(!kSplit || kDqWarp, "split dQ partial sums meet only in the dQ warp's staging");
  constexpr int kDqBuffers = Traits::kDqBuffers;
  auto bar_dq_full = [&](int i) { return bars + 16u + 8u * uint32_t(2 * kStages + i); };
  auto bar_dq_empty = [&](int i) { return bars + 16u + 8u * uint32_t(2 * kStages + kDqBuffers + i); };
  auto bar_dq_partial = [&](int i) { return bars + 16u + 8u * uint32_t(2 * kStages + 2 * kDqBuffers + i); };
  // [kDqBuffers]: the query block of the accumulator (kBlockM x kHeadDim floats), -1 to stop.
  volatile int* const dq_slot = reinterpret_cast<volatile int*>(smem_raw + (bars + 8 * Traits::kBarriers + 16 - raw));

  const int tid = threadIdx.x;
  const bool causal = p.mask == Mask::causal;
  constexpr bool kDqArriveLate = FLASHGPT_BWD_DQ_ARRIVE_LATE != 0;
  // Tiles: (key block, kv head, batch entry), key block fastest (the cp.async kernel's order,
  // which the deterministic mode's semaphores rely on: lower key blocks have lower indices).
  const int n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int num_tiles = n_blocks * p.heads_kv * p.batch;
  struct Tile {
    int n_block, head_kv, b;
  };
  auto tile_at = [&](int index) {
    return Tile{index % n_blocks, index / n_blocks % p.heads_kv, index / n_blocks / p.heads_kv};
  };

  if (tid == 0) {
    mbarrier_init(bar_kv_full, 1);
    mbarrier_init(bar_kv_empty, Traits::kConsumerThreads / 32);  // one arrival per consumer warp
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(bar_full(s), 33);  // lane 0 with the copies' bytes, then every lane with its LSE and D
      mbarrier_init(bar_empty(s), Traits::kConsumerThreads / 32);
    }
    if constexpr (kDqWarp) {
      for (int i = 0; i < kDqBuffers; ++i) {
        // One arrival per consumer warp (kSplit: per warp of the summing warpgroup).
        mbarrier_init(bar_dq_full(i), dq_handoff_full_arrivals(Traits::kConsumerThreads, kSplit));
        mbarrier_init(bar_dq_empty(i), kDqHandoffEmptyArrivals);  // the dQ warp's lane 0
        // one arrival per warp of the other warpgroup
        if (kSplit) mbarrier_init(bar_dq_partial(i), kDqHandoffPartialArrivals);
      }
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (tid < 128) {
    // ---- Producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (kDqWarp && tid == 32) {
      // ---- dQ warp ---- (its first lane; the others have nothing to do): one bulk reduce-add
      // per consumer warpgroup's sub-tile of a filled buffer, then the buffer back once the
      // copy engine has read it (the slot too: the consumers refill both after that arrival).
      PipelineState<kDqBuffers> dq_st;
      for (;;) {
        mbarrier_wait(bar_dq_full(dq_st.index), dq_st.phase);
        const int block = dq_slot[dq_st.index];
        if (block < 0) break;
        float* const gdq = ws.dq_accum + int64_t{block} * (kBlockM * kHeadDim);
        const uint32_t src = sDqStage + uint32_t(dq_st.index) * Traits::kDqStageBytes;
        constexpr int kSubTileBytes = Traits::kDqStageBytes / Traits::kConsumers;
#pragma unroll
        for (int w = 0; w < Traits::kConsumers; ++w)
          bulk_reduce_add_f32(gdq + w * (kSubTileBytes / 4), src + w * kSubTileBytes, kSubTileBytes);
        bulk_commit_group();
        bulk_wait_group_read<0>();
        mbarrier_arrive(bar_dq_empty(dq_st.index));
        dq_st.advance();
      }
      bulk_wait_group<0>();  // every add performed before the CTA's exit
    }
    if (tid < 32) {
      const int lane = tid;
      if (lane == 0) {
        prefetch_tensor_map(&tm_q);
        prefetch_tensor_map(&tm_do);
        prefetch_tensor_map(&tm_k);
        prefetch_tensor_map(&tm_v);
      }
      PipelineState<kStages> st;
      uint32_t kv_phase = 0;
      for (;;) {
        // The consumers are done with the previous tile's K and V (a fresh barrier's "previous
        // phase" counts as completed): claim the next tile, publish it, load its K and V.
        mbarrier_wait(bar_kv_empty, kv_phase ^ 1u);
        int tile_index = 0;
        if (lane == 0) tile_index = atomicAdd(ws.tile_counter, 1);
        tile_index = __shfl_sync(0xffffffffu, tile_index, 0);
        const bool valid = tile_index < num_tiles;
        const Tile tile = tile_at(valid ? tile_index : 0);
        if (lane == 0) {
          *tile_slot = tile_index;  // released by the arrival below
          if (valid) {
            mbarrier_arrive_expect_tx(bar_kv_full, 2 * Traits::kTileKVBytes);
#pragma unroll
            for (int cb = 0; cb < Traits::kColBlocks; ++cb) {
              tma_load_4d(sK + cb * kBlockN * 128, &tm_k, bar_kv_full, cb * 64, tile.n_block * kBlockN, tile.head_kv,
                          tile.b);
              tma_load_4d(sV + cb * kBlockN * 128, &tm_v, bar_kv_full, cb * 64, tile.n_block * kBlockN, tile.head_kv,
                          tile.b);
            }
          } else {
            mbarrier_arrive(bar_kv_full);
          }
        }
        if (!valid) break;
        kv_phase ^= 1u;
        const SeqInfo seq(p, tile.b);
        const BwdGlobal<Element> global(p, seq, tile.b, tile.head_kv, tile.n_block * kBlockN, kBlockM);
        for (int it = 0; it < global.iterations; ++it) {
          const BwdQueryBlock<Element> qb = global.query_block(p, seq, ws, tile.b, it);
          const uint32_t bar = bar_full(st.index);
          mbarrier_wait(bar_empty(st.index), st.phase ^ 1u);
          // The copies first (their latency then covers the plain loads below).
          if (lane == 0) {
            mbarrier_arrive_expect_tx(bar, 2 * Traits::kTileQBytes);
#pragma unroll
            for (int cb = 0; cb < Traits::kColBlocks; ++cb) {
              const uint32_t off = st.index * Traits::kTileQBytes + cb * kBlockM * 128;
              tma_load_4d(sQ + off, &tm_q, bar, cb * 64, qb.m0, qb.head, tile.b);
              tma_load_4d(sdO + off, &tm_do, bar, cb * 64, qb.m0, qb.head, tile.b);
            }
          }
          load_lse_dot_rows<kBlockM, 32>(sLse + st.index * kBlockM, sDot + st.index * kBlockM, qb.lse, qb.dot,
                                         qb.valid_q, lane);
          mbarrier_arrive(bar);
          st.advance();
        }
      }
    }
    return;
  }

  // ---- Consumers ----
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int ctid = tid - 128;  // 0..255
  const int lane = ctid % 32, g = lane / 4, t = lane % 4;
  const int wg = ctid / 128, warp_in_wg = (ctid / 32) % 4;
  const float scale_log2 = scale * kLog2e;
  [[maybe_unused]] uint32_t dropout_top = 0;
  [[maybe_unused]] DropoutRng rng;
  [[maybe_unused]] float keep_scale = 1.0f;
  if constexpr (kDropout) {
    const uint32_t threshold = dropout_threshold(p.dropout_p);
    dropout_top = dropout_top_threshold(threshold);
    rng = p.rng_device != nullptr ? *p.rng_device : p.rng;  // a graph replay's per-step stream
    keep_scale = static_cast<float>(dropout_keep_scale(threshold));
  }
  const int warp_key0 = wg * 64 + warp_in_wg * 16;  // this warp's m16 key tile
  const int key_local0 = warp_key0 + g;             // this thread's keys: key_local0 and + 8
  // The dQ sub-tile of this warpgroup: its query block and column block (kSplit: the only one,
  // over this warpgroup's keys, dq_key_bytes into dS^T's and K's rows).
  const int dq_qb = kSplit ? 0 : wg % Traits::kDqQueryBlocks, dq_db = kSplit ? 0 : wg / Traits::kDqQueryBlocks;
  const uint32_t dq_key_bytes = kSplit ? uint32_t(wg) * 64 * 128 : 0u;
  // Descriptors built once and advanced by constant offsets (the cp.async kernel's
  // FLASHGPT_BWD_DESC_PRECOMPUTE=1): K-major K and V rows of this warpgroup, stage 0 of Q and dO;
  // MN-major Q and dO (B of dK and dV), dS^T and K (A and B of dQ). (One base descriptor plus
  // offsets at each use, and descriptors built at each use, spilled more in ptxas:
  // docs/archive/attention_gpu_notes.md, v16.)
  const uint64_t desc_k_rows = wgmma_desc_sw128(sK + wg * 64 * 128, 16, kSwizzleAtom);
  const uint64_t desc_v_rows = wgmma_desc_sw128(sV + wg * 64 * 128, 16, kSwizzleAtom);
  const uint64_t desc_q_kmajor = wgmma_desc_sw128(sQ, 16, kSwizzleAtom);
  const uint64_t desc_do_kmajor = wgmma_desc_sw128(sdO, 16, kSwizzleAtom);
  const uint64_t desc_q_mnmajor = wgmma_desc_sw128(sQ, kBlockM * 128, kSwizzleAtom);
  const uint64_t desc_do_mnmajor = wgmma_desc_sw128(sdO, kBlockM * 128, kSwizzleAtom);
  const uint64_t desc_ds =
      wgmma_desc_sw128(sdS + dq_qb * kBlockN * 128 + dq_key_bytes, kBlockN * 128, kSwizzleAtom);
  const uint64_t desc_k_cols =
      wgmma_desc_sw128(sK + dq_db * kBlockN * 128 + dq_key_bytes, kBlockN * 128, kSwizzleAtom);
  unsigned char* const sdS_ptr = smem_raw + (sdS - raw);
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(bar);
  };

  PipelineState<kStages> st;
  // kDqWarp: the dQ buffers filled so far (one counter: fewer live registers than an index and a
  // parity); the next fill's buffer, and its "empty" barrier's parity to wait for.
  [[maybe_unused]] uint32_t dq_fills = 0;
  auto dq_buf = [&](uint32_t fills) { return dq_handoff_buffer<kDqBuffers>(fills); };
  auto dq_free_parity = [&](uint32_t fills) { return dq_handoff_free_parity<kDqBuffers>(fills); };
  uint32_t kv_phase = 0;
  for (;;) {
    mbarrier_wait(bar_kv_full, kv_phase);
    kv_phase ^= 1u;
    const int tile_index = *tile_slot;
    if (tile_index >= num_tiles) {
      if constexpr (kDqWarp) {
        // The dQ warp's stop: -1 in the next buffer's slot (kSplit: by the buffer's summing
        // warpgroup, the only one whose warps arrive on its "full").
        const int buf = dq_buf(dq_fills);
        if (!kSplit || buf == wg) {
          mbarrier_wait(bar_dq_empty(buf), dq_free_parity(dq_fills));
          if ((ctid & 127) == 0) dq_slot[buf] = -1;
          release(bar_dq_full(buf));
        }
      }
      break;
    }
    const Tile tile = tile_at(tile_index);
    const int n_block = tile.n_block, b = tile.b;
    const SeqInfo seq(p, b);
    const int n0 = n_block * kBlockN;
    const int diag = seq.seqlen_k - seq.seqlen_q;
    const BwdGlobal<Element> global(p, seq, b, tile.head_kv, n0, kBlockM);
    const int iterations = global.iterations;
    // The fused dQ convert: this warp's strips (iteration i's: strips.of(i)).
    [[maybe_unused]] const DqStrips<kHeadDim> strips{b, tile.head_kv * global.group,
                                                     global.m_begin, global.m_count, kBlockM,
                                                     dq_qb * 64 + kDqStripRows * warp_in_wg, dq_db};

    float acc_dk[kNTilesD][4], acc_dv[kNTilesD][4];  // rows: this thread's two keys
#pragma unroll
    for (int i = 0; i < kNTilesD; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.0f;

    for (int it = 0; it < iterations; ++it) {
      const int head = tile.head_kv * global.group + it / global.m_count;
      const int m_block = global.m_begin + it % global.m_count;
      const int m0 = m_block * kBlockM;
      const uint32_t stage_bytes = st.index * Traits::kTileQBytes;
      const float* const sLseb = sLse + st.index * kBlockM;
      const float* const sDotb = sDot + st.index * kBlockM;
      mbarrier_wait(bar_full(st.index), st.phase);

      // S^T and dP^T for this warpgroup's 64 keys: two commit groups, so that P^T is computed
      // while the tensor cores still work on dP^T.
      float s[kNTilesS][4], dp[kNTilesS][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t col_bytes = (kk % 4) * 32;
        const uint32_t a_off = (kk / 4) * kBlockN * 128 + col_bytes;
        const uint32_t b_off = (kk / 4) * kBlockM * 128 + col_bytes;
        Mma::ss(s, wgmma_desc_advance(desc_k_rows, a_off), wgmma_desc_advance(desc_q_kmajor, stage_bytes + b_off),
                /*accumulate=*/kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t col_bytes = (kk % 4) * 32;
        const uint32_t a_off = (kk / 4) * kBlockN * 128 + col_bytes;
        const uint32_t b_off = (kk / 4) * kBlockM * 128 + col_bytes;
        Mma::ss(dp, wgmma_desc_advance(desc_v_rows, a_off), wgmma_desc_advance(desc_do_kmajor, stage_bytes + b_off),
                /*accumulate=*/kk > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(s);

      // P^T, masked explicitly: keys past seqlen_k, queries past seqlen_q (whatever the
      // zero-filled rows of Q hold) and the causal mask. Element (nt, e) of this thread: key
      // n0 + key_local0 + 8 (e / 2), query m0 + 8 nt + 2 t + e % 2.
      const bool need_mask = n0 + kBlockN > seq.seqlen_k || m0 + kBlockM > seq.seqlen_q ||
                             (causal && n0 + kBlockN - 1 > m0 + diag);
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
        const float2 lse = *reinterpret_cast<const float2*>(sLseb + nt * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pv = exp2f(s[nt][e] * scale_log2 - ((e & 1) ? lse.y : lse.x));
          if (need_mask) {
            const int key = n0 + key_local0 + 8 * (e >> 1), query = m0 + nt * 8 + 2 * t + (e & 1);
            if (key >= seq.seqlen_k || query >= seq.seqlen_q || (causal && key > query + diag)) pv = 0.0f;
          }
          s[nt][e] = pv;
        }
      }
      wgmma_wait<0>();
      fence_operands(dp);

      // dS^T = P^T (dP^T Z - D) (zero wherever P was masked) and the dropped (P Z)^T, packed as
      // the RS A fragments of the dV and dK GEMMs.
      const int64_t batch_head = int64_t{b} * p.heads_q + head;
      uint32_t pa[kNTilesS / 2][4], dsa[kNTilesS / 2][4];
#pragma unroll
      for (int grp = 0; grp < kNTilesS / 4; ++grp) {
        uint32_t drop_bytes[4] = {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
        if constexpr (kDropout)
          dropout_key_column_bytes(rng, batch_head, m0 + grp * 32, n0 + warp_key0, g, t, drop_bytes);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int nt = 4 * grp + i;
          const float2 dot = *reinterpret_cast<const float2*>(sDotb + nt * 8 + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pv = s[nt][e];
            float dpv = dp[nt][e];
            float p_dropped = pv;
            if constexpr (kDropout) {
              const bool keep = !dropout_byte_dropped(drop_bytes[i], dropout_bwd_byte_pos(e), dropout_top);
              dpv = keep ? dpv * keep_scale : 0.0f;
              p_dropped = keep ? pv * keep_scale : 0.0f;
            }
            float ds = pv * (dpv - ((e & 1) ? dot.y : dot.x));
            if (need_mask && pv == 0.0f) ds = 0.0f;
            s[nt][e] = p_dropped;
            dp[nt][e] = ds;
          }
        }
      }
      pack_rs_a_fragments<Element>(s, pa);
      pack_rs_a_fragments<Element>(dp, dsa);

      // dS^T to shared memory (rows: keys, columns: queries), buffer it % kDsBuffers. With one
      // buffer, every warpgroup's dQ GEMM of the previous query block must have completed first
      // (each thread waited for its own before this barrier); across tiles the epilogue's barrier
      // orders them.
      const int ds_buf = Traits::kDsBuffers == 1 ? 0 : (it & 1);
      if constexpr (Traits::kDsBuffers == 1) {
        if (it > 0) named_barrier_sync(kBwdTmaBarDsFree, kCThreads);
      }
      unsigned char* const sdS_buf = sdS_ptr + ds_buf * Traits::kTileDsBytes;
#pragma unroll
      for (int kt = 0; kt < kNTilesS / 2; ++kt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint32_t off = swizzled_offset<kBlockN>(key_local0 + 8 * r, kt * 16 + half * 8) + 4 * t;
            *reinterpret_cast<uint32_t*>(sdS_buf + off) = dsa[kt][2 * half + r];
          }

      // dV += (P Z)^T dO (B MN-major, k16 slice kt = 16 query rows).
      fence_operands(acc_dv);
      fence_operands(acc_dk);
      wgmma_fence();
#pragma unroll
      for (int kt = 0; kt < kBlockM / 16; ++kt)
        Mma::rs_trans_b(acc_dv, pa[kt], wgmma_desc_advance(desc_do_mnmajor, stage_bytes + kt * 16 * 128), 1);
      wgmma_commit();

      // dQ sub-tile = dS K: needs both warpgroups' dS^T (generic-proxy stores fenced for the
      // tensor cores, then the consumers' barrier); kSplit: this warpgroup's own keys only, so
      // its own dS^T and a barrier of its 128 threads.
      fence_proxy_async_smem();
      if constexpr (kSplit)
        named_barrier_sync(kBwdTmaBarDsReadyWg + wg, 128);
      else
        named_barrier_sync(kBwdTmaBarDsReady, kCThreads);
      float dq[8][4];
      const uint32_t ds_off = ds_buf * Traits::kTileDsBytes;
      constexpr int kDqKSteps = (kSplit ? 64 : kBlockN) / 16;
      wgmma_fence();
#pragma unroll
      for (int kt = 0; kt < kDqKSteps; ++kt)
        Mma::ss_trans_ab(dq, wgmma_desc_advance(desc_ds, ds_off + kt * 16 * 128),
                         wgmma_desc_advance(desc_k_cols, kt * 16 * 128), /*accumulate=*/kt > 0);
      wgmma_commit();
      // dK += dS^T Q runs on the tensor cores while this thread adds its dQ.
#pragma unroll
      for (int kt = 0; kt < kBlockM / 16; ++kt)
        Mma::rs_trans_b(acc_dk, dsa[kt], wgmma_desc_advance(desc_q_mnmajor, stage_bytes + kt * 16 * 128), 1);
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(acc_dv);
      fence_operands(pa);
      fence_operands(dq);

      // Deterministic mode: the key blocks of this query block add in key-block order (the
      // consumers' version of dq_semaphore_wait / _release: the producer never takes part).
      if constexpr (kFusedDq && kDqArriveLate) {
        // The fused dQ convert (flash_bwd_kernel.cuh): this warp's arrival at the previous query
        // block's strip, one iteration late, so that the release fence finds that block's
        // atomics completed instead of waiting for them.
        if (it > 0) dq_strip_arrive(strips.counter(p, ws, it - 1), lane);
      }
      if constexpr (kSplit) {
        // The two partial sums of the block's one sub-tile, in the accumulator's order
        // (consecutive threads, consecutive float4: no bank conflicts), in buffer buf: the other
        // warpgroup stores its own once the dQ warp has read the buffer and arrives on
        // "partial"; warpgroup buf adds its own to it (each thread reads and writes the same
        // float4s), then hands the buffer to the dQ warp as below.
        const int buf = dq_buf(dq_fills);
        float4* const sdq = reinterpret_cast<float4*>(smem_raw + (sDqStage - raw) + buf * Traits::kDqStageBytes);
        if (buf == wg) {
          mbarrier_wait(bar_dq_partial(buf), dq_handoff_partial_parity<kDqBuffers>(dq_fills));
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float4 o = sdq[q * 128 + ctid % 128];
            sdq[q * 128 + ctid % 128] = make_float4(o.x + dq[q][0] * scale, o.y + dq[q][1] * scale,
                                                    o.z + dq[q][2] * scale, o.w + dq[q][3] * scale);
          }
          if ((ctid & 127) == 0) dq_slot[buf] = (b * p.heads_q + head) * (ws.dq_rows / kBlockM) + m_block;
          fence_proxy_async_smem();  // this thread's stores, for the copy engine
          release(bar_dq_full(buf));
        } else {
          mbarrier_wait(bar_dq_empty(buf), dq_free_parity(dq_fills));
#pragma unroll
          for (int q = 0; q < 8; ++q)
            sdq[q * 128 + ctid % 128] =
                make_float4(dq[q][0] * scale, dq[q][1] * scale, dq[q][2] * scale, dq[q][3] * scale);
          release(bar_dq_partial(buf));
        }
        ++dq_fills;
      } else if constexpr (kDqWarp) {
        // The sub-tile into this warpgroup's half of the buffer, in the accumulator's order
        // (consecutive threads, consecutive float4: no bank conflicts), for the dQ warp.
        const int buf = dq_buf(dq_fills);
        mbarrier_wait(bar_dq_empty(buf), dq_free_parity(dq_fills));
        float4* const sdq =
            reinterpret_cast<float4*>(smem_raw + (sDqStage - raw) + buf * Traits::kDqStageBytes) + wg * 1024;
#pragma unroll
        for (int q = 0; q < 8; ++q)
          sdq[q * 128 + ctid % 128] =
              make_float4(dq[q][0] * scale, dq[q][1] * scale, dq[q][2] * scale, dq[q][3] * scale);
        // Warpgroup wg's sub-tile is the accumulator's 16 KB at 16 KB wg (d64: query rows
        // 64 wg; d128: column block wg) from the block's first row.
        if (ctid == 0) dq_slot[buf] = (b * p.heads_q + head) * (ws.dq_rows / kBlockM) + m_block;
        fence_proxy_async_smem();  // this thread's stores, for the copy engine
        release(bar_dq_full(buf));
        ++dq_fills;
      } else {
        int* const semaphore = deterministic ? dq_semaphore(p, ws, b, head, m_block, kBlockM) : nullptr;
        if (deterministic) {
          if (ctid == 0) {
            while (atomicAdd(semaphore, 0) != n_block) {
            }
            __threadfence();
          }
          named_barrier_sync(kBwdTmaBarSemaphore, kCThreads);
        }
        float* gdq = ws.dq_accum + ((int64_t(b) * p.heads_q + head) * ws.dq_rows + m0 + dq_qb * 64) * kHeadDim +
                     dq_db * 4096;
#pragma unroll
        for (int q = 0; q < 8; ++q)
          atomicAdd(reinterpret_cast<float4*>(gdq + (q * 128 + ctid % 128) * 4),
                    make_float4(dq[q][0] * scale, dq[q][1] * scale, dq[q][2] * scale, dq[q][3] * scale));
        if (deterministic) {
          __threadfence();
          named_barrier_sync(kBwdTmaBarSemaphore, kCThreads);
          if (ctid == 0) atomicAdd(semaphore, 1);
        }
      }
      wgmma_wait<0>();
      fence_operands(acc_dk);
      fence_operands(dsa);
      // This warp's GEMMs reading the stage (Q, dO; its LSE and D were read above) completed.
      release(bar_empty(st.index));
      st.advance();
      // (FLASHGPT_BWD_DQ_ARRIVE_LATE=0: the arrival right after this block's atomics.)
      if constexpr (kFusedDq && !kDqArriveLate) dq_strip_arrive(strips.counter(p, ws, it), lane);
    }
    // Every GEMM of this warp that read K or V completed: the producer may load the next tile's.
    release(bar_kv_empty);
    // The fused dQ convert: the arrival at the last query block's strip, then the claims, whose
    // answers are read after the epilogue.
    [[maybe_unused]] bool won = false;
    if constexpr (kFusedDq) {
      if (kDqArriveLate && iterations > 0) dq_strip_arrive(strips.counter(p, ws, iterations - 1), lane);
      won = dq_strips_claim(p, ws, strips, lane, iterations, 0);
    }

    // dK = scale dS^T Q and dV through the staging buffers (the previous tile's copy-out read
    // them before the first barrier), written by rows. kDqWarp: after the dQ warp has read
    // every dQ buffer (they share the space): the barrier of each buffer's next fill, as that
    // fill would wait on it.
    if constexpr (kDqWarp && !Traits::kDqOwnStage) {
#pragma unroll
      for (uint32_t i = 0; i < kDqBuffers; ++i)
        mbarrier_wait(bar_dq_empty(dq_buf(dq_fills + i)), dq_free_parity(dq_fills + i));
    }
    named_barrier_sync(kBwdTmaBarEpilogue, kCThreads);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key_local = key_local0 + 8 * r;
#pragma unroll
      for (int i = 0; i < kNTilesD; ++i) {
        Staged::put(s_dk, key_local, i * 8 + 2 * t, Ops::pack(acc_dk[i][2 * r] * scale, acc_dk[i][2 * r + 1] * scale));
        Staged::put(s_dv, key_local, i * 8 + 2 * t, Ops::pack(acc_dv[i][2 * r], acc_dv[i][2 * r + 1]));
      }
    }
    named_barrier_sync(kBwdTmaBarEpilogue, kCThreads);
    Staged::template copy_out<kCThreads>(s_dk, global.dk, p.dk_row_stride, global.valid_k, ctid);
    Staged::template copy_out<kCThreads>(s_dv, global.dv, p.dv_row_stride, global.valid_k, ctid);
    // The fused dQ convert: the completed strips among this warp's (claimed above).
    if constexpr (kFusedDq) dq_strips_convert<Element>(won, p, ws, seq, strips, lane, iterations);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma: the launcher never picks this kernel there
#endif
}

}  // namespace flashgpt::attn

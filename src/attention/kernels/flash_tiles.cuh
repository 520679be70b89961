// The tile choices of every (pass, head dim) and the backward workspace's layout. Kernel-side
// only: included by the launchers (flash_*_launch.cuh) and the kernels, compiled by nvcc. The
// entry points (attention_cuda.cc) learn what they need from the instances (the workspace
// size, which kernels exist), so the lab hooks below need to reach nvcc only.
#pragma once

#include <flashgpt/attention.h>

#include <cstddef>

namespace flashgpt::attn {

// Tile choices, one row per head dim. Forward: 16 * kFwdMTiles query rows per warp; the key block
// shrinks as head_dim grows so that S (kFwdBlockN / 2 floats a thread) and O (head_dim / 2
// floats a thread) fit in registers. Backward: 16 kBwdKTiles keys per warp, kBwdBlockM queries
// per step.
template <int kHeadDim>
struct TileConfig;
template <> struct TileConfig<32>  { static constexpr int kFwdBlockN = 64,  kFwdWarps = 4, kFwdMTiles = 2, kBwdBlockM = 64, kBwdWarps = 4, kBwdKTiles = 1; };
// Kernel lab hook: FLASHGPT_FWD<d>_BLOCK_N / _WARPS / _MTILES (d = 64, 128) override the
// forward tiles of that head dim at compile time, so bench/attention_gpu/lab.sh can compare
// variants. (Three macros, not one: nvcc splits -D values at commas.)
#ifndef FLASHGPT_FWD64_BLOCK_N
#define FLASHGPT_FWD64_BLOCK_N 64
#endif
#ifndef FLASHGPT_FWD64_WARPS
#define FLASHGPT_FWD64_WARPS 4
#endif
#ifndef FLASHGPT_FWD64_MTILES
#define FLASHGPT_FWD64_MTILES 2
#endif
#ifndef FLASHGPT_FWD128_BLOCK_N
#define FLASHGPT_FWD128_BLOCK_N 32
#endif
#ifndef FLASHGPT_FWD128_WARPS
#define FLASHGPT_FWD128_WARPS 4
#endif
#ifndef FLASHGPT_FWD128_MTILES
#define FLASHGPT_FWD128_MTILES 2
#endif
// Backward lab hooks, head dim 64: FLASHGPT_BWD64_KTILES m16 key tiles per warp (1 or 2),
// FLASHGPT_BWD64_WARPS warps, FLASHGPT_BWD64_BLOCK_M queries per step. Two key tiles double
// the per-thread dK, dV, S^T, dP^T registers, so they come with 32 queries a step (S^T and
// dP^T of 2 x 32 queries cost what 1 x 64 did) and 4 warps (128 keys per CTA, as before).
// Two is the default: on the H100 it passed the GPU tests and beat one key tile (8 warps x 16
// keys, 64 queries) in all 9 d64 rows measured, +2-9% backward; 8 warps x 32 keys (256 per CTA) was +1% to -14% against one key tile.
#ifndef FLASHGPT_BWD64_KTILES
#define FLASHGPT_BWD64_KTILES 2
#endif
#if FLASHGPT_BWD64_KTILES == 2
#ifndef FLASHGPT_BWD64_WARPS
#define FLASHGPT_BWD64_WARPS 4
#endif
#ifndef FLASHGPT_BWD64_BLOCK_M
#define FLASHGPT_BWD64_BLOCK_M 32
#endif
#endif
#ifndef FLASHGPT_BWD64_WARPS
#define FLASHGPT_BWD64_WARPS 8
#endif
#ifndef FLASHGPT_BWD64_BLOCK_M
#define FLASHGPT_BWD64_BLOCK_M 64
#endif
template <> struct TileConfig<64> {
  static constexpr int kFwdBlockN = FLASHGPT_FWD64_BLOCK_N, kFwdWarps = FLASHGPT_FWD64_WARPS,
                       kFwdMTiles = FLASHGPT_FWD64_MTILES;
  static constexpr int kBwdBlockM = FLASHGPT_BWD64_BLOCK_M, kBwdWarps = FLASHGPT_BWD64_WARPS,
                       kBwdKTiles = FLASHGPT_BWD64_KTILES;
};
template <> struct TileConfig<96>  { static constexpr int kFwdBlockN = 32,  kFwdWarps = 4, kFwdMTiles = 2, kBwdBlockM = 64, kBwdWarps = 4, kBwdKTiles = 1; };
template <> struct TileConfig<128> {
  static constexpr int kFwdBlockN = FLASHGPT_FWD128_BLOCK_N, kFwdWarps = FLASHGPT_FWD128_WARPS,
                       kFwdMTiles = FLASHGPT_FWD128_MTILES;
  static constexpr int kBwdBlockM = 64, kBwdWarps = 8, kBwdKTiles = 1;
};
template <> struct TileConfig<256> { static constexpr int kFwdBlockN = 32,  kFwdWarps = 8, kFwdMTiles = 1, kBwdBlockM = 32, kBwdWarps = 8, kBwdKTiles = 1; };

// Hopper (wgmma) forward tiles, head dims 64, 128 and 256: kWarpgroups x 64 query rows per
// CTA, kBlockN keys per step, kOverlap = issue the S GEMM of the next key block with the P V
// GEMM of this one (softmax overlaps the tensor cores). Lab hooks as above:
// FLASHGPT_WGMMA<d>_BLOCK_N / _WARPGROUPS / _OVERLAP. Measured on the H100:
// d64 with one warpgroup (two CTAs per SM, one hides the other's loads and epilogue) +2-10%;
// without the overlap d128 +2-5% (the overlapped loop spills 144 B at 255 registers) and d64
// +1-10% (not profiled; likely the two co-resident CTAs already keep the tensor cores busy).
// d64 with kBlockN 64 instead of 128: +6-18% at s512 and s1k, +16-21% on the
// model shape with dropout, +1-10% at s2k, equal from s4k up (40 KB of shared memory and
// fewer registers: more CTAs per SM).
#ifndef FLASHGPT_WGMMA64_BLOCK_N
#define FLASHGPT_WGMMA64_BLOCK_N 64
#endif
#ifndef FLASHGPT_WGMMA64_WARPGROUPS
#define FLASHGPT_WGMMA64_WARPGROUPS 1
#endif
#ifndef FLASHGPT_WGMMA64_OVERLAP
#define FLASHGPT_WGMMA64_OVERLAP 0
#endif
#ifndef FLASHGPT_WGMMA128_BLOCK_N
#define FLASHGPT_WGMMA128_BLOCK_N 128
#endif
#ifndef FLASHGPT_WGMMA128_WARPGROUPS
#define FLASHGPT_WGMMA128_WARPGROUPS 2
#endif
#ifndef FLASHGPT_WGMMA128_OVERLAP
#define FLASHGPT_WGMMA128_OVERLAP 0
#endif
#ifndef FLASHGPT_WGMMA256_BLOCK_N
#define FLASHGPT_WGMMA256_BLOCK_N 64
#endif
template <int kHeadDim>
struct WgmmaTileConfig;
// Backward (flash_bwd_wgmma_kernel.cuh): 128 keys per CTA, kBwdBlockM queries per step, so
// that dQ's kBwdBlockM x head_dim tile is two 64 x 64 sub-tiles, one per warpgroup.
// kFwdMinBlocksPerSm: the forward's __launch_bounds__ minimum of CTAs per SM. d64's one
// warpgroup with 64 keys a step was measured with three CTAs sharing an SM (152 registers, 40 KB
// of shared memory); the bound makes ptxas keep it there (at most 170 registers a thread) instead
// of silently dropping to two CTAs when a change needs more registers.
template <> struct WgmmaTileConfig<64> {
  static constexpr int kBlockN = FLASHGPT_WGMMA64_BLOCK_N, kWarpgroups = FLASHGPT_WGMMA64_WARPGROUPS;
  static constexpr bool kOverlap = FLASHGPT_WGMMA64_OVERLAP != 0;
  static constexpr int kFwdMinBlocksPerSm = FLASHGPT_WGMMA64_BLOCK_N == 64 && FLASHGPT_WGMMA64_WARPGROUPS == 1 ? 3 : 1;
  static constexpr int kBwdBlockM = 128;
};
template <> struct WgmmaTileConfig<128> {
  static constexpr int kBlockN = FLASHGPT_WGMMA128_BLOCK_N, kWarpgroups = FLASHGPT_WGMMA128_WARPGROUPS;
  static constexpr bool kOverlap = FLASHGPT_WGMMA128_OVERLAP != 0;
  static constexpr int kFwdMinBlocksPerSm = 1;
  static constexpr int kBwdBlockM = 64;
};
// d96 and d256: the forward only (the backward runs the mma.sync kernel). d96 stores rows as
// d128 does (two swizzle blocks, the second half used) and takes d128's tiles.
template <> struct WgmmaTileConfig<96> {
  static constexpr int kBlockN = FLASHGPT_WGMMA128_BLOCK_N, kWarpgroups = FLASHGPT_WGMMA128_WARPGROUPS;
  static constexpr bool kOverlap = false;
  static constexpr int kFwdMinBlocksPerSm = 1;
};
// d256: 128 query rows x 256 of O take 128 accumulator registers a thread; K and V tiles of
// 64 keys keep shared memory at 193 KB.
template <> struct WgmmaTileConfig<256> {
  static constexpr int kBlockN = FLASHGPT_WGMMA256_BLOCK_N, kWarpgroups = 2;
  static constexpr bool kOverlap = false;
  static constexpr int kFwdMinBlocksPerSm = 1;
};

// Workspace layout, all fp32 or int32, each part 256-byte aligned:
//   dq_accum [batch, heads_q, dq_rows, head_dim]   (dq_rows = seqlen_q rounded up to
//            kDqRowAlign; seqlen_q = max length when varlen). The mma.sync kernel keeps each
//            (batch, head) part row-major; the wgmma kernel stores it as 64 x 64 sub-tiles
//            in its accumulator-fragment order (flash_bwd_wgmma_kernel.cuh), so that a
//            warpgroup's sub-tile is one contiguous 16 KB range. The padding rows only ever
//            receive zeros.
//   dot_do_o [batch, heads_q, seqlen_q]
//   tile_counter [1]   the persistent wgmma kernel's next tile (zeroed by the preprocess)
//   semaphores [batch, heads_q, m_blocks]          (deterministic mode only)
//   dq_arrivals [batch, heads_q, dq_rows / 16, ceil(head_dim / 64)]   the fused dQ convert's
//            per-strip count of the key blocks yet to add (16 rows x 64 columns of the wgmma
//            kernels' fragment layout; set by the preprocess). The launcher sets the pointer to
//            null when the separate convert kernel runs instead.
constexpr int kDqRowAlign = 128;
constexpr int kDqStripRows = 16;
struct BwdWorkspace {
  float* dq_accum;
  float* dot_do_o;
  int* tile_counter;
  int* semaphores;
  int* dq_arrivals;
  int dq_rows;
};

inline std::size_t bwd_align(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

inline std::size_t bwd_workspace_layout(const AttentionParams& p, int block_m, char* base, BwdWorkspace* ws) {
  const std::size_t dq_rows = (std::size_t(p.seqlen_q) + kDqRowAlign - 1) / kDqRowAlign * kDqRowAlign;
  const std::size_t rows = std::size_t(p.batch) * p.heads_q * p.seqlen_q;
  const std::size_t m_blocks = (std::size_t(p.seqlen_q) + block_m - 1) / block_m;
  const std::size_t dq_bytes = bwd_align(std::size_t(p.batch) * p.heads_q * dq_rows * p.head_dim * sizeof(float));
  const std::size_t d_bytes = bwd_align(rows * sizeof(float));
  const std::size_t counter_bytes = bwd_align(sizeof(int));
  const std::size_t sem_bytes = bwd_align(std::size_t(p.batch) * p.heads_q * m_blocks * sizeof(int));
  const std::size_t arrival_bytes = bwd_align(std::size_t(p.batch) * p.heads_q * (dq_rows / kDqStripRows) *
                                              ((std::size_t(p.head_dim) + 63) / 64) * sizeof(int));
  if (ws != nullptr) {
    ws->dq_accum = reinterpret_cast<float*>(base);
    ws->dot_do_o = reinterpret_cast<float*>(base + dq_bytes);
    ws->tile_counter = reinterpret_cast<int*>(base + dq_bytes + d_bytes);
    ws->semaphores = reinterpret_cast<int*>(base + dq_bytes + d_bytes + counter_bytes);
    ws->dq_arrivals = reinterpret_cast<int*>(base + dq_bytes + d_bytes + counter_bytes + sem_bytes);
    ws->dq_rows = static_cast<int>(dq_rows);
  }
  return dq_bytes + d_bytes + counter_bytes + sem_bytes + arrival_bytes;
}

inline std::size_t bwd_workspace_bytes(const AttentionParams& p, int block_m) {
  return bwd_workspace_layout(p, block_m, nullptr, nullptr);
}

}  // namespace flashgpt::attn

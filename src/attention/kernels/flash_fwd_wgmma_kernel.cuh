// The Hopper forward kernel: the same algorithm and contract as flash_fwd_kernel.cuh (online
// softmax in base 2 with the scale folded in, bottom-right causal mask, Philox dropout bit for
// bit, GQA, varlen, LSE), with both GEMMs on wgmma (sm_90a) instead of mma.sync.
//
// One CTA: kWarpgroups warpgroups of 128 threads, each owning 64 query rows.
//   S = Q K^T:  wgmma m64 n(kBlockN) k16, A = Q and B = K both K-major in shared memory.
//   O += P V:   wgmma m64 n(head_dim) k16, A = P from registers (RS form: the mma.sync A
//               fragment layout, so P never leaves registers), B = V read MN-major (transpose
//               bit; allowed for 16-bit types).
// The accumulator of m64nN is, per warp, the m16n8 C fragment layout tiled along N, so the
// masking, online softmax and dropout code see exactly what the mma.sync kernel's does.
//
// Shared memory: Q [kBlockM rows], K and V [2 stages][kBlockN rows], each tile in the
// 128-byte-swizzle layout of wgmma_common.cuh. Loads are cp.async (all threads); the copy for block n + 1 (n + 2 for K when overlapping) is
// in flight while block n is computed; one barrier per key block (FLASHGPT_WGMMA_SPLIT_WAIT=1:
// without the overlap K[n] and V[n] are waited for separately, two barriers per key block).
//
// kOverlap (FlashAttention-3's intra-warpgroup pipelining): the S GEMM of key block n + 1 and
// the P V GEMM of block n are issued together, and the softmax of block n + 1 runs while the
// tensor cores do the P V product; the O rescale waits for that product.
#pragma once

#include "flash_common.cuh"
#include "wgmma_common.cuh"

namespace flashgpt::attn {

template <int kHeadDim_, int kBlockN_, int kWarpgroups_, bool kOverlap_, typename Element_, int kMinBlocksPerSm_ = 1>
struct FwdWgmmaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr bool kOverlap = kOverlap_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockM = 64 * kWarpgroups;
  // The occupancy the tiles were chosen for, held by __launch_bounds__ (ptxas caps the registers).
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static_assert(kMinBlocksPerSm * kThreads * 128 <= 65536,
                "fewer than 128 registers a thread cannot hold this kernel's accumulators");
  static constexpr int kNTilesS = kBlockN / 8;   // n8 tiles of S per thread
  // Rows are stored as whole 64-element (128-byte) swizzle blocks: d96 takes two, the second
  // half used. The S GEMM runs over the kHeadDim columns; P V over kHeadDimPad (its N must
  // cover whole swizzle rows of V): V's pad columns, which the loads never write, are zeroed
  // once at the start, and O's pad columns are never written out.
  static constexpr int kHeadDimPad = (kHeadDim + 63) / 64 * 64;
  static constexpr int kNTilesO = kHeadDimPad / 8;  // n8 tiles of O per thread, pad included
  static_assert(sizeof(Element) == 2, "the V transpose bit and the 64-element swizzle rows assume 16-bit types");
  static_assert(kHeadDim % 32 == 0, "the S GEMM takes k16 steps and loads move 16-byte chunks");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 64 && kBlockN <= 256,
                "wgmma N is a multiple of 8 up to 256, and P V consumes k16 slices of the key block");
  static constexpr int kTileQBytes = kBlockM * kHeadDimPad * 2;
  static constexpr int kTileKVBytes = kBlockN * kHeadDimPad * 2;
  static_assert(kTileQBytes % 1024 == 0 && kTileKVBytes % 1024 == 0, "tiles must stay 1024-byte aligned");
  // Q, K x 2, V x 2, plus slack to round the dynamic shared memory base up to 1024 bytes.
  static constexpr size_t kSmemBytes = 1024 + kTileQBytes + 4 * size_t{kTileKVBytes};
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block can have");
  // An H100 SM has 228 KB of shared memory, 1 KB of it reserved per CTA.
  static_assert(kMinBlocksPerSm * (kSmemBytes + 1024) <= 228 * 1024,
                "kMinBlocksPerSm CTAs of this kernel do not fit in an SM's shared memory");
};

// Lab hook: 0 launches causal query blocks in index order (see the kernel).
#ifndef FLASHGPT_WGMMA_CAUSAL_REVERSE
#define FLASHGPT_WGMMA_CAUSAL_REVERSE 1
#endif
// Lab hook: 1 waits for K[n] and V[n] separately (no overlap: two barriers per key block; with
// the overlap only the first S GEMM waits for less). Off until measured.
#ifndef FLASHGPT_WGMMA_SPLIT_WAIT
#define FLASHGPT_WGMMA_SPLIT_WAIT 0
#endif

// Columns past the sequence and (causal) past row + diag become -inf. row0: the row of c0/c1.
template <int kNTiles>
__device__ __forceinline__ void wg_mask_scores(float (&s)[kNTiles][4], int n0, int row0, int seqlen_k, bool causal,
                                               int diag, int t) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = n0 + nt * 8 + 2 * t + (e & 1);
      const int row = row0 + (e >> 1) * 8;
      if (col >= seqlen_k || (causal && col > row + diag)) s[nt][e] = -INFINITY;
    }
}

// Online softmax over one key block for this thread's two rows: updates the running max and
// (thread-partial) sum, turns s into exp2(s * scale_log2 - max * scale_log2) and returns the
// factor by which O accumulated so far must be scaled.
template <int kNTiles>
__device__ __forceinline__ void wg_softmax_block(float (&s)[kNTiles][4], float (&row_max)[2], float (&row_sum)[2],
                                                 float scale_log2, float (&correction)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = warp_quad_max(mx);
    const float base = mx == -INFINITY ? 0.0f : mx * scale_log2;
    correction[r] = exp2f(row_max[r] * scale_log2 - base);  // 0 when the old max is -inf
    row_max[r] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] * scale_log2 - base);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] * scale_log2 - base);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;  // this thread's part; reduced across the quad at the end
  }
}

template <int kNTiles>
__device__ __forceinline__ void wg_scale_rows(float (&acc)[kNTiles][4], const float (&correction)[2]) {
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) {
    acc[i][0] *= correction[0];
    acc[i][1] *= correction[0];
    acc[i][2] *= correction[1];
    acc[i][3] *= correction[1];
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    flash_fwd_wgmma_kernel(const KernelParams p, float scale) {
#ifdef FLASHGPT_WGMMA_AVAILABLE
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using Mma = WgmmaOps<Element>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;
  constexpr int kKSteps = kHeadDim / 16;  // k16 steps of the S GEMM
  constexpr uint32_t kSwizzleAtom = 1024;  // 8 rows x 128 bytes: the descriptors' stride byte offset
  constexpr bool kCausalReverse = FLASHGPT_WGMMA_CAUSAL_REVERSE != 0;
  constexpr bool kSplitWait = FLASHGPT_WGMMA_SPLIT_WAIT != 0;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = sQ + Traits::kTileQBytes;       // [2][kHeadDimPad / 64][kBlockN][64]
  const uint32_t sV = sK + 2 * Traits::kTileKVBytes;  // [2][kHeadDimPad / 64][kBlockN][64]

  const bool causal = p.mask == Mask::causal;
  // Causal: the last query blocks see the most keys; handing them out first (CTAs start in
  // blockIdx.x order) leaves the light blocks for the final wave instead of the heaviest ones.
  const int m_block = causal && kCausalReverse ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int head = blockIdx.y, b = p.batch_begin + int(blockIdx.z);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wg = tid / 128;  // warpgroup: query rows 64 wg .. 64 wg + 63 of the block
  const SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int diag = seq.seqlen_k - seq.seqlen_q;  // row i sees col j iff j <= i + diag
  const FwdGlobal<Element> global(p, seq, b, head, m0, kBlockM, kBlockN, causal, diag);
  const Element *gQ = global.q, *gK = global.k, *gV = global.v;
  Element* gO = global.o;
  float* gLse = global.lse;
  const int n_blocks = global.n_blocks;

  // This thread's rows: m0 + row_local0 and m0 + row_local0 + 8.
  const int row_local0 = wg * 64 + (warp % 4) * 16 + g;
  const int row0 = m0 + row_local0;
  float acc_o[kNTilesO][4];
#pragma unroll
  for (int i = 0; i < kNTilesO; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const float scale_log2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const bool use_dropout = dropout_enabled(threshold);
  const uint32_t dropout_top = dropout_top_threshold(threshold);
  const DropoutRng rng = p.rng_device != nullptr ? *p.rng_device : p.rng;  // a graph replay's per-step stream
  const int64_t batch_head = int64_t{b} * p.heads_q + head;

  auto load_k = [&](int n_block) {
    const int n = n_block * kBlockN;
    load_tile_swizzled_async<kBlockN, kHeadDim, kThreads>(sK + (n_block & 1) * Traits::kTileKVBytes,
                                                          gK + n * p.k_row_stride, p.k_row_stride, seq.seqlen_k - n,
                                                          tid);
  };
  auto load_v = [&](int n_block) {
    const int n = n_block * kBlockN;
    load_tile_swizzled_async<kBlockN, kHeadDim, kThreads>(sV + (n_block & 1) * Traits::kTileKVBytes,
                                                          gV + n * p.v_row_stride, p.v_row_stride, seq.seqlen_k - n,
                                                          tid);
  };
  // All loads so far have landed and are visible to every thread's wgmma (the async proxy).
  auto wait_loads = [&]() {
    cp_async_wait<0>();
    fence_proxy_async_smem();
    __syncthreads();
  };
  // S = Q K^T for this warpgroup's 64 rows against key block n_block (issued, not waited).
  auto issue_s_gemm = [&](float (&s)[kNTilesS][4], int n_block) {
    const uint32_t q_base = sQ + wg * 64 * 128, k_base = sK + (n_block & 1) * Traits::kTileKVBytes;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const uint32_t col_bytes = (kk % 4) * 32;  // k16 slice inside a 128-byte (64-element) row
      const uint64_t desc_q = wgmma_desc_sw128(q_base + (kk / 4) * kBlockM * 128 + col_bytes, 16, kSwizzleAtom);
      const uint64_t desc_k = wgmma_desc_sw128(k_base + (kk / 4) * kBlockN * 128 + col_bytes, 16, kSwizzleAtom);
      Mma::ss(s, desc_q, desc_k, /*accumulate=*/kk > 0);
    }
  };
  // O += P V[n_block]: k16 slice kt is rows 16 kt .. 16 kt + 15 of V (2048 bytes further);
  // along N (head_dim) the 64-column blocks are kBlockN * 128 bytes apart (leading byte offset).
  auto issue_pv_gemm = [&](const uint32_t (&pa)[kNTilesS / 2][4], int n_block) {
    const uint32_t v_base = sV + (n_block & 1) * Traits::kTileKVBytes;
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt)
      Mma::rs_trans_b(acc_o, pa[kt], wgmma_desc_sw128(v_base + kt * 16 * 128, kBlockN * 128, kSwizzleAtom),
                      /*accumulate=*/1);
  };
  // Mask, online softmax and dropout of key block n_block; returns the O correction.
  auto softmax_block = [&](float (&s)[kNTilesS][4], int n_block, float (&correction)[2]) {
    const int n0 = n_block * kBlockN;
    if (n0 + kBlockN > seq.seqlen_k || (causal && n0 + kBlockN - 1 > m0 + diag))
      wg_mask_scores(s, n0, row0, seq.seqlen_k, causal, diag, t);
    wg_softmax_block(s, row_max, row_sum, scale_log2, correction);
    if (use_dropout) dropout_apply_rows(s, rng, batch_head, row0, n0, t, dropout_top);
  };

  // V's pad columns (d96: 96 .. 127) enter the P V GEMM; no load writes them, so they are
  // zeroed here, in both stages, and stay zero: the loads write only real columns and the
  // epilogue reuses the buffers after the last GEMM. The first wait_loads fences these stores
  // for the async proxy.
  if constexpr (Traits::kHeadDimPad != kHeadDim) {
    zero_tile_pad_columns<kBlockN, kHeadDim, Traits::kHeadDimPad, kThreads>(smem_raw, sV, tid);
    zero_tile_pad_columns<kBlockN, kHeadDim, Traits::kHeadDimPad, kThreads>(smem_raw, sV + Traits::kTileKVBytes, tid);
  }

  // kSplitWait: two copy groups, {Q, K[0]} first, so that the first S GEMM waits for those
  // alone, then {V[0]} (+ K[1] when overlapping); otherwise one.
  if (n_blocks > 0) {
    load_tile_swizzled_async<kBlockM, kHeadDim, kThreads>(sQ, gQ, p.q_row_stride, seq.seqlen_q - m0, tid);
    load_k(0);
    if constexpr (kSplitWait) cp_async_commit();
    load_v(0);
    if constexpr (Traits::kOverlap) {
      if (n_blocks > 1) load_k(1);
    }
    cp_async_commit();
  }
  // The newest copy group may still be in flight; all older ones have landed and are visible.
  auto wait_loads_but_newest = [&]() {
    cp_async_wait<1>();
    fence_proxy_async_smem();
    __syncthreads();
  };

  if constexpr (!Traits::kOverlap) {
    for (int n_block = 0; n_block < n_blocks; ++n_block) {
      // The other stage's K and V were consumed in the previous iteration (every thread waited
      // for its GEMMs before this barrier). Split waits: K[n] alone gates the S GEMM and V[n]
      // the P V GEMM, each with the next block's copy of the same tensor in flight behind it.
      if constexpr (kSplitWait) {
        wait_loads_but_newest();  // Q, K[n]
        if (n_block + 1 < n_blocks) load_k(n_block + 1);
        cp_async_commit();
      } else {
        wait_loads();  // K[n], V[n]
        if (n_block + 1 < n_blocks) {
          load_k(n_block + 1);
          load_v(n_block + 1);
        }
        cp_async_commit();
      }

      float s[kNTilesS][4];
      wgmma_fence();
      issue_s_gemm(s, n_block);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s);

      float correction[2];
      softmax_block(s, n_block, correction);
      wg_scale_rows(acc_o, correction);
      uint32_t pa[kNTilesS / 2][4];
      pack_rs_a_fragments<Element>(s, pa);
      if constexpr (kSplitWait) {
        wait_loads_but_newest();  // V[n]; K[n + 1] may still be in flight
        if (n_block + 1 < n_blocks) load_v(n_block + 1);
        cp_async_commit();
      }

      fence_operands(acc_o);
      wgmma_fence();
      issue_pv_gemm(pa, n_block);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(pa);
    }
  } else if (n_blocks > 0) {
    // Block 0's S and softmax first; then each iteration issues S[n + 1] and P[n] V[n] together.
    uint32_t pa[kNTilesS / 2][4];
    {
      if constexpr (kSplitWait) {
        wait_loads_but_newest();  // Q, K[0]
      } else {
        wait_loads();
      }
      float s[kNTilesS][4];
      wgmma_fence();
      issue_s_gemm(s, 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s);
      float correction[2];
      softmax_block(s, 0, correction);  // O is still zero: no rescale needed
      pack_rs_a_fragments<Element>(s, pa);
    }
    // Every block but the last: its P V and the next block's S run on the tensor cores together
    // (straight-line wgmma code: ptxas serializes wgmma whose groups it cannot track).
    for (int n_block = 0; n_block + 1 < n_blocks; ++n_block) {
      // K[n + 1] and V[n] landed. K[n + 2] goes to the stage that held K[n], consumed by the S
      // GEMM of the previous iteration; V[n + 1]'s stage held V[n - 1], consumed likewise.
      wait_loads();
      if (n_block + 2 < n_blocks) load_k(n_block + 2);
      load_v(n_block + 1);
      cp_async_commit();

      float s[kNTilesS][4];
      fence_operands(acc_o);
      wgmma_fence();
      issue_s_gemm(s, n_block + 1);
      wgmma_commit();
      issue_pv_gemm(pa, n_block);
      wgmma_commit();
      wgmma_wait<1>();  // S[n + 1] done; P[n] V[n] may still run
      fence_operands(s);
      float correction[2];
      softmax_block(s, n_block + 1, correction);
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(pa);
      wg_scale_rows(acc_o, correction);
      pack_rs_a_fragments<Element>(s, pa);
    }
    wait_loads();  // V[last]
    fence_operands(acc_o);
    wgmma_fence();
    issue_pv_gemm(pa, n_blocks - 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_o);
    fence_operands(pa);
  }
  cp_async_wait<0>();

  // Epilogue: O = acc / sum * 256 / (256 - t), LSE = max * scale + ln(sum), +inf for empty rows.
  // O is staged in the K and V buffers (every warpgroup's last GEMMs have read them once all
  // threads pass the barrier) and written out by rows.
  using Staged = StagedTile<kBlockM, kHeadDim, Element>;
  static_assert(Staged::kBytes <= 4 * size_t{Traits::kTileKVBytes}, "O fits where K and V were");
  Element* const s_o = reinterpret_cast<Element*>(smem_raw + (sK - smem_u32(smem_raw)));
  __syncthreads();
  const float keep_scale = static_cast<float>(dropout_keep_scale(threshold));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = warp_quad_sum(row_sum[r]);
    const int row_local = row_local0 + 8 * r;
    const float inv = sum > 0.0f ? keep_scale / sum : 0.0f;
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i)  // O's real columns only
      Staged::put(s_o, row_local, i * 8 + 2 * t, Ops::pack(acc_o[i][2 * r] * inv, acc_o[i][2 * r + 1] * inv));
    if (t == 0 && m0 + row_local < seq.seqlen_q)
      gLse[row_local] = sum > 0.0f ? row_max[r] * scale + logf(sum) : INFINITY;
  }
  __syncthreads();
  Staged::template copy_out<kThreads>(s_o, gO, p.o_row_stride, seq.seqlen_q - m0, tid);
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma: the launcher never picks this kernel there
#endif
}

}  // namespace flashgpt::attn

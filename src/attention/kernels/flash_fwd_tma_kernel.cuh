// The warp-specialized Hopper forward (sm_90a): the algorithm and contract of
// flash_fwd_wgmma_kernel.cuh (online softmax in base 2 with the scale folded in, bottom-right
// causal mask, GQA, LSE), fed by the copy engine instead of cp.async from every thread.
// Dense batches only, with or without dropout (kDropout: the Philox mask of philox.h, bit for
// bit the wgmma kernel's and the CPU reference's, which the backward regenerates); the entry
// point keeps the cp.async wgmma kernel for variable-length batches.
//
// One CTA: one producer warpgroup and kConsumers consumer warpgroups of 64 query rows each.
//   - Producer (one thread works; the warpgroup gives its registers away with setmaxnreg):
//     Q once, then K[n] and V[n] of every key block into a ring of kStages stages, each
//     copy completing on the stage's "full" mbarrier (transaction bytes); before refilling a
//     stage it waits on the stage's "empty" mbarrier.
//   - Consumers (setmaxnreg raises their registers): S = Q K^T (SS wgmma), mask + online
//     softmax (+ dropout of P after the row sums, as in the cp.async kernel: the sums and LSE
//     are those before dropout, O is scaled by 256 / (256 - t) at the end), O += P V (RS
//     wgmma, P from registers), with the descriptors, fragment layouts and softmax of the
//     cp.async kernel. A warp releases K[n] (V[n]) once its S (P V) GEMM has completed: one
//     arrival per consumer warp on the stage's "empty" barrier.
//   - No CTA-wide barrier after the barriers' initialization.
//   - Ping-pong (kPingPong): the consumers issue their GEMMs in turns, round robin, through
//     named barriers (turn w is barrier 1 + w), so that while one warpgroup's GEMM runs on the
//     tensor cores the others run their softmax. Every consumer takes two turns per key block
//     (S, then P V), and all of them see the same number of key blocks, so the turns pair up;
//     the last warpgroup's last hand-over, which nobody would wait for, is skipped.
//   - Epilogue: each consumer stages its 64 rows of O in shared memory (a region of its own, or
//     its own rows of Q where the tile leaves no room: kStageOInQ; one named barrier of its 128
//     threads) and writes them out with 16-byte stores; LSE as today.
#pragma once

#include "flash_common.cuh"
#include "flash_fwd_wgmma_kernel.cuh"
#include "hopper_common.cuh"
#include "wgmma_common.cuh"

namespace flashgpt::attn {

template <int kHeadDim_, int kBlockN_, int kConsumers_, int kStages_, bool kPingPong_, typename Element_,
          bool kOverlap_ = false, int kCtasPerSm_ = 1, bool kDropout_ = false>
struct FwdTmaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kStages = kStages_;
  static constexpr bool kPingPong = kPingPong_;
  static constexpr bool kOverlap = kOverlap_;
  // A template parameter, not a run-time flag: the instances without dropout carry no Philox code
  // (the backward kernels measured a run-time flag at 6-23% without dropout).
  static constexpr bool kDropout = kDropout_;
  // CTAs sharing an SM: the __launch_bounds__ minimum, so ptxas caps the entry registers at the
  // share of one CTA and setmaxnreg redistributes only that share.
  static constexpr int kCtasPerSm = kCtasPerSm_;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column (128-byte) swizzle blocks of a row
  static_assert(sizeof(Element) == 2, "16-bit elements only");
  static_assert(kHeadDim % 64 == 0, "rows are whole 128-byte swizzle blocks (head dims 64 and 128)");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 64 && kBlockN <= 256, "wgmma N and the TMA box rows");
  static_assert(kBlockM <= 256, "a TMA box has at most 256 rows");
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2;
  using StagedO = StagedTile<64, kHeadDim, Element>;  // one consumer's 64 rows of O
  static constexpr size_t kStagedOBytes = (StagedO::kBytes + 127) / 128 * 128;
  // Barriers: Q full, then K full, V full, K empty, V empty per stage.
  static constexpr int kBarriers = 1 + 4 * kStages;
  static constexpr size_t kSmemWithoutO = 1024 + kTileQBytes + 2 * size_t{kStages} * kTileKVBytes + 8 * kBarriers;
  // O is staged in a region of its own where that fits; otherwise (d128 with 176 keys or 3
  // stages) in the consumer's own rows of Q, which only that consumer reads and which it has
  // finished reading once its last GEMM has completed.
  static constexpr bool kStageOInQ = kSmemWithoutO + kConsumers * kStagedOBytes > 227 * 1024;
  static constexpr size_t kSmemBytes = kSmemWithoutO + (kStageOInQ ? 0 : kConsumers * kStagedOBytes);
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block can have");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024,
                "kCtasPerSm CTAs' shared memory (and the 1 KB the SM reserves for each) exceed an H100 SM's 228 KB");
  static_assert(kCtasPerSm * kThreads <= 2048, "more threads than an SM holds");
  // Registers after reallocation: the producer keeps 24 a thread; the consumers share the rest of
  // the CTA's part of the 64K-register file (multiples of 8, and what
  // __launch_bounds__(kThreads, kCtasPerSm) granted at entry, 65536 / (kThreads kCtasPerSm)
  // rounded down to 8, times kThreads, bounds the total).
  static constexpr int kProducerRegs = 24;
  static constexpr int kEntryRegs = 65536 / (kThreads * kCtasPerSm) / 8 * 8;
  static constexpr int kConsumerRegs =
      ((kEntryRegs * kThreads - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8) > 240
          ? 240
          : ((kEntryRegs * kThreads - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8);
  static_assert(kConsumers + 1 <= 15 - kConsumers, "named barrier ids: a turn and an epilogue barrier per consumer");
};

// Lab hook: FLASHGPT_TMA_PINGPONG=0 turns ping-pong off (each consumer issues its GEMMs as soon
// as its data is there). Whether a tile overlaps within a warpgroup is a column of the tile
// tables (kTma64Tiles, kTma128Tiles in flash_fwd_launch.cuh).
#ifndef FLASHGPT_TMA_PINGPONG
#define FLASHGPT_TMA_PINGPONG 1
#endif

// One consumer's 64 rows of O staged in its own rows of Q ([kColBlocks][kBlockM][64], 128-byte
// rows): the 16-byte chunk c of row r sits at chunk c ^ (r % 8), so that the eight rows a warp
// writes at once, and the eight chunks a quarter-warp reads at once, fall in distinct banks.
template <typename Traits>
struct StagedOInQ {
  using Element = typename Traits::Element;
  static constexpr int kChunks = Traits::kHeadDim / 8;  // 16-byte chunks of a row
  static __device__ __forceinline__ uint32_t offset(int row, int chunk) {
    return uint32_t((chunk / 8) * Traits::kBlockM * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
  }
  // `base`: the consumer's first row of Q (sQ + 64 cw rows of the first column block).
  static __device__ __forceinline__ void put(unsigned char* base, int row, int col, uint32_t pair) {
    *reinterpret_cast<uint32_t*>(base + offset(row, col / 8) + (col % 8) * 2) = pair;
  }
  // Rows at or past valid_rows are not written.
  static __device__ __forceinline__ void copy_out(const unsigned char* base, Element* out, int64_t row_stride,
                                                  int valid_rows, int tid) {
#pragma unroll
    for (int c = tid; c < 64 * kChunks; c += 128) {
      const int row = c / kChunks, chunk = c % kChunks;
      if (row < valid_rows)
        *reinterpret_cast<uint4*>(out + row * row_stride + chunk * 8) =
            *reinterpret_cast<const uint4*>(base + offset(row, chunk));
    }
  }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kCtasPerSm)
    flash_fwd_tma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                         const __grid_constant__ CUtensorMap tm_v, const KernelParams p, float scale) {
#ifdef FLASHGPT_WGMMA_AVAILABLE
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using Mma = WgmmaOps<Element>;
  using StagedO = typename Traits::StagedO;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages, kConsumers = Traits::kConsumers;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr uint32_t kSwizzleAtom = 1024;
  constexpr bool kPingPong = Traits::kPingPong && kConsumers > 1;
  constexpr bool kOverlap = Traits::kOverlap;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023u) & ~1023u;
  const uint32_t sK = sQ + Traits::kTileQBytes;               // [kStages][kColBlocks][kBlockN][64]
  const uint32_t sV = sK + kStages * Traits::kTileKVBytes;    // [kStages][kColBlocks][kBlockN][64]
  const uint32_t sO = sV + kStages * Traits::kTileKVBytes;    // [kConsumers] staged 64-row tiles
  const uint32_t bars = sO + (Traits::kStageOInQ ? 0u : kConsumers * uint32_t(Traits::kStagedOBytes));
  const uint32_t bar_q = bars;
  auto bar_k_full = [&](int s) { return bars + 8u * uint32_t(1 + s); };
  auto bar_v_full = [&](int s) { return bars + 8u * uint32_t(1 + kStages + s); };
  auto bar_k_empty = [&](int s) { return bars + 8u * uint32_t(1 + 2 * kStages + s); };
  auto bar_v_empty = [&](int s) { return bars + 8u * uint32_t(1 + 3 * kStages + s); };

  const bool causal = p.mask == Mask::causal;
  // Heaviest query blocks first under the causal mask (CTAs start in blockIdx.x order).
  const int m_block = causal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int head = blockIdx.y, b = p.batch_begin + int(blockIdx.z);
  const int head_kv = head / (p.heads_q / p.heads_kv);
  const SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;  // the whole CTA, before any barrier
  const int diag = seq.seqlen_k - seq.seqlen_q;
  const FwdGlobal<Element> global(p, seq, b, head, m0, kBlockM, kBlockN, causal, diag);
  const int n_blocks = global.n_blocks;
  const int tid = threadIdx.x;
  const int wg = tid / 128;

  if (tid == 0) {
    mbarrier_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(bar_k_full(s), 1);
      mbarrier_init(bar_v_full(s), 1);
      mbarrier_init(bar_k_empty(s), 4 * kConsumers);  // one arrival per consumer warp
      mbarrier_init(bar_v_empty(s), 4 * kConsumers);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- Producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (tid == 0 && n_blocks > 0) {
      prefetch_tensor_map(&tm_q);
      prefetch_tensor_map(&tm_k);
      prefetch_tensor_map(&tm_v);
      mbarrier_arrive_expect_tx(bar_q, Traits::kTileQBytes);
#pragma unroll
      for (int cb = 0; cb < Traits::kColBlocks; ++cb)
        tma_load_4d(sQ + cb * kBlockM * 128, &tm_q, bar_q, cb * 64, m0, head, b);
      PipelineState<kStages> st;
      for (int n_block = 0; n_block < n_blocks; ++n_block) {
        const uint32_t k_dst = sK + st.index * Traits::kTileKVBytes, v_dst = sV + st.index * Traits::kTileKVBytes;
        mbarrier_wait(bar_k_empty(st.index), st.phase ^ 1u);
        mbarrier_arrive_expect_tx(bar_k_full(st.index), Traits::kTileKVBytes);
#pragma unroll
        for (int cb = 0; cb < Traits::kColBlocks; ++cb)
          tma_load_4d(k_dst + cb * kBlockN * 128, &tm_k, bar_k_full(st.index), cb * 64, n_block * kBlockN, head_kv, b);
        mbarrier_wait(bar_v_empty(st.index), st.phase ^ 1u);
        mbarrier_arrive_expect_tx(bar_v_full(st.index), Traits::kTileKVBytes);
#pragma unroll
        for (int cb = 0; cb < Traits::kColBlocks; ++cb)
          tma_load_4d(v_dst + cb * kBlockN * 128, &tm_v, bar_v_full(st.index), cb * 64, n_block * kBlockN, head_kv, b);
        st.advance();
      }
    }
    return;
  }

  // ---- Consumers ----
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int cw = wg - 1;  // this consumer's rows: 64 cw .. 64 cw + 63 of the block
  const int ctid = tid - 128 * wg;  // 0..127 inside the warpgroup
  const int warp = ctid / 32, lane = ctid % 32, g = lane / 4, t = lane % 4;
  const int row_local0 = cw * 64 + warp * 16 + g;
  const int row0 = m0 + row_local0;
  const float scale_log2 = scale * kLog2e;
  // Dropout: the same (batch * heads_q + head, row, key) Philox counter as the cp.async kernel;
  // a graph replay reads the step's stream from device memory.
  [[maybe_unused]] uint32_t dropout_top = 0;
  [[maybe_unused]] DropoutRng rng;
  [[maybe_unused]] int64_t batch_head = 0;
  if constexpr (Traits::kDropout) {
    dropout_top = dropout_top_threshold(dropout_threshold(p.dropout_p));
    rng = p.rng_device != nullptr ? *p.rng_device : p.rng;
    batch_head = int64_t{b} * p.heads_q + head;
  }

  float acc_o[kNTilesO][4];
#pragma unroll
  for (int i = 0; i < kNTilesO; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

  // Turns: consumer cw waits on barrier 1 + cw (but for consumer 0's first turn) and hands on to
  // the next consumer's barrier (but for the last consumer's last turn). Two turns per key block
  // (S, then P V); with kOverlap one per block (S[n + 1] with P[n] V[n]) plus one at each end.
  const int turns = n_blocks == 0 ? 0 : kOverlap ? n_blocks + 1 : 2 * n_blocks;
  int turn = 0;
  auto turn_begin = [&]() {
    if constexpr (kPingPong) {
      if (cw != 0 || turn != 0) named_barrier_sync(1 + cw, 256);
    }
  };
  auto turn_end = [&]() {
    if constexpr (kPingPong) {
      if (cw != kConsumers - 1 || turn != turns - 1) named_barrier_arrive(1 + (cw + 1) % kConsumers, 256);
    }
    ++turn;
  };

  const uint32_t q_base = sQ + cw * 64 * 128;
  // S = Q K^T of this consumer's 64 rows against the K stage `stage` (issued, not waited).
  auto issue_s_gemm = [&](float (&s)[kNTilesS][4], int stage) {
    const uint32_t k_base = sK + stage * Traits::kTileKVBytes;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const uint32_t col_bytes = (kk % 4) * 32;
      const uint64_t desc_q = wgmma_desc_sw128(q_base + (kk / 4) * kBlockM * 128 + col_bytes, 16, kSwizzleAtom);
      const uint64_t desc_k = wgmma_desc_sw128(k_base + (kk / 4) * kBlockN * 128 + col_bytes, 16, kSwizzleAtom);
      Mma::ss(s, desc_q, desc_k, /*accumulate=*/kk > 0);
    }
  };
  // O += P V of the V stage `stage` (issued, not waited).
  auto issue_pv_gemm = [&](const uint32_t (&pa)[kNTilesS / 2][4], int stage) {
    const uint32_t v_base = sV + stage * Traits::kTileKVBytes;
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt)
      Mma::rs_trans_b(acc_o, pa[kt], wgmma_desc_sw128(v_base + kt * 16 * 128, kBlockN * 128, kSwizzleAtom),
                      /*accumulate=*/1);
  };
  // Mask, online softmax and dropout of key block n_block; returns the correction of O so far.
  auto softmax_block = [&](float (&s)[kNTilesS][4], int n_block, float (&correction)[2]) {
    const int n0 = n_block * kBlockN;
    if (n0 + kBlockN > seq.seqlen_k || (causal && n0 + kBlockN - 1 > m0 + diag))
      wg_mask_scores(s, n0, row0, seq.seqlen_k, causal, diag, t);
    wg_softmax_block(s, row_max, row_sum, scale_log2, correction);
    if constexpr (Traits::kDropout) dropout_apply_rows(s, rng, batch_head, row0, n0, t, dropout_top);
  };
  // A warp's arrival on a stage's "empty" barrier once its GEMM reading the stage has completed.
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbarrier_arrive(bar);
  };

  if (n_blocks > 0) mbarrier_wait(bar_q, 0);
  if constexpr (!kOverlap) {
    PipelineState<kStages> st;
    for (int n_block = 0; n_block < n_blocks; ++n_block) {
      float s[kNTilesS][4];
      turn_begin();
      mbarrier_wait(bar_k_full(st.index), st.phase);
      wgmma_fence();
      issue_s_gemm(s, st.index);
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_operands(s);
      release(bar_k_empty(st.index));

      float correction[2];
      softmax_block(s, n_block, correction);
      wg_scale_rows(acc_o, correction);
      uint32_t pa[kNTilesS / 2][4];
      pack_rs_a_fragments<Element>(s, pa);

      turn_begin();
      mbarrier_wait(bar_v_full(st.index), st.phase);
      fence_operands(acc_o);
      wgmma_fence();
      issue_pv_gemm(pa, st.index);
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(pa);
      release(bar_v_empty(st.index));
      st.advance();
    }
  } else if (n_blocks > 0) {
    // Intra-warpgroup overlap: S[n + 1] and P[n] V[n] are issued in one turn; the softmax of
    // block n + 1 runs while P[n] V[n] is still on the tensor cores; the O rescale waits for it.
    PipelineState<kStages> st_k, st_v;  // K runs one block ahead of V
    uint32_t pa[kNTilesS / 2][4];
    {
      float s[kNTilesS][4];
      turn_begin();
      mbarrier_wait(bar_k_full(st_k.index), st_k.phase);
      wgmma_fence();
      issue_s_gemm(s, st_k.index);
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_operands(s);
      release(bar_k_empty(st_k.index));
      st_k.advance();
      float correction[2];
      softmax_block(s, 0, correction);  // O is still zero: no rescale
      pack_rs_a_fragments<Element>(s, pa);
    }
    for (int n_block = 0; n_block + 1 < n_blocks; ++n_block) {
      float s[kNTilesS][4];
      turn_begin();
      mbarrier_wait(bar_k_full(st_k.index), st_k.phase);
      mbarrier_wait(bar_v_full(st_v.index), st_v.phase);
      fence_operands(acc_o);
      wgmma_fence();
      issue_s_gemm(s, st_k.index);
      wgmma_commit();
      issue_pv_gemm(pa, st_v.index);
      wgmma_commit();
      turn_end();
      wgmma_wait<1>();  // S[n + 1] done; P[n] V[n] may still run
      fence_operands(s);
      release(bar_k_empty(st_k.index));
      st_k.advance();
      float correction[2];
      softmax_block(s, n_block + 1, correction);
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(pa);
      release(bar_v_empty(st_v.index));
      st_v.advance();
      wg_scale_rows(acc_o, correction);
      pack_rs_a_fragments<Element>(s, pa);
    }
    turn_begin();
    mbarrier_wait(bar_v_full(st_v.index), st_v.phase);
    fence_operands(acc_o);
    wgmma_fence();
    issue_pv_gemm(pa, st_v.index);
    wgmma_commit();
    turn_end();
    wgmma_wait<0>();
    fence_operands(acc_o);
    fence_operands(pa);
    release(bar_v_empty(st_v.index));
  }

  // Epilogue: O = acc / sum (x 256 / (256 - t) with dropout), LSE = max * scale + ln(sum), +inf
  // for rows that see no key.
  float keep_scale = 1.0f;
  if constexpr (Traits::kDropout) keep_scale = static_cast<float>(dropout_keep_scale(dropout_threshold(p.dropout_p)));
  Element* const s_o = reinterpret_cast<Element*>(smem_raw + (sO + cw * uint32_t(Traits::kStagedOBytes) - raw));
  unsigned char* const s_o_in_q = smem_raw + (q_base - raw);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = warp_quad_sum(row_sum[r]);
    const int row_in_wg = warp * 16 + g + 8 * r;
    const float inv = sum > 0.0f ? keep_scale / sum : 0.0f;
#pragma unroll
    for (int i = 0; i < kNTilesO; ++i) {
      const uint32_t pair = Ops::pack(acc_o[i][2 * r] * inv, acc_o[i][2 * r + 1] * inv);
      if constexpr (Traits::kStageOInQ) {
        StagedOInQ<Traits>::put(s_o_in_q, row_in_wg, i * 8 + 2 * t, pair);
      } else {
        StagedO::put(s_o, row_in_wg, i * 8 + 2 * t, pair);
      }
    }
    if (t == 0 && row0 + 8 * r < seq.seqlen_q)
      global.lse[row_local0 + 8 * r] = sum > 0.0f ? row_max[r] * scale + logf(sum) : INFINITY;
  }
  named_barrier_sync(1 + kConsumers + cw, 128);
  Element* const o_rows = global.o + int64_t{cw} * 64 * p.o_row_stride;
  if constexpr (Traits::kStageOInQ) {
    StagedOInQ<Traits>::copy_out(s_o_in_q, o_rows, p.o_row_stride, seq.seqlen_q - m0 - cw * 64, ctid);
  } else {
    StagedO::template copy_out<128>(s_o, o_rows, p.o_row_stride, seq.seqlen_q - m0 - cw * 64, ctid);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma: the launcher never picks this kernel there
#endif
}

}  // namespace flashgpt::attn

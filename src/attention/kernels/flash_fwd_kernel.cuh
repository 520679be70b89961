// The fused forward kernel (FlashAttention-2, Dao 2023, Algorithm 1): one CTA per
// (query block, head, batch entry); each warp owns 16 query rows. For each key block it
// computes S = Q K^T on tensor cores, masks, updates the running row max and sum (online
// softmax, in base 2 with the scale folded in), applies dropout to P in registers and
// accumulates O += P V, with K/V tiles double-buffered through cp.async. It writes O and
// LSE = max * scale + ln(sum) (fp32, +inf for a row that sees no key).
#pragma once

#include "flash_common.cuh"

namespace flashgpt::attn {

// Tile shape of one forward instance. Each warp owns kMTiles m16 tiles of query rows: the
// K and V fragments it loads from shared memory then feed kMTiles MMAs each, which is what
// bounds an mma.sync kernel (shared-memory bandwidth), at the price of registers.
template <int kHeadDim_, int kBlockN_, int kNWarps_, int kMTiles_, typename Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kNWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStride = kHeadDim + 8;  // padded shared row, see flash_common.cuh
  static constexpr int kNTilesS = kBlockN / 8;  // n8 tiles of S per warp
  static constexpr int kNTilesO = kHeadDim / 8;  // n8 tiles of O per warp
  static_assert(kHeadDim % 16 == 0, "head_dim must be a multiple of the mma k (16)");
  static_assert(kBlockN % 16 == 0, "key blocks are consumed as k16 tiles by the P V product");
  static_assert((kHeadDim / 8) % 2 == 0, "padded rows must be an odd number of 16-byte units");
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemKV = kBlockN * kStride;
  static constexpr size_t kSmemBytes = sizeof(Element) * (kSmemQ + 4 * kSmemKV);  // Q, K x2, V x2
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) flash_fwd_kernel(const KernelParams p, float scale) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kStride, kThreads = Traits::kThreads;
  constexpr int kNTilesS = Traits::kNTilesS, kNTilesO = Traits::kNTilesO;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + Traits::kSmemQ;                 // [2][kBlockN][kStride]
  Element* sV = sK + 2 * Traits::kSmemKV;            // [2][kBlockN][kStride]

  const int m_block = blockIdx.x, head = blockIdx.y, b = p.batch_begin + int(blockIdx.z);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const SeqInfo seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const bool causal = p.mask == Mask::causal;
  const int diag = seq.seqlen_k - seq.seqlen_q;  // row i sees col j iff j <= i + diag
  const FwdGlobal<Element> global(p, seq, b, head, m0, kBlockM, kBlockN, causal, diag);
  const Element *gQ = global.q, *gK = global.k, *gV = global.v;
  Element* gO = global.o;
  float* gLse = global.lse;
  const int n_blocks = global.n_blocks;

  // Rows of this thread: m0 + warp * kWarpRows + mt * 16 + g (+ 8), for mt < kMTiles.
  constexpr int kMTiles = Traits::kMTiles;
  const int row_local0 = warp * Traits::kWarpRows + g;
  float acc_o[kMTiles][kNTilesO][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < kNTilesO; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.0f;
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  const float scale_log2 = scale * kLog2e;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const bool use_dropout = dropout_enabled(threshold);
  const uint32_t dropout_top = dropout_top_threshold(threshold);
  const DropoutRng rng = p.rng_device != nullptr ? *p.rng_device : p.rng;  // a graph replay's per-step stream
  const int64_t batch_head = int64_t{b} * p.heads_q + head;

  if (n_blocks > 0) {
    const int valid_q = seq.seqlen_q - m0;
    load_tile_async<kBlockM, kHeadDim, kStride, kThreads>(sQ, gQ, p.q_row_stride, valid_q, tid);
    load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sK, gK, p.k_row_stride, seq.seqlen_k, tid);
    cp_async_commit();
    load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sV, gV, p.v_row_stride, seq.seqlen_k, tid);
    cp_async_commit();
  }

  for (int n_block = 0; n_block < n_blocks; ++n_block) {
    const int buf = n_block & 1;
    const int n0 = n_block * kBlockN;
    const Element* sKb = sK + buf * Traits::kSmemKV;
    const Element* sVb = sV + buf * Traits::kSmemKV;
    cp_async_wait<1>();  // Q and K[n_block] have landed; V[n_block] may still be in flight
    __syncthreads();
    if (n_block + 1 < n_blocks) {  // the other K buffer was last read in the previous iteration
      const int n1 = n0 + kBlockN;
      load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sK + (buf ^ 1) * Traits::kSmemKV, gK + n1 * p.k_row_stride,
                                                            p.k_row_stride, seq.seqlen_k - n1, tid);
    }
    cp_async_commit();

    // S = Q K^T for this warp's rows: kMTiles x kNTilesS tiles of m16n8.
    float s[kMTiles][kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < kNTilesS; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ldmatrix_x4(a[mt], smem_u32(sQ + (warp * Traits::kWarpRows + mt * 16 + ldm_row_pattern_row(lane)) * kStride +
                                    kk * 16 + ldm_row_pattern_col(lane)));
#pragma unroll
      for (int np = 0; np < kNTilesS / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, smem_u32(sKb + (np * 16 + ldm_pair_pattern_row(lane)) * kStride + kk * 16 +
                                 ldm_pair_pattern_col(lane)));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Ops::mma(s[mt][2 * np], a[mt], bk[0], bk[1]);
          Ops::mma(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Mask: columns past the sequence, and the causal triangle.
    const bool need_mask = n0 + kBlockN > seq.seqlen_k || (causal && n0 + kBlockN - 1 > m0 + diag);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n0 + nt * 8 + 2 * t + (e & 1);
            const int row = m0 + row_local0 + mt * 16 + (e >> 1) * 8;
            if (col >= seq.seqlen_k || (causal && col > row + diag)) s[mt][nt][e] = -INFINITY;
          }
        }
    }

    // Online softmax, two rows per thread and m tile, four threads per row.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = warp_quad_max(mx);
        const float base = mx == -INFINITY ? 0.0f : mx * scale_log2;
        const float correction = exp2f(row_max[mt][r] * scale_log2 - base);  // 0 when the old max is -inf
        row_max[mt][r] = mx;
        row_sum[mt][r] *= correction;
#pragma unroll
        for (int i = 0; i < kNTilesO; ++i) {
          acc_o[mt][i][2 * r] *= correction;
          acc_o[mt][i][2 * r + 1] *= correction;
        }
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          s[mt][nt][2 * r] = exp2f(s[mt][nt][2 * r] * scale_log2 - base);
          s[mt][nt][2 * r + 1] = exp2f(s[mt][nt][2 * r + 1] * scale_log2 - base);
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] += sum;  // this thread's part; reduced across the quad at the end
      }
    }

    if (use_dropout) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        dropout_apply_rows(s[mt], rng, batch_head, m0 + row_local0 + mt * 16, n0, t, dropout_top);
    }

    cp_async_wait<1>();  // V[n_block] has landed; K[n_block + 1] may still be in flight
    __syncthreads();
    if (n_block + 1 < n_blocks) {  // the other V buffer was last read before the barrier above
      const int n1 = n0 + kBlockN;
      load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(sV + (buf ^ 1) * Traits::kSmemKV, gV + n1 * p.v_row_stride,
                                                            p.v_row_stride, seq.seqlen_k - n1, tid);
    }
    cp_async_commit();

    // O += P V: P's C fragments become A fragments, one k16 tile per pair of n8 tiles.
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = Ops::pack(s[mt][2 * kt][0], s[mt][2 * kt][1]);
        a[mt][1] = Ops::pack(s[mt][2 * kt][2], s[mt][2 * kt][3]);
        a[mt][2] = Ops::pack(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
        a[mt][3] = Ops::pack(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kNTilesO / 2; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, smem_u32(sVb + (kt * 16 + ldm_row_pattern_row(lane)) * kStride + dp * 16 +
                                       ldm_row_pattern_col(lane)));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Ops::mma(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          Ops::mma(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: O = acc / sum * 256 / (256 - t), LSE = max * scale + ln(sum), +inf for empty rows.
  const float keep_scale = static_cast<float>(dropout_keep_scale(threshold));
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = warp_quad_sum(row_sum[mt][r]);
      const int row_local = row_local0 + mt * 16 + 8 * r;
      const bool row_valid = m0 + row_local < seq.seqlen_q;
      const float inv = sum > 0.0f ? keep_scale / sum : 0.0f;
      if (row_valid) {
        Element* out = gO + row_local * p.o_row_stride;
#pragma unroll
        for (int i = 0; i < kNTilesO; ++i) {
          *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) =
              Ops::pack(acc_o[mt][i][2 * r] * inv, acc_o[mt][i][2 * r + 1] * inv);
        }
        if (t == 0) gLse[row_local] = sum > 0.0f ? row_max[mt][r] * scale + logf(sum) : INFINITY;
      }
    }
  }
}

}  // namespace flashgpt::attn

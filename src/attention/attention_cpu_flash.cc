// FlashAttention on the CPU (Dao et al. 2022): the forward is Algorithms 1/2, the
// backward Algorithm 4 split in two passes. "Slow memory" is the strided tensors,
// "on-chip" is a per-thread tile buffer of about M floats; an IoCounter counts every
// float copied between the two, which is the quantity of the paper's Theorem 2.
//
// Forward, one work item per (sequence, query head, row block of Br rows):
//   load Q_i; for each column block K_j, V_j (Bc keys) that the row block sees:
//     S = scale Q_i K_j^T, new row max m', l = l e^{m - m'} + rowsum(e^{S - m'}),
//     O_i = O_i e^{m - m'} + dropout(e^{S - m'}) V_j
//   store O_i / l and LSE_i = m + log l (pre-dropout); O = 0 and LSE = +inf for rows
//   that see no key.
// Backward, with P = exp(scale Q K^T - LSE) recomputed and D_i = rowsum(dO_i * O_i)
// (= sum_j P_ij dP~_ij because O = dropout(P) V):
//   dP~_ij = dropout(dO_i . V_j),  dS_ij = P_ij (dP~_ij - D_i),
//   dV_j = sum_i dropout(P)_ij dO_i,  dK_j = scale sum_i dS_ij Q_i,  dQ_i = scale sum_j dS_ij K_j.
// The paper accumulates dQ_i in slow memory from every column block, which races when
// column blocks run in parallel. We run pass A over (sequence, kv head, column block) for
// dK_j, dV_j (summing the query heads of the group in a fixed order) and pass B over
// (sequence, query head, row block) for dQ_i: P and dP~ are recomputed once more (about
// 40% more arithmetic), but there are no atomics and no per-thread copies of dQ, and the
// result is bit-identical for any thread count.
//
// S and dP~ are consumed one row at a time (every row's online softmax is independent),
// so a tile holds one row of scores rather than Br x Bc of them.
#include "attention_cpu_common.h"
#include "attention_cpu_simd.h"

#include <flashgpt/attention_cpu.h>
#include <flashgpt/cpu_isa.h>
#include <flashgpt/error.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace flashgpt {
namespace {

using attention_cpu::AttentionTensors;
using attention_cpu::CpuDropout;
using attention_cpu::CpuSequence;
using attention_cpu::StridedTensor;
using attention_cpu::simd_exp;
using attention_cpu::simd_lanes_below;
using attention_cpu::simd_load;
using attention_cpu::simd_max;
using attention_cpu::simd_splat;
using attention_cpu::simd_store;
using attention_cpu::simd_sum;
using attention_cpu::tile_product;
using attention_cpu::TileProduct;

// The max_rows rule keeps Bc short: the inner loops run over head_dim, so a long Bc buys
// nothing on the CPU, and every float it takes from the budget is a query row fewer. K_j
// and V_j get at most an eighth of M, and never more than 32 keys.
constexpr int64_t kMaxRowsBlockCols = 32;
constexpr int64_t kMaxRowsKvShare = 16;  // Bc = ceil(M / 16 d): 2 Bc d <= M / 8
// Tiles larger than this only waste memory: no CPU cache is that big.
constexpr int64_t kMaxBlock = 1 << 16;
// The tile products step over head_dim in whole registers of the widest ISA.
static_assert(std::all_of(kAttentionHeadDims.begin(), kAttentionHeadDims.end(),
                          [](int d) { return d % attention_cpu::kSimdMaxWidth == 0; }),
              "every head_dim attention_validate admits must be a multiple of kSimdMaxWidth");
// Every tile starts on a cache line (64 bytes).
constexpr int64_t kTileAlign = 16;  // floats

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row length of the score-shaped tiles (S, P, dS, K^T, V^T): Bc padded to whole registers.
int64_t score_ld(CpuTileShape t) { return round_up(t.block_cols, attention_cpu::kSimdMaxWidth); }

float dot(const float* __restrict a, const float* __restrict b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int x = 0; x < n; ++x) acc += a[x] * b[x];
  return acc;
}

// Which token axis a tile's rows index: query rows (Q, O, dO, dQ) or keys (K, V, dK, dV).
enum class TileRows { queries, keys };

int64_t tile_first_row(const CpuSequence& seq, TileRows side, int64_t row0) {
  return (side == TileRows::keys ? seq.k_row0 : seq.q_row0) + row0;
}

// Rows [row0, row0 + rows) of one head of `src` into a contiguous (rows, D) tile.
void tile_load(const StridedTensor<const float>& src, const CpuSequence& seq, int64_t row0, int head, int rows, int d,
               float* tile, TileRows side) {
  const int64_t first = tile_first_row(seq, side, row0);
  for (int r = 0; r < rows; ++r)
    std::memcpy(tile + int64_t{r} * d, src.at(seq.batch, first + r, head), sizeof(float) * d);
}

// Keys [row0, row0 + rows) of one head of `src` (K or V) into a (D, ld) tile, transposed;
// columns [rows, round_up(rows, kSimdMaxWidth)) become 0, so that scores over whole registers
// stay finite.
void tile_load_transposed(const StridedTensor<const float>& src, const CpuSequence& seq, int64_t row0, int head,
                          int rows, int d, int64_t ld, float* tile) {
  for (int r = 0; r < rows; ++r) {
    const float* in = src.at(seq.batch, seq.k_row0 + row0 + r, head);
    for (int x = 0; x < d; ++x) tile[int64_t{x} * ld + r] = in[x];
  }
  const int64_t padded = round_up(rows, attention_cpu::kSimdMaxWidth);
  for (int x = 0; x < d; ++x) std::fill(tile + int64_t{x} * ld + rows, tile + int64_t{x} * ld + padded, 0.0f);
}

// A (D, ld) tile, transposed from a (rows, D) tile already loaded, padded as above.
void tile_transpose(const float* tile, int rows, int d, int64_t ld, float* out) {
  for (int r = 0; r < rows; ++r) {
    for (int x = 0; x < d; ++x) out[int64_t{x} * ld + r] = tile[int64_t{r} * d + x];
  }
  const int64_t padded = round_up(rows, attention_cpu::kSimdMaxWidth);
  for (int x = 0; x < d; ++x) std::fill(out + int64_t{x} * ld + rows, out + int64_t{x} * ld + padded, 0.0f);
}

// scale * a contiguous (rows, D) tile into rows [row0, row0 + rows) of one head of `dst`.
void tile_store(const float* tile, float scale, const StridedTensor<float>& dst, const CpuSequence& seq, int64_t row0,
                int head, int rows, int d, TileRows side) {
  const int64_t first = tile_first_row(seq, side, row0);
  for (int r = 0; r < rows; ++r) {
    float* out = dst.at(seq.batch, first + r, head);
    for (int c = 0; c < d; ++c) out[c] = scale * tile[int64_t{r} * d + c];
  }
}

int resolve_threads(const CpuTiling& tiling) { return tiling.threads > 0 ? tiling.threads : omp_get_max_threads(); }

// Carves consecutive tiles, each on a cache line, out of one thread's workspace.
struct TileCarver {
  float* next;
  int64_t used = 0;
  float* take(int64_t floats) {
    float* tile = next;
    const int64_t size = round_up(floats, kTileAlign);
    next += size;
    used += size;
    return tile;
  }
};

// One thread's on-chip buffers for the forward pass; ld = score_ld(t).
struct ForwardTiles {
  float* q;        // (Br, D)
  float* o;        // (Br, D): O_i before the division by l
  float* k_t;      // (D, ld): K_j transposed, so that a row of S is a run of registers over keys
  float* v;        // (Bc, D)
  float* s;        // (Br, ld): S, then dropout(exp(S - m'))
  float* mult;     // (ld): one row's dropout multipliers
  float* row_max;  // (Br): m
  float* row_sum;  // (Br): l
  int64_t floats_used;
  ForwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t rd = int64_t{t.block_rows} * d, cd = int64_t{t.block_cols} * d, ld = score_ld(t);
    TileCarver c{base};
    q = c.take(rd), o = c.take(rd), k_t = c.take(d * ld), v = c.take(cd), s = c.take(t.block_rows * ld);
    mult = c.take(ld), row_max = c.take(t.block_rows), row_sum = c.take(t.block_rows);
    floats_used = c.used;
  }
  static int64_t floats(CpuTileShape t, int d) { return ForwardTiles(nullptr, t, d).floats_used; }
};

// One thread's on-chip buffers for the backward passes: pass A uses all but dq and k,
// pass B all but dk and dv.
struct BackwardTiles {
  float* q;     // (Br, D)
  float* d_o;   // (Br, D)
  float* dq;    // (Br, D)
  float* k;     // (Bc, D): for dQ_i += dS K_j
  float* k_t;   // (D, ld): K_j transposed, for S = Q K^T
  float* v_t;   // (D, ld): V_j transposed, for dP = dO V^T
  float* dk;    // (Bc, D)
  float* dv;    // (Bc, D)
  float* lse;   // (Br)
  float* dsum;  // (Br): D_i
  float* mult;  // (ld): one row's dropout multipliers
  float* p;     // (Br, ld): S, then dropout(P)
  float* ds;    // (Br, ld): dP, then dS
  int64_t floats_used;
  BackwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t rd = int64_t{t.block_rows} * d, cd = int64_t{t.block_cols} * d, ld = score_ld(t);
    TileCarver c{base};
    q = c.take(rd), d_o = c.take(rd), dq = c.take(rd), k = c.take(cd), k_t = c.take(d * ld), v_t = c.take(d * ld);
    dk = c.take(cd), dv = c.take(cd), lse = c.take(t.block_rows), dsum = c.take(t.block_rows), mult = c.take(ld);
    p = c.take(t.block_rows * ld), ds = c.take(t.block_rows * ld);
    floats_used = c.used;
  }
  static int64_t floats(CpuTileShape t, int d) { return BackwardTiles(nullptr, t, d).floats_used; }
};

// What every work item of one call needs.
struct FlashProblem {
  const AttentionParams& p;
  AttentionTensors<float> t;
  CpuDropout drop;
  CpuTileShape tile;
  int64_t ld;  // score_ld(tile)
  float scale;
  int d;
  int group;                   // query heads per kv head
  int row_blocks, col_blocks;  // of the longest sequence
  int64_t total_q;
};

FlashProblem flash_problem(const AttentionParams& p, const CpuTiling& tiling) {
  const CpuTileShape tile = attention_cpu_tile_shape(tiling, p.head_dim);
  return {p,
          attention_cpu::attention_tensors<float>(p),
          attention_cpu::cpu_dropout(p),
          tile,
          score_ld(tile),
          attention_softmax_scale(p),
          p.head_dim,
          p.heads_q / p.heads_kv,
          static_cast<int>(ceil_div(p.seqlen_q, tile.block_rows)),
          static_cast<int>(ceil_div(p.seqlen_k, tile.block_cols)),
          attention_cpu::attention_total_q(p)};
}

struct IoTally {
  uint64_t read = 0, written = 0;  // floats
};

// The score-shaped product out = A B^T of a (rows, D) tile and a transposed (D, ld) tile, over
// `cols` keys (a multiple of the ISA's width): S = Q K^T, dP = dO V^T.
TileProduct scores_product(const float* a, const float* b_t, int64_t ld, int rows, int cols, int d, float* out) {
  return {a, d, 1, b_t, ld, out, ld, rows, cols, d, /*accumulate=*/false};
}

// ---- forward -------------------------------------------------------------------------

// One online-softmax step of query row r over keys [0, end) of the loaded block: turns the
// unscaled scores s into dropout(exp(scale s - m')), updates m and l, and rescales O_r by
// exp(m - m'). s[end, width) becomes 0, so that the block's product P V adds nothing there.
template <class S>
FLASHGPT_SIMD_INLINE void online_softmax_row(const FlashProblem& f, ForwardTiles& tl, int r, int end, int width,
                                             int64_t batch_head, int64_t row, int j0, float* s) {
  using V = typename S::Vec;
  if (end == 0) {
    std::fill(s, s + width, 0.0f);
    return;
  }
  // Whole registers below `full`, one masked register at the tail, zeros after it.
  const int full = end / S::kWidth * S::kWidth, tail = static_cast<int>(round_up(end, S::kWidth));
  V running_max = simd_splat<S>(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < full; c += S::kWidth) {
    const V x = simd_load<S>(s + c);
    running_max = x > running_max ? x : running_max;
  }
  if (full < tail) {
    const V x = simd_load<S>(s + full);
    running_max = (simd_lanes_below<S>(full, end) & (x > running_max)) ? x : running_max;
  }
  // scale > 0 and rounding is monotone, so max(scale s) = scale max(s) exactly.
  const float block_max = f.scale * simd_max<S>(running_max);
  const float new_max = std::max(tl.row_max[r], block_max);
  const float rescale = std::exp(tl.row_max[r] - new_max);  // 0 on the first block: m = -inf
  if (f.drop.enabled) {
    attention_cpu::dropout_row_multipliers(f.drop, batch_head, row, j0, j0 + end, tl.mult);
    std::fill(tl.mult + end, tl.mult + tail, 0.0f);
  }
  const V scale = simd_splat<S>(f.scale), shift = simd_splat<S>(new_max);
  V sum{};
  for (int c = 0; c < tail; c += S::kWidth) {
    V e = simd_exp<S>(simd_load<S>(s + c) * scale - shift);
    if (c == full) e = simd_lanes_below<S>(c, end) ? e : V{};
    sum += e;
    if (f.drop.enabled) e *= simd_load<S>(tl.mult + c);
    simd_store<S>(s + c, e);
  }
  std::fill(s + tail, s + width, 0.0f);
  tl.row_sum[r] = tl.row_sum[r] * rescale + simd_sum<S>(sum);
  tl.row_max[r] = new_max;
  float* o_row = tl.o + int64_t{r} * f.d;
  const V o_scale = simd_splat<S>(rescale);
  for (int x = 0; x < f.d; x += S::kWidth) simd_store<S>(o_row + x, simd_load<S>(o_row + x) * o_scale);
}

// Algorithm 1 for one row block: rows [i0, i0 + Br) of query head h of sequence seq. Per key
// block: S = Q_i K_j^T as one tile product, the online softmax row by row, O_i += P V_j as
// another.
template <class S>
FLASHGPT_SIMD_INLINE void flash_forward_row_block(const FlashProblem& f, const CpuSequence& seq, int h, int i0,
                                                  ForwardTiles& tl, IoTally& io) {
  const int d = f.d, head_kv = h / f.group;
  const int rows = std::min(f.tile.block_rows, seq.len_q - i0);
  const int64_t batch_head = int64_t{seq.index} * f.p.heads_q + h;
  tile_load(f.t.q, seq, i0, h, rows, d, tl.q, TileRows::queries);
  io.read += uint64_t(rows) * d;
  std::fill(tl.o, tl.o + int64_t{rows} * d, 0.0f);
  std::fill(tl.row_max, tl.row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(tl.row_sum, tl.row_sum + rows, 0.0f);

  const int col_end = seq.key_end(i0 + rows - 1);  // the last row sees the most keys
  for (int j0 = 0; j0 < col_end; j0 += f.tile.block_cols) {
    const int cols = std::min(f.tile.block_cols, col_end - j0);
    tile_load_transposed(f.t.k, seq, j0, head_kv, cols, d, f.ld, tl.k_t);
    tile_load(f.t.v, seq, j0, head_kv, cols, d, tl.v, TileRows::keys);
    io.read += 2 * uint64_t(cols) * d;
    const int width = static_cast<int>(round_up(cols, S::kWidth));
    tile_product<S>(scores_product(tl.q, tl.k_t, f.ld, rows, width, d, tl.s));
    for (int r = 0; r < rows; ++r) {
      const int end = std::clamp(seq.key_end(i0 + r) - j0, 0, cols);
      online_softmax_row<S>(f, tl, r, end, width, batch_head, i0 + r, j0, tl.s + r * f.ld);
    }
    tile_product<S>({tl.s, f.ld, 1, tl.v, d, tl.o, d, rows, d, cols, /*accumulate=*/true});
  }

  float* lse = f.p.lse + seq.lse_offset + h * f.p.lse_head_stride + i0;
  for (int r = 0; r < rows; ++r) {
    float* o_row = tl.o + int64_t{r} * d;
    if (tl.row_sum[r] == 0.0f) {  // no key: O = 0 (already), LSE = +inf
      lse[r] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv_sum = 1.0f / tl.row_sum[r];
    for (int x = 0; x < d; ++x) o_row[x] *= inv_sum;
    lse[r] = tl.row_max[r] + std::log(tl.row_sum[r]);
  }
  tile_store(tl.o, 1.0f, f.t.o, seq, i0, h, rows, d, TileRows::queries);
  io.written += uint64_t(rows) * d + rows;
}

// ---- backward ------------------------------------------------------------------------

// One row of the backward for keys [0, end) of the loaded column block: from the unscaled
// scores in p_row and dP = dO V^T in ds_row, recomputes P = exp(scale S - LSE) and leaves
// dropout(P) in p_row and dS = P (dP~ - D_i) in ds_row, both 0 in [end, width).
template <class S>
FLASHGPT_SIMD_INLINE void flash_backward_row(const FlashProblem& f, BackwardTiles& tl, int r, int end, int width,
                                             int64_t batch_head, int64_t row, int j0, float* __restrict p_row,
                                             float* __restrict ds_row) {
  using V = typename S::Vec;
  if (end == 0) {
    std::fill(p_row, p_row + width, 0.0f);
    std::fill(ds_row, ds_row + width, 0.0f);
    return;
  }
  const int full = end / S::kWidth * S::kWidth, tail = static_cast<int>(round_up(end, S::kWidth));
  if (f.drop.enabled) {
    attention_cpu::dropout_row_multipliers(f.drop, batch_head, row, j0, j0 + end, tl.mult);
    std::fill(tl.mult + end, tl.mult + tail, 0.0f);
  }
  const V scale = simd_splat<S>(f.scale), lse = simd_splat<S>(tl.lse[r]), dsum = simd_splat<S>(tl.dsum[r]);
  for (int c = 0; c < tail; c += S::kWidth) {
    V prob = simd_exp<S>(simd_load<S>(p_row + c) * scale - lse);
    if (c == full) prob = simd_lanes_below<S>(c, end) ? prob : V{};
    V dp = simd_load<S>(ds_row + c);
    if (f.drop.enabled) {
      const V mult = simd_load<S>(tl.mult + c);
      dp *= mult;
      simd_store<S>(p_row + c, prob * mult);
    } else {
      simd_store<S>(p_row + c, prob);
    }
    simd_store<S>(ds_row + c, prob * (dp - dsum));
  }
  std::fill(p_row + tail, p_row + width, 0.0f);
  std::fill(ds_row + tail, ds_row + width, 0.0f);
}

// Loads the row-side tiles of rows [i0, i0 + rows) of query head h: Q, dO, LSE and D.
void flash_backward_load_rows(const FlashProblem& f, const CpuSequence& seq, int h, int i0, int rows, const float* dsum,
                              BackwardTiles& tl, IoTally& io) {
  tile_load(f.t.q, seq, i0, h, rows, f.d, tl.q, TileRows::queries);
  tile_load(f.t.d_o, seq, i0, h, rows, f.d, tl.d_o, TileRows::queries);
  const float* lse = f.p.lse + seq.lse_offset + h * f.p.lse_head_stride + i0;
  std::copy(lse, lse + rows, tl.lse);
  const float* dsum_rows = dsum + h * f.total_q + seq.token0 + i0;
  std::copy(dsum_rows, dsum_rows + rows, tl.dsum);
  io.read += 2 * uint64_t(rows) * f.d + 2 * uint64_t(rows);
}

// The (Br, width) tiles of dropout(P) and dS of rows [i0, i0 + rows) against the loaded key
// block [j0, j0 + cols): two tile products, then the rows.
template <class S>
FLASHGPT_SIMD_INLINE void flash_backward_scores(const FlashProblem& f, const CpuSequence& seq, int64_t batch_head,
                                                int i0, int rows, int j0, int cols, int width, BackwardTiles& tl) {
  tile_product<S>(scores_product(tl.q, tl.k_t, f.ld, rows, width, f.d, tl.p));    // S
  tile_product<S>(scores_product(tl.d_o, tl.v_t, f.ld, rows, width, f.d, tl.ds));  // dP = dO V^T
  for (int r = 0; r < rows; ++r) {
    const int end = std::clamp(seq.key_end(i0 + r) - j0, 0, cols);
    flash_backward_row<S>(f, tl, r, end, width, batch_head, i0 + r, j0, tl.p + r * f.ld, tl.ds + r * f.ld);
  }
}

// Pass A: dK_j and dV_j of key block [j0, j0 + Bc) of kv head head_kv, over every query
// head of its group and every row block that sees the keys.
template <class S>
FLASHGPT_SIMD_INLINE void flash_backward_col_block(const FlashProblem& f, const CpuSequence& seq, int head_kv, int j0,
                                                   const float* dsum, BackwardTiles& tl, IoTally& io) {
  const int d = f.d;
  const int cols = std::min(f.tile.block_cols, seq.len_k - j0);
  const int width = static_cast<int>(round_up(cols, S::kWidth));
  tile_load_transposed(f.t.k, seq, j0, head_kv, cols, d, f.ld, tl.k_t);
  tile_load_transposed(f.t.v, seq, j0, head_kv, cols, d, f.ld, tl.v_t);
  io.read += 2 * uint64_t(cols) * d;
  std::fill(tl.dk, tl.dk + int64_t{cols} * d, 0.0f);
  std::fill(tl.dv, tl.dv + int64_t{cols} * d, 0.0f);
  const int first_row = seq.first_row_seeing(j0);
  for (int h = head_kv * f.group; h < (head_kv + 1) * f.group; ++h) {
    const int64_t batch_head = int64_t{seq.index} * f.p.heads_q + h;
    for (int i0 = first_row - first_row % f.tile.block_rows; i0 < seq.len_q; i0 += f.tile.block_rows) {
      const int rows = std::min(f.tile.block_rows, seq.len_q - i0);
      flash_backward_load_rows(f, seq, h, i0, rows, dsum, tl, io);
      flash_backward_scores<S>(f, seq, batch_head, i0, rows, j0, cols, width, tl);
      // dV_j += dropout(P)^T dO_i and dK_j += dS^T Q_i: P and dS read transposed.
      tile_product<S>({tl.p, 1, f.ld, tl.d_o, d, tl.dv, d, cols, d, rows, /*accumulate=*/true});
      tile_product<S>({tl.ds, 1, f.ld, tl.q, d, tl.dk, d, cols, d, rows, /*accumulate=*/true});
    }
  }
  tile_store(tl.dk, f.scale, f.t.dk, seq, j0, head_kv, cols, d, TileRows::keys);
  tile_store(tl.dv, 1.0f, f.t.dv, seq, j0, head_kv, cols, d, TileRows::keys);
  io.written += 2 * uint64_t(cols) * d;
}

// Pass B: dQ_i of rows [i0, i0 + Br) of query head h, over every key block they see.
template <class S>
FLASHGPT_SIMD_INLINE void flash_backward_row_block(const FlashProblem& f, const CpuSequence& seq, int h, int i0,
                                                   const float* dsum, BackwardTiles& tl, IoTally& io) {
  const int d = f.d, head_kv = h / f.group;
  const int rows = std::min(f.tile.block_rows, seq.len_q - i0);
  const int64_t batch_head = int64_t{seq.index} * f.p.heads_q + h;
  flash_backward_load_rows(f, seq, h, i0, rows, dsum, tl, io);
  std::fill(tl.dq, tl.dq + int64_t{rows} * d, 0.0f);
  const int col_end = seq.key_end(i0 + rows - 1);
  for (int j0 = 0; j0 < col_end; j0 += f.tile.block_cols) {
    const int cols = std::min(f.tile.block_cols, col_end - j0);
    const int width = static_cast<int>(round_up(cols, S::kWidth));
    tile_load(f.t.k, seq, j0, head_kv, cols, d, tl.k, TileRows::keys);  // K_j once from slow memory,
    tile_transpose(tl.k, cols, d, f.ld, tl.k_t);                        // transposed from the tile
    tile_load_transposed(f.t.v, seq, j0, head_kv, cols, d, f.ld, tl.v_t);
    io.read += 2 * uint64_t(cols) * d;
    flash_backward_scores<S>(f, seq, batch_head, i0, rows, j0, cols, width, tl);
    tile_product<S>({tl.ds, f.ld, 1, tl.k, d, tl.dq, d, rows, d, cols, /*accumulate=*/true});  // dQ_i += dS K_j
  }
  tile_store(tl.dq, f.scale, f.t.dq, seq, i0, h, rows, d, TileRows::queries);
  io.written += uint64_t(rows) * d;
}

// ---- one copy of each work item per ISA ------------------------------------------------

using ForwardItem = void (*)(const FlashProblem&, const CpuSequence&, int, int, ForwardTiles&, IoTally&);
using BackwardItem = void (*)(const FlashProblem&, const CpuSequence&, int, int, const float*, BackwardTiles&,
                              IoTally&);
using ExpItem = void (*)(const float*, float*, int64_t);

struct FlashKernels {
  ForwardItem forward_row_block;
  BackwardItem backward_col_block, backward_row_block;
  ExpItem exp;
};

template <class S>
FLASHGPT_SIMD_INLINE void exp_body(const float* x, float* y, int64_t n) {
  float in[S::kWidth], out[S::kWidth];
  for (int64_t i = 0; i < n; i += S::kWidth) {
    const int64_t lanes = std::min<int64_t>(S::kWidth, n - i);
    std::fill(in, in + S::kWidth, 0.0f);
    std::copy(x + i, x + i + lanes, in);
    simd_store<S>(out, simd_exp<S>(simd_load<S>(in)));
    std::copy(out, out + lanes, y + i);
  }
}

#define FLASHGPT_FLASH_KERNELS(Simd, kTarget)                                                                   \
  kTarget void forward_row_block_##Simd(const FlashProblem& f, const CpuSequence& seq, int h, int i0,          \
                                        ForwardTiles& tl, IoTally& io) {                                       \
    flash_forward_row_block<Simd>(f, seq, h, i0, tl, io);                                                      \
  }                                                                                                            \
  kTarget void backward_col_block_##Simd(const FlashProblem& f, const CpuSequence& seq, int head_kv, int j0,   \
                                         const float* dsum, BackwardTiles& tl, IoTally& io) {                  \
    flash_backward_col_block<Simd>(f, seq, head_kv, j0, dsum, tl, io);                                         \
  }                                                                                                            \
  kTarget void backward_row_block_##Simd(const FlashProblem& f, const CpuSequence& seq, int h, int i0,         \
                                         const float* dsum, BackwardTiles& tl, IoTally& io) {                  \
    flash_backward_row_block<Simd>(f, seq, h, i0, dsum, tl, io);                                               \
  }                                                                                                            \
  kTarget void exp_##Simd(const float* x, float* y, int64_t n) { exp_body<Simd>(x, y, n); }                   \
  constexpr FlashKernels kKernels##Simd = {forward_row_block_##Simd, backward_col_block_##Simd,                 \
                                           backward_row_block_##Simd, exp_##Simd};

using attention_cpu::SimdAvx2;
using attention_cpu::SimdAvx512;
using attention_cpu::SimdBaseline;
FLASHGPT_FLASH_KERNELS(SimdBaseline, )
#if FLASHGPT_CPU_DISPATCH
FLASHGPT_FLASH_KERNELS(SimdAvx2, FLASHGPT_TARGET_AVX2)
FLASHGPT_FLASH_KERNELS(SimdAvx512, FLASHGPT_TARGET_AVX512)
#endif
#undef FLASHGPT_FLASH_KERNELS

const FlashKernels& flash_kernels(CpuIsa isa) {
#if FLASHGPT_CPU_DISPATCH
  if (isa == CpuIsa::avx512) return kKernelsSimdAvx512;
  if (isa == CpuIsa::avx2) return kKernelsSimdAvx2;
#endif
  (void)isa;
  return kKernelsSimdBaseline;
}

// The first cache line of a workspace sized with kTileAlign - 1 floats of slack.
float* workspace_aligned(std::vector<float>& workspace) {
  const auto address = reinterpret_cast<uintptr_t>(workspace.data());
  const uintptr_t line = kTileAlign * sizeof(float);
  return reinterpret_cast<float*>((address + line - 1) / line * line);
}

void io_add(IoCounter* io, const IoTally& tally) {
  if (io == nullptr) return;
  io->bytes_read += tally.read * sizeof(float);
  io->bytes_written += tally.written * sizeof(float);
}

}  // namespace

void attention_cpu::attention_cpu_exp(CpuIsa isa, const float* x, float* y, int64_t n) {
  flash_kernels(isa).exp(x, y, n);
}

CpuTileShape attention_cpu_tile_shape(const CpuTiling& tiling, int head_dim) {
  FLASHGPT_CHECK(head_dim > 0, "attention_cpu_tile_shape: head_dim must be positive, got {}", head_dim);
  FLASHGPT_CHECK(tiling.block_rows >= 0 && tiling.block_cols >= 0,
                 "CpuTiling: block_rows ({}) and block_cols ({}) must be >= 0 (0: from onchip_bytes)",
                 tiling.block_rows, tiling.block_cols);
  FLASHGPT_CHECK(tiling.threads >= 0, "CpuTiling: threads must be >= 0 (0: OpenMP's default), got {}", tiling.threads);
  CpuTileShape shape{tiling.block_rows, tiling.block_cols};
  if (shape.block_rows > 0 && shape.block_cols > 0) return shape;
  FLASHGPT_CHECK(tiling.onchip_bytes >= int64_t{sizeof(float)} * 4 * head_dim,
                 "CpuTiling: onchip_bytes {} is too small for head_dim {}: it must hold at least 4 rows of {} floats",
                 tiling.onchip_bytes, head_dim, head_dim);
  const int64_t m = tiling.onchip_bytes / int64_t{sizeof(float)};  // the paper's M, in floats
  const int64_t d = head_dim;
  int64_t block_cols = ceil_div(m, 4 * d), block_rows = 0;
  switch (tiling.rule) {
    case CpuTileRule::paper:
      block_rows = std::min(block_cols, d);
      break;
    case CpuTileRule::max_rows:
      block_cols = std::min(ceil_div(m, kMaxRowsKvShare * d), kMaxRowsBlockCols);
      // Q_i, O_i (2 Br d) + K_j, V_j (2 Bc d) + the S row block (Br Bc) <= M.
      block_rows = std::max<int64_t>(1, (m - 2 * block_cols * d) / (2 * d + block_cols));
      break;
  }
  if (shape.block_rows == 0) shape.block_rows = static_cast<int>(std::clamp<int64_t>(block_rows, 1, kMaxBlock));
  if (shape.block_cols == 0) shape.block_cols = static_cast<int>(std::clamp<int64_t>(block_cols, 1, kMaxBlock));
  return shape;
}

int64_t attention_cpu_workspace_bytes(const AttentionParams& p, AttentionPass pass, const CpuTiling& tiling) {
  const CpuTileShape tile = attention_cpu_tile_shape(tiling, p.head_dim);
  const int64_t threads = resolve_threads(tiling);
  // kTileAlign - 1 floats of slack put the first tile on a cache line.
  if (pass == AttentionPass::forward)
    return (threads * ForwardTiles::floats(tile, p.head_dim) + kTileAlign - 1) * int64_t{sizeof(float)};
  const int64_t dsum = int64_t{p.heads_q} * attention_cpu::attention_total_q(p);
  return (threads * BackwardTiles::floats(tile, p.head_dim) + dsum + kTileAlign - 1) * int64_t{sizeof(float)};
}

void attention_forward_cpu(const AttentionParams& params, const CpuTiling& tiling, IoCounter* io) {
  attention_cpu::cpu_check_params(params, AttentionPass::forward, "attention_forward_cpu",
                                  attention_cpu::DtypeCheck::require_f32);
  const FlashProblem f = flash_problem(params, tiling);
  const int threads = resolve_threads(tiling);
  std::vector<float> workspace(
      static_cast<size_t>(attention_cpu_workspace_bytes(params, AttentionPass::forward, tiling) / sizeof(float)));
  float* base = workspace_aligned(workspace);
  const int64_t per_thread = ForwardTiles::floats(f.tile, f.d);
  const ForwardItem forward_row_block = flash_kernels(cpu_isa()).forward_row_block;
  const int64_t items = int64_t{params.batch} * params.heads_q * f.row_blocks;
  uint64_t read = 0, written = 0;
  // Causal row blocks differ in cost by up to N / Bc column blocks: schedule dynamically.
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : read, written)
  for (int64_t item = 0; item < items; ++item) {
    const int b = static_cast<int>(item / (int64_t{params.heads_q} * f.row_blocks));
    const int h = static_cast<int>(item / f.row_blocks % params.heads_q);
    const int i0 = static_cast<int>(item % f.row_blocks) * f.tile.block_rows;
    const CpuSequence seq = attention_cpu::cpu_sequence(params, b);
    if (i0 >= seq.len_q) continue;
    ForwardTiles tiles(base + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    forward_row_block(f, seq, h, i0, tiles, tally);
    read += tally.read;
    written += tally.written;
  }
  io_add(io, {read, written});
}

void attention_backward_cpu(const AttentionParams& params, const CpuTiling& tiling, IoCounter* io) {
  attention_cpu::cpu_check_params(params, AttentionPass::backward, "attention_backward_cpu",
                                  attention_cpu::DtypeCheck::require_f32);
  const FlashProblem f = flash_problem(params, tiling);
  const int threads = resolve_threads(tiling);
  std::vector<float> workspace(
      static_cast<size_t>(attention_cpu_workspace_bytes(params, AttentionPass::backward, tiling) / sizeof(float)));
  const int64_t per_thread = BackwardTiles::floats(f.tile, f.d);
  float* base = workspace_aligned(workspace);
  float* dsum = base + threads * per_thread;  // (heads_q, total_q): D = rowsum(dO * O)
  const FlashKernels& kernels = flash_kernels(cpu_isa());
  uint64_t read = 0, written = 0;

  // Preprocess: D_i, one row per iteration.
  const int64_t query_rows = int64_t{params.batch} * params.seqlen_q;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : read, written)
  for (int64_t item = 0; item < query_rows; ++item) {
    const CpuSequence seq = attention_cpu::cpu_sequence(params, static_cast<int>(item / params.seqlen_q));
    const int i = static_cast<int>(item % params.seqlen_q);
    if (i >= seq.len_q) continue;
    for (int h = 0; h < params.heads_q; ++h) {
      const float* o_row = f.t.o.at(seq.batch, seq.q_row0 + i, h);
      const float* do_row = f.t.d_o.at(seq.batch, seq.q_row0 + i, h);
      dsum[h * f.total_q + seq.token0 + i] = dot(o_row, do_row, f.d);
    }
    read += 2 * uint64_t(params.heads_q) * f.d;
    written += params.heads_q;
  }

  // Pass A: dK, dV per (sequence, kv head, column block).
  const int64_t col_items = int64_t{params.batch} * params.heads_kv * f.col_blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : read, written)
  for (int64_t item = 0; item < col_items; ++item) {
    const int b = static_cast<int>(item / (int64_t{params.heads_kv} * f.col_blocks));
    const int head_kv = static_cast<int>(item / f.col_blocks % params.heads_kv);
    const int j0 = static_cast<int>(item % f.col_blocks) * f.tile.block_cols;
    const CpuSequence seq = attention_cpu::cpu_sequence(params, b);
    if (j0 >= seq.len_k) continue;
    BackwardTiles tiles(base + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    kernels.backward_col_block(f, seq, head_kv, j0, dsum, tiles, tally);
    read += tally.read;
    written += tally.written;
  }

  // Pass B: dQ per (sequence, query head, row block).
  const int64_t row_items = int64_t{params.batch} * params.heads_q * f.row_blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : read, written)
  for (int64_t item = 0; item < row_items; ++item) {
    const int b = static_cast<int>(item / (int64_t{params.heads_q} * f.row_blocks));
    const int h = static_cast<int>(item / f.row_blocks % params.heads_q);
    const int i0 = static_cast<int>(item % f.row_blocks) * f.tile.block_rows;
    const CpuSequence seq = attention_cpu::cpu_sequence(params, b);
    if (i0 >= seq.len_q) continue;
    BackwardTiles tiles(base + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    kernels.backward_row_block(f, seq, h, i0, dsum, tiles, tally);
    read += tally.read;
    written += tally.written;
  }
  io_add(io, {read, written});
}

}  // namespace flashgpt

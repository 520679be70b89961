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

#include <flashgpt/attention_cpu.h>
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

// The max_rows rule keeps Bc short: the inner loops run over head_dim, so a long Bc buys
// nothing on the CPU, and every float it takes from the budget is a query row fewer. K_j
// and V_j get at most an eighth of M, and never more than 32 keys.
constexpr int64_t kMaxRowsBlockCols = 32;
constexpr int64_t kMaxRowsKvShare = 16;  // Bc = ceil(M / 16 d): 2 Bc d <= M / 8
// Tiles larger than this only waste memory: no CPU cache is that big.
constexpr int64_t kMaxBlock = 1 << 16;
// score_row steps over head_dim four columns at a time, with no remainder loop.
constexpr int kHeadDimStep = 4;
static_assert(std::all_of(kAttentionHeadDims.begin(), kAttentionHeadDims.end(),
                          [](int d) { return d % kHeadDimStep == 0; }),
              "every head_dim attention_validate admits must be a multiple of kHeadDimStep");

float dot(const float* __restrict a, const float* __restrict b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int x = 0; x < n; ++x) acc += a[x] * b[x];
  return acc;
}

// y += alpha * x
void axpy(float alpha, const float* __restrict x, float* __restrict y, int n) {
#pragma omp simd
  for (int c = 0; c < n; ++c) y[c] += alpha * x[c];
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

// Keys [row0, row0 + rows) of one head of `src` (K or V) into a (D, ld) tile, transposed.
void tile_load_transposed(const StridedTensor<const float>& src, const CpuSequence& seq, int64_t row0, int head,
                          int rows, int d, int ld, float* tile) {
  for (int r = 0; r < rows; ++r) {
    const float* in = src.at(seq.batch, seq.k_row0 + row0 + r, head);
    for (int x = 0; x < d; ++x) tile[int64_t{x} * ld + r] = in[x];
  }
}

// s[c] = scale * q . K_j[c] for c in [0, end), from the transposed tile: vectorizes over c
// with no horizontal sum per score.
void score_row(const float* __restrict q_row, const float* __restrict k_t, int ld, int end, int d, float scale,
               float* __restrict s) {
  std::fill(s, s + end, 0.0f);
  // Four head_dim columns per pass: one load and store of s per four multiply-adds.
  for (int x = 0; x < d; x += kHeadDimStep) {
    const float q0 = scale * q_row[x], q1 = scale * q_row[x + 1], q2 = scale * q_row[x + 2], q3 = scale * q_row[x + 3];
    const float* __restrict k0 = k_t + int64_t{x} * ld;
    const float* __restrict k1 = k0 + ld;
    const float* __restrict k2 = k1 + ld;
    const float* __restrict k3 = k2 + ld;
#pragma omp simd
    for (int c = 0; c < end; ++c) s[c] += q0 * k0[c] + q1 * k1[c] + q2 * k2[c] + q3 * k3[c];
  }
}

// o += sum_c p[c] V_j[c] for c in [0, end), four keys per pass over o.
void accumulate_pv(const float* __restrict p, const float* __restrict v, int end, int d, float* __restrict o) {
  int c = 0;
  for (; c + 4 <= end; c += 4) {
    const float* __restrict v0 = v + int64_t{c} * d;
    const float* __restrict v1 = v0 + d;
    const float* __restrict v2 = v1 + d;
    const float* __restrict v3 = v2 + d;
    const float p0 = p[c], p1 = p[c + 1], p2 = p[c + 2], p3 = p[c + 3];
#pragma omp simd
    for (int x = 0; x < d; ++x) o[x] += p0 * v0[x] + p1 * v1[x] + p2 * v2[x] + p3 * v3[x];
  }
  for (; c < end; ++c) axpy(p[c], v + int64_t{c} * d, o, d);
}

// score_row for two query rows at once: each load of K^T serves both. Each row's sums run
// in the same order as score_row's, so the scores are bit-identical to it (over the wider
// of the two rows' key ranges; the caller ignores the extra scores).
void score_rows2(const float* __restrict q0_row, const float* __restrict q1_row, const float* __restrict k_t, int ld,
                 int end, int d, float scale, float* __restrict s0, float* __restrict s1) {
  std::fill(s0, s0 + end, 0.0f);
  std::fill(s1, s1 + end, 0.0f);
  for (int x = 0; x < d; x += kHeadDimStep) {
    const float a0 = scale * q0_row[x], a1 = scale * q0_row[x + 1], a2 = scale * q0_row[x + 2],
                a3 = scale * q0_row[x + 3];
    const float b0 = scale * q1_row[x], b1 = scale * q1_row[x + 1], b2 = scale * q1_row[x + 2],
                b3 = scale * q1_row[x + 3];
    const float* __restrict k0 = k_t + int64_t{x} * ld;
    const float* __restrict k1 = k0 + ld;
    const float* __restrict k2 = k1 + ld;
    const float* __restrict k3 = k2 + ld;
#pragma omp simd
    for (int c = 0; c < end; ++c) {
      s0[c] += a0 * k0[c] + a1 * k1[c] + a2 * k2[c] + a3 * k3[c];
      s1[c] += b0 * k0[c] + b1 * k1[c] + b2 * k2[c] + b3 * k3[c];
    }
  }
}

// accumulate_pv for two query rows sharing each load of V. A row whose keys end before
// `end` has zeros there, so it gets the same sum up to the grouping of its last keys.
void accumulate_pv2(const float* __restrict p0, const float* __restrict p1, const float* __restrict v, int end, int d,
                    float* __restrict o0, float* __restrict o1) {
  int c = 0;
  for (; c + 4 <= end; c += 4) {
    const float* __restrict v0 = v + int64_t{c} * d;
    const float* __restrict v1 = v0 + d;
    const float* __restrict v2 = v1 + d;
    const float* __restrict v3 = v2 + d;
    const float a0 = p0[c], a1 = p0[c + 1], a2 = p0[c + 2], a3 = p0[c + 3];
    const float b0 = p1[c], b1 = p1[c + 1], b2 = p1[c + 2], b3 = p1[c + 3];
#pragma omp simd
    for (int x = 0; x < d; ++x) {
      o0[x] += a0 * v0[x] + a1 * v1[x] + a2 * v2[x] + a3 * v3[x];
      o1[x] += b0 * v0[x] + b1 * v1[x] + b2 * v2[x] + b3 * v3[x];
    }
  }
  for (; c < end; ++c) {
    axpy(p0[c], v + int64_t{c} * d, o0, d);
    axpy(p1[c], v + int64_t{c} * d, o1, d);
  }
}

// out += sum_r coef[r * coef_stride] rows[r] over `count` rows of length d: a column of a
// (count, Bc) tile times a (count, D) tile, four rows per pass over out.
void accumulate_rows(const float* coef, int64_t coef_stride, const float* __restrict rows, int count, int d,
                     float* __restrict out) {
  int r = 0;
  for (; r + 4 <= count; r += 4) {
    const float c0 = coef[r * coef_stride], c1 = coef[(r + 1) * coef_stride], c2 = coef[(r + 2) * coef_stride],
                c3 = coef[(r + 3) * coef_stride];
    const float* __restrict r0 = rows + int64_t{r} * d;
    const float* __restrict r1 = r0 + d;
    const float* __restrict r2 = r1 + d;
    const float* __restrict r3 = r2 + d;
#pragma omp simd
    for (int x = 0; x < d; ++x) out[x] += c0 * r0[x] + c1 * r1[x] + c2 * r2[x] + c3 * r3[x];
  }
  for (; r < count; ++r) axpy(coef[r * coef_stride], rows + int64_t{r} * d, out, d);
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One thread's on-chip buffers for the forward pass.
struct ForwardTiles {
  float* q;        // (Br, D)
  float* o;        // (Br, D): O_i before the division by l
  float* k_t;      // (D, Bc): K_j transposed, so that a row of S is d vectorizable passes over Bc
  float* v;        // (Bc, D)
  float* s;        // (2, Bc): rows of S of a pair of query rows, then of exp(S - m')
  float* mult;     // (Bc): one row's dropout multipliers
  float* row_max;  // (Br): m
  float* row_sum;  // (Br): l
  static int64_t floats(CpuTileShape t, int d) {
    return 2 * int64_t{t.block_rows} * d + 2 * int64_t{t.block_cols} * d + 3 * int64_t{t.block_cols} +
           2 * int64_t{t.block_rows};
  }
  ForwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t rd = int64_t{t.block_rows} * d, cd = int64_t{t.block_cols} * d;
    q = base, o = q + rd, k_t = o + rd, v = k_t + cd, s = v + cd, mult = s + 2 * t.block_cols;
    row_max = mult + t.block_cols, row_sum = row_max + t.block_rows;
  }
};

// One thread's on-chip buffers for the backward passes: pass A uses all but dq and k,
// pass B all but dk and dv.
struct BackwardTiles {
  float* q;     // (Br, D)
  float* d_o;   // (Br, D)
  float* dq;    // (Br, D)
  float* k;     // (Bc, D): for dQ_i += dS K_j
  float* k_t;   // (D, Bc): K_j transposed, for rows of S
  float* v_t;   // (D, Bc): V_j transposed, for rows of dP = dO V^T
  float* dk;    // (Bc, D)
  float* dv;    // (Bc, D)
  float* lse;   // (Br)
  float* dsum;  // (Br): D_i
  float* mult;  // (Bc): one row's dropout multipliers
  float* p;     // (Br, Bc): dropout(P); pass B uses only its first row
  float* ds;    // (Br, Bc): dS; pass B uses only its first row
  static int64_t floats(CpuTileShape t, int d) {
    return 3 * int64_t{t.block_rows} * d + 5 * int64_t{t.block_cols} * d + 2 * int64_t{t.block_rows} +
           int64_t{t.block_cols} + 2 * int64_t{t.block_rows} * t.block_cols;
  }
  BackwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t rd = int64_t{t.block_rows} * d, cd = int64_t{t.block_cols} * d;
    q = base, d_o = q + rd, dq = d_o + rd, k = dq + rd, k_t = k + cd, v_t = k_t + cd, dk = v_t + cd, dv = dk + cd;
    lse = dv + cd, dsum = lse + t.block_rows, mult = dsum + t.block_rows, p = mult + t.block_cols;
    ds = p + int64_t{t.block_rows} * t.block_cols;
  }
};

// What every work item of one call needs.
struct FlashProblem {
  const AttentionParams& p;
  AttentionTensors<float> t;
  CpuDropout drop;
  CpuTileShape tile;
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

// ---- forward -------------------------------------------------------------------------

// One online-softmax step of query row r over keys [0, end) of the loaded block: turns
// s into dropout(exp(S - m')), updates m and l, and rescales O_r by exp(m - m'). s[end ..
// width) becomes 0, so that a pass over `width` keys shared with the next row adds nothing.
void online_softmax_row(const FlashProblem& f, ForwardTiles& tl, int r, int end, int width, int64_t batch_head,
                        int64_t row, int j0, float* s) {
  std::fill(s + end, s + width, 0.0f);
  if (end == 0) return;
  float block_max = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < end; ++c) block_max = std::max(block_max, s[c]);
  const float new_max = std::max(tl.row_max[r], block_max);
  const float rescale = std::exp(tl.row_max[r] - new_max);  // 0 on the first block: m = -inf
  float block_sum = 0.0f;
  for (int c = 0; c < end; ++c) {
    s[c] = std::exp(s[c] - new_max);
    block_sum += s[c];
  }
  tl.row_sum[r] = tl.row_sum[r] * rescale + block_sum;
  tl.row_max[r] = new_max;
  if (f.drop.enabled) {
    attention_cpu::dropout_row_multipliers(f.drop, batch_head, row, j0, j0 + end, tl.mult);
    for (int c = 0; c < end; ++c) s[c] *= tl.mult[c];
  }
  float* o_row = tl.o + int64_t{r} * f.d;
  for (int x = 0; x < f.d; ++x) o_row[x] *= rescale;
}

// Algorithm 1 for one row block: rows [i0, i0 + Br) of query head h of sequence seq.
void flash_forward_row_block(const FlashProblem& f, const CpuSequence& seq, int h, int i0, ForwardTiles& tl,
                             IoTally& io) {
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
    tile_load_transposed(f.t.k, seq, j0, head_kv, cols, d, f.tile.block_cols, tl.k_t);
    tile_load(f.t.v, seq, j0, head_kv, cols, d, tl.v, TileRows::keys);
    io.read += 2 * uint64_t(cols) * d;
    // Two query rows per pass, so that each load of K^T and V serves both. Causal ends
    // only grow with the row, so the second row's end bounds the pair.
    for (int r = 0; r < rows; r += 2) {
      const bool pair = r + 1 < rows;
      const int end0 = std::clamp(seq.key_end(i0 + r) - j0, 0, cols);
      const int end1 = pair ? std::clamp(seq.key_end(i0 + r + 1) - j0, 0, cols) : 0;
      const int width = std::max(end0, end1);
      if (width == 0) continue;
      float* s0 = tl.s;
      float* s1 = tl.s + f.tile.block_cols;
      float* o0 = tl.o + int64_t{r} * d;
      if (pair) {
        score_rows2(tl.q + int64_t{r} * d, tl.q + int64_t{r + 1} * d, tl.k_t, f.tile.block_cols, width, d, f.scale, s0,
                    s1);
        online_softmax_row(f, tl, r, end0, width, batch_head, i0 + r, j0, s0);
        online_softmax_row(f, tl, r + 1, end1, width, batch_head, i0 + r + 1, j0, s1);
        accumulate_pv2(s0, s1, tl.v, width, d, o0, o0 + d);
      } else {
        score_row(tl.q + int64_t{r} * d, tl.k_t, f.tile.block_cols, width, d, f.scale, s0);
        online_softmax_row(f, tl, r, end0, width, batch_head, i0 + r, j0, s0);
        accumulate_pv(s0, tl.v, width, d, o0);
      }
    }
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

// One row of the backward for keys [0, end) of the loaded column block: recomputes
// P = exp(S - LSE) and fills p_out with dropout(P) and ds_out with dS = P (dP~ - D_i).
void flash_backward_row(const FlashProblem& f, BackwardTiles& tl, int r, int end, int64_t batch_head, int64_t row,
                        int j0, float* __restrict p_out, float* __restrict ds_out) {
  const int d = f.d, ld = f.tile.block_cols;
  score_row(tl.q + int64_t{r} * d, tl.k_t, ld, end, d, f.scale, p_out);  // S
  score_row(tl.d_o + int64_t{r} * d, tl.v_t, ld, end, d, 1.0f, ds_out);  // dP = dO V^T
  const float lse = tl.lse[r], dsum = tl.dsum[r];
  if (f.drop.enabled) {
    attention_cpu::dropout_row_multipliers(f.drop, batch_head, row, j0, j0 + end, tl.mult);
    for (int c = 0; c < end; ++c) {
      const float prob = std::exp(p_out[c] - lse);
      ds_out[c] = prob * (tl.mult[c] * ds_out[c] - dsum);
      p_out[c] = prob * tl.mult[c];
    }
  } else {
    for (int c = 0; c < end; ++c) {
      const float prob = std::exp(p_out[c] - lse);
      ds_out[c] = prob * (ds_out[c] - dsum);
      p_out[c] = prob;
    }
  }
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

// Pass A: dK_j and dV_j of key block [j0, j0 + Bc) of kv head head_kv, over every query
// head of its group and every row block that sees the keys.
void flash_backward_col_block(const FlashProblem& f, const CpuSequence& seq, int head_kv, int j0, const float* dsum,
                              BackwardTiles& tl, IoTally& io) {
  const int d = f.d;
  const int cols = std::min(f.tile.block_cols, seq.len_k - j0);
  tile_load_transposed(f.t.k, seq, j0, head_kv, cols, d, f.tile.block_cols, tl.k_t);
  tile_load_transposed(f.t.v, seq, j0, head_kv, cols, d, f.tile.block_cols, tl.v_t);
  io.read += 2 * uint64_t(cols) * d;
  std::fill(tl.dk, tl.dk + int64_t{cols} * d, 0.0f);
  std::fill(tl.dv, tl.dv + int64_t{cols} * d, 0.0f);
  const int first_row = seq.first_row_seeing(j0);
  for (int h = head_kv * f.group; h < (head_kv + 1) * f.group; ++h) {
    const int64_t batch_head = int64_t{seq.index} * f.p.heads_q + h;
    for (int i0 = first_row - first_row % f.tile.block_rows; i0 < seq.len_q; i0 += f.tile.block_rows) {
      const int rows = std::min(f.tile.block_rows, seq.len_q - i0);
      flash_backward_load_rows(f, seq, h, i0, rows, dsum, tl, io);
      // The (Br, Bc) tiles of dropout(P) and dS, zero where masked, then
      // dV_j += dropout(P)^T dO_i and dK_j += dS^T Q_i, key by key.
      const int64_t ld = f.tile.block_cols;
      for (int r = 0; r < rows; ++r) {
        const int end = std::clamp(seq.key_end(i0 + r) - j0, 0, cols);
        float* p_row = tl.p + r * ld;
        float* ds_row = tl.ds + r * ld;
        if (end > 0) flash_backward_row(f, tl, r, end, batch_head, i0 + r, j0, p_row, ds_row);
        std::fill(p_row + end, p_row + cols, 0.0f);
        std::fill(ds_row + end, ds_row + cols, 0.0f);
      }
      for (int c = 0; c < cols; ++c) {
        accumulate_rows(tl.p + c, ld, tl.d_o, rows, d, tl.dv + int64_t{c} * d);
        accumulate_rows(tl.ds + c, ld, tl.q, rows, d, tl.dk + int64_t{c} * d);
      }
    }
  }
  tile_store(tl.dk, f.scale, f.t.dk, seq, j0, head_kv, cols, d, TileRows::keys);
  tile_store(tl.dv, 1.0f, f.t.dv, seq, j0, head_kv, cols, d, TileRows::keys);
  io.written += 2 * uint64_t(cols) * d;
}

// Pass B: dQ_i of rows [i0, i0 + Br) of query head h, over every key block they see.
void flash_backward_row_block(const FlashProblem& f, const CpuSequence& seq, int h, int i0, const float* dsum,
                              BackwardTiles& tl, IoTally& io) {
  const int d = f.d, head_kv = h / f.group;
  const int rows = std::min(f.tile.block_rows, seq.len_q - i0);
  const int64_t batch_head = int64_t{seq.index} * f.p.heads_q + h;
  flash_backward_load_rows(f, seq, h, i0, rows, dsum, tl, io);
  std::fill(tl.dq, tl.dq + int64_t{rows} * d, 0.0f);
  const int col_end = seq.key_end(i0 + rows - 1);
  for (int j0 = 0; j0 < col_end; j0 += f.tile.block_cols) {
    const int cols = std::min(f.tile.block_cols, col_end - j0);
    tile_load(f.t.k, seq, j0, head_kv, cols, d, tl.k, TileRows::keys);  // K_j once from slow memory,
    for (int r = 0; r < cols; ++r) {                                    // transposed from the tile
      for (int x = 0; x < d; ++x) tl.k_t[int64_t{x} * f.tile.block_cols + r] = tl.k[int64_t{r} * d + x];
    }
    tile_load_transposed(f.t.v, seq, j0, head_kv, cols, d, f.tile.block_cols, tl.v_t);
    io.read += 2 * uint64_t(cols) * d;
    for (int r = 0; r < rows; ++r) {
      const int end = std::clamp(seq.key_end(i0 + r) - j0, 0, cols);
      if (end == 0) continue;
      flash_backward_row(f, tl, r, end, batch_head, i0 + r, j0, tl.p, tl.ds);
      accumulate_pv(tl.ds, tl.k, end, d, tl.dq + int64_t{r} * d);
    }
  }
  tile_store(tl.dq, f.scale, f.t.dq, seq, i0, h, rows, d, TileRows::queries);
  io.written += uint64_t(rows) * d;
}

void io_add(IoCounter* io, const IoTally& tally) {
  if (io == nullptr) return;
  io->bytes_read += tally.read * sizeof(float);
  io->bytes_written += tally.written * sizeof(float);
}

}  // namespace

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
  if (pass == AttentionPass::forward) return threads * ForwardTiles::floats(tile, p.head_dim) * int64_t{sizeof(float)};
  const int64_t dsum = int64_t{p.heads_q} * attention_cpu::attention_total_q(p);
  return (threads * BackwardTiles::floats(tile, p.head_dim) + dsum) * int64_t{sizeof(float)};
}

void attention_forward_cpu(const AttentionParams& params, const CpuTiling& tiling, IoCounter* io) {
  attention_cpu::cpu_check_params(params, AttentionPass::forward, "attention_forward_cpu",
                                  attention_cpu::DtypeCheck::require_f32);
  const FlashProblem f = flash_problem(params, tiling);
  const int threads = resolve_threads(tiling);
  std::vector<float> workspace(
      static_cast<size_t>(attention_cpu_workspace_bytes(params, AttentionPass::forward, tiling) / sizeof(float)));
  const int64_t per_thread = ForwardTiles::floats(f.tile, f.d);
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
    ForwardTiles tiles(workspace.data() + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    flash_forward_row_block(f, seq, h, i0, tiles, tally);
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
  float* dsum = workspace.data() + threads * per_thread;  // (heads_q, total_q): D = rowsum(dO * O)
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
    BackwardTiles tiles(workspace.data() + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    flash_backward_col_block(f, seq, head_kv, j0, dsum, tiles, tally);
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
    BackwardTiles tiles(workspace.data() + omp_get_thread_num() * per_thread, f.tile, f.d);
    IoTally tally;
    flash_backward_row_block(f, seq, h, i0, dsum, tiles, tally);
    read += tally.read;
    written += tally.written;
  }
  io_add(io, {read, written});
}

}  // namespace flashgpt

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
// Every product of two tiles is one register-blocked tile product (attention_cpu_simd.h). The
// forward and pass B hold the scores transposed, (Bc, Br): S^T = K_j Q_i^T from Q_i^T loaded
// once per row block, so that K_j and V_j serve as loaded and the softmax runs down the keys
// with one query row per vector lane. Pass A holds them as (Br, Bc) against K_j^T and V_j^T
// loaded once per column block. The work items are compiled once per vector ISA
// (attention_cpu_flash_isa.inc) and cpu_isa() picks one per call.
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
// The row length of the query-shaped transposed tiles (Q^T, S^T): Br padded likewise.
int64_t query_ld(CpuTileShape t) { return round_up(t.block_rows, attention_cpu::kSimdMaxWidth); }

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

// Rows [row0, row0 + rows) of one head of `src` into a (D, ld) tile, transposed; columns
// [rows, round_up(rows, kSimdMaxWidth)) become 0, so that products over whole registers stay
// finite.
void tile_load_transposed(const StridedTensor<const float>& src, const CpuSequence& seq, int64_t row0, int head,
                          int rows, int d, int64_t ld, float* tile, TileRows side) {
  const int64_t first = tile_first_row(seq, side, row0);
  for (int r = 0; r < rows; ++r) {
    const float* in = src.at(seq.batch, first + r, head);
    for (int x = 0; x < d; ++x) tile[int64_t{x} * ld + r] = in[x];
  }
  const int64_t padded = round_up(rows, attention_cpu::kSimdMaxWidth);
  for (int x = 0; x < d; ++x) std::fill(tile + int64_t{x} * ld + rows, tile + int64_t{x} * ld + padded, 0.0f);
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

// One thread's on-chip buffers for the forward pass; ldq = query_ld(t). The scores are held
// transposed, keys by queries, so that the softmax runs down the keys with one query per lane.
struct ForwardTiles {
  float* q_t;      // (D, ldq): Q_i transposed
  float* o;        // (Br, D): O_i before the division by l
  float* k;        // (Bc, D)
  float* v;        // (Bc, D)
  float* s_t;      // (Bc, ldq): S^T = K_j Q_i^T, then dropout(exp(S - m'))^T
  float* mult;     // (Bc): one row's dropout multipliers
  float* row_max;  // (ldq): m
  float* row_sum;  // (ldq): l
  float* rescale;  // (ldq): exp(m - m') of the current block
  int64_t floats_used;
  ForwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t cd = int64_t{t.block_cols} * d, ldq = query_ld(t);
    TileCarver c{base};
    q_t = c.take(d * ldq), o = c.take(int64_t{t.block_rows} * d), k = c.take(cd), v = c.take(cd);
    s_t = c.take(t.block_cols * ldq), mult = c.take(t.block_cols);
    row_max = c.take(ldq), row_sum = c.take(ldq), rescale = c.take(ldq);
    floats_used = c.used;
  }
  static int64_t floats(CpuTileShape t, int d) { return ForwardTiles(nullptr, t, d).floats_used; }
};

// One thread's on-chip buffers for the backward passes. Pass A holds S and dP as (Br, ld) tiles
// against K_j^T and V_j^T loaded once per key block; pass B holds them transposed, (Bc, ldq),
// against Q_i^T and dO_i^T loaded once per row block, as the forward does.
struct BackwardTiles {
  float* q;     // (Br, D)
  float* d_o;   // (Br, D)
  float* dq;    // (Br, D)
  float* q_t;   // (D, ldq): pass B's Q_i transposed, for S^T = K_j Q_i^T
  float* do_t;  // (D, ldq): pass B's dO_i transposed, for dP^T = V_j dO_i^T
  float* k;     // (Bc, D)
  float* v;     // (Bc, D)
  float* k_t;   // (D, ld): pass A's K_j transposed, for S = Q K^T
  float* v_t;   // (D, ld): pass A's V_j transposed, for dP = dO V^T
  float* dk;    // (Bc, D)
  float* dv;    // (Bc, D)
  float* lse;   // (ldq)
  float* dsum;  // (ldq): D_i
  float* mult;  // (ld): one row's dropout multipliers
  float* p;     // (Br, ld): pass A's S, then dropout(P)
  float* ds;    // (Br, ld): pass A's dP, then dS
  float* s_t;   // (Bc, ldq): pass B's S^T
  float* ds_t;  // (Bc, ldq): pass B's dP^T, then dS^T
  int64_t floats_used;
  BackwardTiles(float* base, CpuTileShape t, int d) {
    const int64_t rd = int64_t{t.block_rows} * d, cd = int64_t{t.block_cols} * d, ld = score_ld(t), ldq = query_ld(t);
    TileCarver c{base};
    q = c.take(rd), d_o = c.take(rd), dq = c.take(rd), q_t = c.take(d * ldq), do_t = c.take(d * ldq);
    k = c.take(cd), v = c.take(cd), k_t = c.take(d * ld), v_t = c.take(d * ld), dk = c.take(cd), dv = c.take(cd);
    lse = c.take(ldq), dsum = c.take(ldq), mult = c.take(ld);
    p = c.take(t.block_rows * ld), ds = c.take(t.block_rows * ld);
    s_t = c.take(t.block_cols * ldq), ds_t = c.take(t.block_cols * ldq);
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
  int64_t ld;   // score_ld(tile)
  int64_t ldq;  // query_ld(tile)
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
          query_ld(tile),
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

// Loads the row-side tiles of rows [i0, i0 + rows) of query head h: Q and dO (as (rows, D)
// tiles, or transposed), LSE and D.
void flash_backward_load_rows(const FlashProblem& f, const CpuSequence& seq, int h, int i0, int rows, const float* dsum,
                              BackwardTiles& tl, IoTally& io, bool transposed) {
  if (transposed) {
    tile_load_transposed(f.t.q, seq, i0, h, rows, f.d, f.ldq, tl.q_t, TileRows::queries);
    tile_load_transposed(f.t.d_o, seq, i0, h, rows, f.d, f.ldq, tl.do_t, TileRows::queries);
  } else {
    tile_load(f.t.q, seq, i0, h, rows, f.d, tl.q, TileRows::queries);
    tile_load(f.t.d_o, seq, i0, h, rows, f.d, tl.d_o, TileRows::queries);
  }
  const float* lse = f.p.lse + seq.lse_offset + h * f.p.lse_head_stride + i0;
  std::copy(lse, lse + rows, tl.lse);
  const float* dsum_rows = dsum + h * f.total_q + seq.token0 + i0;
  std::copy(dsum_rows, dsum_rows + rows, tl.dsum);
  io.read += 2 * uint64_t(rows) * f.d + 2 * uint64_t(rows);
}

using ForwardItem = void (*)(const FlashProblem&, const CpuSequence&, int, int, ForwardTiles&, IoTally&);
using BackwardItem = void (*)(const FlashProblem&, const CpuSequence&, int, int, const float*, BackwardTiles&,
                              IoTally&);
using ExpItem = void (*)(const float*, float*, int64_t);

struct FlashKernels {
  ForwardItem forward_row_block;
  BackwardItem backward_col_block, backward_row_block;
  ExpItem exp;
};

// The kernels, compiled once per ISA: attention_cpu_flash_isa.inc inside a namespace per ISA,
// under that ISA's target pragma, so that every template it instantiates (the vector helpers
// of attention_cpu_simd.inc included) is compiled for the ISA. (An always_inline template
// defined without the target and inlined into a target function is not enough: GCC 12 then
// lowers vector compares and selects lane by lane.)
namespace isa_baseline {
using Simd = attention_cpu::SimdBaseline;
#include "attention_cpu_flash_isa.inc"
}  // namespace isa_baseline
#if FLASHGPT_CPU_DISPATCH
FLASHGPT_CPU_TARGET_BEGIN_AVX2
namespace isa_avx2 {
using Simd = attention_cpu::SimdAvx2;
#include "attention_cpu_flash_isa.inc"
}  // namespace isa_avx2
FLASHGPT_CPU_TARGET_END
FLASHGPT_CPU_TARGET_BEGIN_AVX512
namespace isa_avx512 {
using Simd = attention_cpu::SimdAvx512;
#include "attention_cpu_flash_isa.inc"
}  // namespace isa_avx512
FLASHGPT_CPU_TARGET_END
#endif

const FlashKernels& flash_kernels(CpuIsa isa) {
#if FLASHGPT_CPU_DISPATCH
  if (isa == CpuIsa::avx512) return isa_avx512::kKernels;
  if (isa == CpuIsa::avx2) return isa_avx2::kKernels;
#endif
  (void)isa;
  return isa_baseline::kKernels;
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

// Attention on the CPU, fp32 tensors (params.dtype == DType::f32).
//
// Two implementations of the same function:
// - the reference materializes S = scale * Q K^T and P = softmax(S) per (batch, head) and
//   accumulates in double: slow, quadratic memory, obviously right;
// - the FlashAttention algorithm (Dao et al. 2022, Algorithms 1, 2 and 4) tiles Q into
//   row blocks and K, V into column blocks sized from an on-chip budget, keeps a running
//   row max and sum, writes O and LSE, and recomputes P in the backward pass from the
//   saved LSE, never holding an N x N matrix.
//
// Both are deterministic: the same inputs give bit-identical outputs whatever the thread
// count (the tiled backward computes dK/dV per column block and dQ per row block in two
// passes instead of racing on dQ). The dropout mask depends only on (seed, offset, batch,
// head, row, column), never on the tiling.
#pragma once

#include <flashgpt/attention.h>

#include <cstdint>

namespace flashgpt {

// How the tiled algorithm turns the on-chip budget M (in floats, onchip_bytes / 4) into
// tile sizes Br x Bc.
enum class CpuTileRule {
  // The paper's Algorithm 1: Bc = ceil(M / 4d), Br = min(Bc, d). Because Br stops at d, the
  // number of passes over K and V, and so the IO, stops falling once M > 4 d^2.
  paper,
  // Br as large as the budget allows with a short Bc = min(ceil(M / 16d), 32): Q_i and O_i
  // (2 Br d), K_j and V_j (2 Bc d) and the S row block (Br Bc) fit in M. The passes over K, V fall as
  // N / Br = Theta(N d / M) for every M, the paper's Theta(N^2 d^2 / M) bound.
  max_rows,
};

// Tile sizes of the tiled CPU algorithm. With block_rows/block_cols left at 0 they come
// from onchip_bytes (the paper's M) by `rule`.
struct CpuTiling {
  int64_t onchip_bytes = 128 * 1024;
  int block_rows = 0;
  int block_cols = 0;
  int threads = 0;  // 0: OpenMP's default
  CpuTileRule rule = CpuTileRule::paper;
};

struct CpuTileShape {
  int block_rows = 0;  // Br: query rows per tile
  int block_cols = 0;  // Bc: keys per tile
};

// The tile shape the tiled algorithm uses for this head_dim; throws on a non-positive budget.
CpuTileShape attention_cpu_tile_shape(const CpuTiling& tiling, int head_dim);

// Bytes moved between "slow" memory (the tensors) and the on-chip tile buffers, counted
// by an instrumented run. Counted per element loaded or stored, sizeof(float) each; a run
// adds to the counter, so one counter can total a forward and a backward.
struct IoCounter {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t total() const { return bytes_read + bytes_written; }
};

void attention_forward_reference(const AttentionParams& params);
// Recomputes S and P from Q and K in double; reads neither o nor lse, so it checks the
// tiled backward independently of the statistics the forward saved.
void attention_backward_reference(const AttentionParams& params);

void attention_forward_cpu(const AttentionParams& params, const CpuTiling& tiling = {}, IoCounter* io = nullptr);
void attention_backward_cpu(const AttentionParams& params, const CpuTiling& tiling = {}, IoCounter* io = nullptr);

// The workspace each implementation allocates for these params, beyond its inputs and
// outputs: the implementations size their one allocation with these same functions, so
// the benchmark's "peak extra memory" is what was really allocated. The reference needs
// O(seqlen_q * seqlen_k); the tiled forward O(threads * M); the tiled backward adds one
// float per (query row, head) for D = rowsum(dO * O).
int64_t attention_reference_workspace_bytes(const AttentionParams& params, AttentionPass pass);
int64_t attention_cpu_workspace_bytes(const AttentionParams& params, AttentionPass pass,
                                      const CpuTiling& tiling = {});

}  // namespace flashgpt

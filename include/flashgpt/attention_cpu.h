// Attention on the CPU, fp32 tensors (params.dtype == DType::f32).
//
// Two implementations of the same function:
// - the reference materializes S = scale * Q K^T and P = softmax(S) per (batch, head) and
//   accumulates in double: slow, quadratic memory, obviously right;
// - the FlashAttention algorithm (Dao et al. 2022, Algorithms 1, 2 and 4) tiles Q into
//   row blocks and K, V into column blocks sized from an on-chip budget, keeps a running
//   row max and sum, writes O and LSE, and recomputes P in the backward pass from the
//   saved LSE, never holding an N x N matrix.
#pragma once

#include <flashgpt/attention.h>

#include <cstdint>

namespace flashgpt {

// Tile sizes of the tiled CPU algorithm. With block_rows/block_cols left at 0 they come
// from onchip_bytes (the paper's M): Bc = ceil(M / (4 d)) floats, Br = min(Bc, d).
struct CpuTiling {
  int64_t onchip_bytes = 128 * 1024;
  int block_rows = 0;
  int block_cols = 0;
  int threads = 0;  // 0: OpenMP's default
};

// Bytes moved between "slow" memory (the tensors) and the on-chip tile buffers, counted
// by an instrumented run. Counted per element loaded or stored, sizeof(float) each.
struct IoCounter {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t total() const { return bytes_read + bytes_written; }
};

void attention_forward_reference(const AttentionParams& params);
void attention_backward_reference(const AttentionParams& params);

void attention_forward_cpu(const AttentionParams& params, const CpuTiling& tiling = {}, IoCounter* io = nullptr);
void attention_backward_cpu(const AttentionParams& params, const CpuTiling& tiling = {}, IoCounter* io = nullptr);

}  // namespace flashgpt

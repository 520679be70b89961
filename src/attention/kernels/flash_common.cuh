// Building blocks shared by the attention kernels: the tensor-core instruction
// (mma.sync m16n8k16, fp32 accumulation), ldmatrix address patterns, cp.async copies with
// zero fill, and the per-sequence offsets of a dense or variable-length batch.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row major), 4 x b32: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8, column),     2 x b32: b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C (16x8, fp32),       4 x f32: c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
// so the C fragments of two neighbouring n-tiles form, once packed to 16 bits, the A
// fragment of one 16-wide k-tile: this is how P never leaves registers.
//
// Shared-memory tiles are row major with rows padded by 8 elements (16 bytes): with
// head_dim a multiple of 16 a row is an odd number of 16-byte units, so the 8 row
// addresses of one ldmatrix phase fall on 8 different 16-byte bank groups.
#pragma once

#include <flashgpt/attention.h>
#include <flashgpt/philox.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashgpt::attn {

template <typename T>
struct ElementOps;

template <>
struct ElementOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct ElementOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix x4 address patterns (row, column) that each lane supplies, for a 16x16 block:
// - "row pattern" (row = lane % 16, col = 8 * (lane / 16)): non-transposed it yields the A
//   fragment of a row-major [m][k] tile; transposed it yields the B fragments (b0, b1 of
//   n-tile 0, then of n-tile 1) of a [k][n] tile.
// - "pair pattern" (row = lane % 8 + 8 * (lane / 16), col = 8 * (lane / 8 % 2)):
//   non-transposed it yields the B fragments of two n-tiles from an [n][k] tile; transposed
//   it yields the A fragment of a [k][m] tile.
__device__ __forceinline__ int ldm_row_pattern_row(int lane) { return lane & 15; }
__device__ __forceinline__ int ldm_row_pattern_col(int lane) { return (lane >> 4) << 3; }
__device__ __forceinline__ int ldm_pair_pattern_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int ldm_pair_pattern_col(int lane) { return ((lane >> 3) & 1) << 3; }

// 16-byte global->shared copy; when !valid the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Copies rows [0, kRows) x [0, kHeadDim) of a strided global tile into a padded shared tile,
// zero-filling rows at or past `valid_rows`. All kThreads threads take part.
template <int kRows, int kHeadDim, int kStride, int kThreads, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* gmem, int64_t row_stride,
                                                int valid_rows, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of 16-byte chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
    const bool valid = row < valid_rows;
    const Element* src = valid ? gmem + row * row_stride + col : gmem;
    cp_async_16(smem_u32(smem + row * kStride + col), src, valid);
  }
}

// Where one (batch entry, head) sequence pair lives. Dense batches: every sequence has
// the full lengths and starts at row 0 of its batch entry. Variable-length batches: rows
// start at cu_seqlens[b] in the packed token axis.
struct SeqInfo {
  int q_start = 0, k_start = 0;  // first row in the packed token axis (0 when dense)
  int seqlen_q = 0, seqlen_k = 0;
  bool varlen = false;

  __device__ __forceinline__ SeqInfo(const AttentionParams& p, int b) {
    if (p.cu_seqlens_q != nullptr) {
      varlen = true;
      q_start = p.cu_seqlens_q[b];
      k_start = p.cu_seqlens_k[b];
      seqlen_q = p.cu_seqlens_q[b + 1] - q_start;
      seqlen_k = p.cu_seqlens_k[b + 1] - k_start;
    } else {
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
    }
  }
  // Element offset of row 0 of head `head` for a tensor with the given strides.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                                              int head) const {
    return (varlen ? 0 : b * batch_stride) + int64_t{q_start} * row_stride + head * head_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                                              int head) const {
    return (varlen ? 0 : b * batch_stride) + int64_t{k_start} * row_stride + head * head_stride;
  }
};

__device__ __forceinline__ float warp_quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float warp_quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The two neighbouring columns (col, col + 1), col even, of one row: both lie in the same
// Philox call (4 columns per call), so one call decides both.
__device__ __forceinline__ void dropout_keep_pair(const DropoutRng& rng, int64_t batch_head, int row, int col,
                                                  uint32_t threshold, bool& keep0, bool& keep1) {
  const Philox4x32 w = dropout_random_words(rng, batch_head, row, col >> 2);
  const bool high = (col & 2) != 0;
  keep0 = (high ? w.z : w.x) >= threshold;
  keep1 = (high ? w.w : w.y) >= threshold;
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace flashgpt::attn

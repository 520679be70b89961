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

// What a kernel receives: the validated params, and the batch entry of blockIdx.z == 0. A
// grid's z holds at most 65,535 batch entries, so the launchers run a larger batch in slices;
// the kernels number batch entries absolutely (batch_begin + blockIdx.z), which keeps each
// entry's Philox dropout stream and workspace rows those of the whole batch.
struct KernelParams : AttentionParams {
  int batch_begin = 0;
};

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
// One 4-byte asynchronous copy (zero-filled when !valid): for rows of per-query statistics,
// whose global addresses are only 4-byte aligned (varlen offsets, odd strides).
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
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

// An output tile (kRows x kCols elements) written out through shared memory: each thread puts
// its accumulator fragments (32-bit pairs) into a padded row-major tile, and after a barrier
// the CTA copies whole rows out with 16-byte stores. Straight from the fragments, a warp's
// store covers 16 bytes of each of 8 rows: half of every 32-byte sector, four times the
// store instructions. The padding (8 elements) makes the 8 rows of a fragment store hit
// different banks.
template <int kRows, int kCols, typename Element>
struct StagedTile {
  static constexpr int kStride = kCols + 8;  // elements; rows stay 16-byte aligned
  static constexpr size_t kBytes = size_t{kRows} * kStride * sizeof(Element);
  static_assert(kCols % 8 == 0, "rows are copied in 16-byte chunks");

  static __device__ __forceinline__ void put(Element* tile, int row, int col, uint32_t pair) {
    *reinterpret_cast<uint32_t*>(tile + row * kStride + col) = pair;
  }
  // Rows at or past valid_rows are not written.
  template <int kThreads>
  static __device__ __forceinline__ void copy_out(const Element* tile, Element* out, int64_t row_stride, int valid_rows,
                                                  int tid) {
    constexpr int kChunks = kCols / 8;
#pragma unroll
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = c % kChunks * 8;
      if (row < valid_rows)
        *reinterpret_cast<uint4*>(out + row * row_stride + col) =
            *reinterpret_cast<const uint4*>(tile + row * kStride + col);
    }
  }
};

// What one forward CTA reads and writes in global memory: Q, O and LSE from its first query
// row m0, K and V of its key/value head (GQA: head / (heads_q / heads_kv)), and how many key
// blocks it visits (causal: up to the last key its last row sees; row i sees key j iff
// j <= i + diag, diag = seqlen_k - seqlen_q).
template <typename Element>
struct FwdGlobal {
  const Element *q, *k, *v;
  Element* o;
  float* lse;
  int n_blocks;

  __device__ __forceinline__ FwdGlobal(const AttentionParams& p, const SeqInfo& seq, int b, int head, int m0,
                                       int block_m, int block_n, bool causal, int diag) {
    const int head_kv = head / (p.heads_q / p.heads_kv);
    q = static_cast<const Element*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, head) +
        m0 * p.q_row_stride;
    k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, head_kv);
    v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, head_kv);
    o = static_cast<Element*>(p.o) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, head) +
        m0 * p.o_row_stride;
    lse = p.lse + (seq.varlen ? 0 : b * p.lse_batch_stride) + head * p.lse_head_stride + seq.q_start + m0;
    n_blocks = (seq.seqlen_k + block_n - 1) / block_n;
    if (causal) {
      const int last_col = min(m0 + block_m, seq.seqlen_q) - 1 + diag;  // last column any row of the block sees
      n_blocks = min(n_blocks, last_col < 0 ? 0 : last_col / block_n + 1);
    }
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

// ---- Dropout (philox.h: one Philox call = 16 columns of one row, one byte each) ----
//
// Byte test without extracting the byte: with `top` = (t << 24) - 1 (t in 1..256, so 256
// wraps to 0xFFFFFFFF), byte k of v is below t exactly when (v << (24 - 8 k)) <= top, since
// the bytes shifted in below byte k cannot lift it over t << 24. One shift and one compare.
__device__ __forceinline__ uint32_t dropout_top_threshold(uint32_t threshold) { return (threshold << 24) - 1u; }

// `byte` (0..3) is a compile-time constant at every call site once the loops are unrolled.
__device__ __forceinline__ bool dropout_byte_dropped(uint32_t v, int byte, uint32_t top) {
  return (v << (24 - 8 * byte)) <= top;
}

// The random bytes of this lane's 16 elements of the m16n8 accumulators in rows row0 and
// row0 + 8 and the 32 columns [col0, col0 + 32) (4 n8 tiles): col0 % 16 == 0.
//
// The quad (lanes 4g .. 4g + 3, t = lane % 4) owns all 32 columns of both rows, lane t the
// columns 8 j + 2 t + {0, 1}: 4 Philox calls (2 rows x 2 groups of 16 columns), each of which
// every lane of the quad needs 4 bytes of. Each lane computes one call, call t = (row half
// t & 1, column half t >> 1), and hands each other lane of the quad the 4 bytes it needs in
// one 32-bit shuffle (xor 1, 2, 3): 3 shuffles and 16 selects/permutes per lane, against
// 4 calls per lane without sharing. A 4x4 butterfly transpose would need 4 shuffles.
//
// On return bytes[c], c = row half + 2 * column half, holds the bytes of
//   tile 2 * (c >> 1) (cols 2t, 2t+1), then tile 2 * (c >> 1) + 1 (cols 2t, 2t+1)
// of row row0 + 8 * (c & 1), lowest byte first.
__device__ __forceinline__ void dropout_quad_bytes(const DropoutRng& rng, int64_t batch_head, int row0, int col0, int t,
                                                   uint32_t (&bytes)[4]) {
  const int row_half = t & 1, col_half = t >> 1;
  const Philox4x32 w = dropout_random_words(rng, batch_head, row0 + 8 * row_half, col0 / kDropoutColsPerCall + col_half);
  // Lane d needs bytes 2d, 2d + 1 (word d >> 1, half d & 1) and 8 + 2d, 9 + 2d (word
  // 2 + (d >> 1), same half) of every call.
  const bool hi_pair = (t >> 1) != 0;
  const uint32_t a_same = hi_pair ? w.y : w.x, b_same = hi_pair ? w.w : w.z;  // d >> 1 == t >> 1
  const uint32_t a_other = hi_pair ? w.x : w.y, b_other = hi_pair ? w.z : w.w;
  const uint32_t sel_same = (t & 1) ? 0x7632u : 0x5410u, sel_other = sel_same ^ 0x2222u;  // d & 1 == t & 1 or not
  uint32_t got[4];  // got[x]: from lane t ^ x, i.e. call t ^ x
  got[0] = __byte_perm(a_same, b_same, sel_same);
  got[1] = __shfl_xor_sync(0xffffffffu, __byte_perm(a_same, b_same, sel_other), 1);
  got[2] = __shfl_xor_sync(0xffffffffu, __byte_perm(a_other, b_other, sel_same), 2);
  got[3] = __shfl_xor_sync(0xffffffffu, __byte_perm(a_other, b_other, sel_other), 3);
  // bytes[c] = got[c ^ t]: two conditional swaps.
  const bool s0 = (t & 1) != 0, s1 = (t & 2) != 0;
  const uint32_t u0 = s0 ? got[1] : got[0], u1 = s0 ? got[0] : got[1];
  const uint32_t u2 = s0 ? got[3] : got[2], u3 = s0 ? got[2] : got[3];
  bytes[0] = s1 ? u2 : u0;
  bytes[1] = s1 ? u3 : u1;
  bytes[2] = s1 ? u0 : u2;
  bytes[3] = s1 ? u1 : u3;
}

// Zeroes the dropped elements of the m16n8 accumulator tiles s[0 .. kNTiles) of rows row0 and
// row0 + 8 (tile nt: columns n0 + 8 nt + 2 t + {0, 1}); `top` from dropout_top_threshold.
template <int kNTiles>
__device__ __forceinline__ void dropout_apply_rows(float (&s)[kNTiles][4], const DropoutRng& rng, int64_t batch_head,
                                                   int row0, int n0, int t, uint32_t top) {
  static_assert(kNTiles % 4 == 0, "dropout shares Philox calls over groups of 4 n8 tiles (32 columns)");
#pragma unroll
  for (int grp = 0; grp < kNTiles / 4; ++grp) {
    uint32_t bytes[4];
    dropout_quad_bytes(rng, batch_head, row0, n0 + 32 * grp, t, bytes);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = c & 1, lo = 4 * grp + 2 * (c >> 1);
      if (dropout_byte_dropped(bytes[c], 0, top)) s[lo][2 * r] = 0.0f;
      if (dropout_byte_dropped(bytes[c], 1, top)) s[lo][2 * r + 1] = 0.0f;
      if (dropout_byte_dropped(bytes[c], 2, top)) s[lo + 1][2 * r] = 0.0f;
      if (dropout_byte_dropped(bytes[c], 3, top)) s[lo + 1][2 * r + 1] = 0.0f;
    }
  }
}

// The backward's transposed layout (S^T: the warp's 16 keys are the m16 rows, queries the
// columns). One Philox call (one query, the warp's 16 keys) is needed by the 8 lanes of the
// same t, 2 bytes each (keys g and g + 8). For 4 n8 tiles of queries, col0 .. col0 + 31, the
// 8 lanes need 8 calls: lane g computes call g (query col0 + 8 (g >> 1) + 2 t + (g & 1)), cuts
// it into 8 16-bit units (unit d = bytes d and d + 8, what lane d needs), and the 8 lanes
// transpose the 8 x 8 units by a butterfly over lane bits 2, 3, 4: 3 stages of 2 shuffles,
// 6 in all against 7 for direct exchange, and the units land in fixed registers, so no
// lane-dependent selects are left at the end.
//
// On return bytes[i] holds, for query tile i, the bytes of this lane's elements
//   e = 0 (key g, query 2t), e = 2 (key g + 8, query 2t), e = 1 (key g, 2t + 1), e = 3 (key g + 8, 2t + 1)
// lowest byte first; dropout_bwd_byte_pos(e) is the byte of element e.
__device__ __forceinline__ constexpr int dropout_bwd_byte_pos(int e) { return ((e & 1) << 1) | (e >> 1); }

__device__ __forceinline__ void dropout_key_column_bytes(const DropoutRng& rng, int64_t batch_head, int query0, int key0,
                                                         int g, int t, uint32_t (&bytes)[4]) {
  const Philox4x32 w =
      dropout_random_words(rng, batch_head, query0 + 8 * (g >> 1) + 2 * t + (g & 1), key0 / kDropoutColsPerCall);
  // Unit d = byte d | byte (d + 8) << 8; register k holds units 2k (low) and 2k + 1 (high).
  uint32_t u[4] = {__byte_perm(w.x, w.z, 0x5140u), __byte_perm(w.x, w.z, 0x7362u), __byte_perm(w.y, w.w, 0x5140u),
                   __byte_perm(w.y, w.w, 0x7362u)};
  // Stage over lane bit 2 (unit bit 0, the halves of each register): a lane with g & 1 == 0
  // keeps its low units and sends the high ones, the other the reverse; both halves of a pair
  // of registers travel in one shuffle.
  {
    const bool odd = (g & 1) != 0;
    const uint32_t send_sel = odd ? 0x5410u : 0x7632u;
    const uint32_t keep_sel0 = odd ? 0x3254u : 0x5410u, keep_sel1 = odd ? 0x3276u : 0x7610u;
#pragma unroll
    for (int k = 0; k < 4; k += 2) {
      const uint32_t r = __shfl_xor_sync(0xffffffffu, __byte_perm(u[k], u[k + 1], send_sel), 4);
      u[k] = __byte_perm(u[k], r, keep_sel0);
      u[k + 1] = __byte_perm(u[k + 1], r, keep_sel1);
    }
  }
  // Stages over lane bits 3 and 4 (unit bits 1 and 2): whole registers k and k ^ (1, 2).
#pragma unroll
  for (int stage = 1; stage <= 2; ++stage) {
    const bool upper = ((g >> stage) & 1) != 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k & stage) continue;
      const int k1 = k | stage;
      const uint32_t r = __shfl_xor_sync(0xffffffffu, upper ? u[k] : u[k1], 4 << stage);
      u[k] = upper ? r : u[k];
      u[k1] = upper ? u[k1] : r;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) bytes[i] = u[i];
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace flashgpt::attn

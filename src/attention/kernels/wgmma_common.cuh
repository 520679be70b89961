// Hopper (sm_90a) building blocks shared by the wgmma forward and backward kernels: the
// 128-byte-swizzle shared-memory layout and its matrix descriptors, wgmma fences and waits,
// and the swizzled cp.async tile loader.
//
// Layout: a [rows][head_dim] tile is stored as head_dim / 64 column blocks of [rows][64]
// 16-bit elements (128-byte rows); 16-byte chunk c of row r lives at chunk c ^ (r % 8). Every
// tile starts on a 1024-byte boundary (the swizzle repeats every 8 rows = 1024 bytes and is
// applied to address bits). K-major operands (contiguous along the reduction dimension) take
// k16 slices at 32-byte steps inside a row; MN-major ones (transpose bit) take k16 slices as
// 16 rows (2048 bytes), with the leading byte offset stepping between 64-element blocks.
#pragma once

#include "flash_common.cuh"
#include "wgmma_ops.cuh"

namespace flashgpt::attn {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASHGPT_WGMMA_AVAILABLE 1
#endif

// Shared-memory matrix descriptor with the 128-byte swizzle (PTX ISA, "Matrix Descriptor
// Format"): start address, leading and stride byte offsets (all >> 4), layout type 1 in bits 62-63.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t(lead_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t{1} << 62);
}

// The descriptor of the same layout `bytes` further on: the start address field holds
// address >> 4 in its low 14 bits, and shared-memory addresses stay below 256 KB, so the add
// never carries out of the field. Descriptors built once and advanced this way cost one
// 64-bit add each instead of the mask, shifts and ors of wgmma_desc_sw128.
__device__ __forceinline__ uint64_t wgmma_desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

#ifdef FLASHGPT_WGMMA_AVAILABLE
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async
// proxy: each writing thread fences between its completed copies and the barrier.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
#endif
// Pins registers that an asynchronous wgmma reads or writes, so that the compiler neither moves
// their uses across the issue / wait points nor reuses them while the tensor cores own them.
template <int M>
__device__ __forceinline__ void fence_operands(float (&d)[M][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
template <int M>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[M][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// Accumulator tiles (m16n8 C fragments, fp32) packed to 16 bits as the A fragments of an RS
// wgmma: k16 slice kt is made of n8 tiles 2 kt and 2 kt + 1 (the forward's P for P V, the
// backward's P^T and dS^T for dV and dK).
template <typename Element, int kNTiles>
__device__ __forceinline__ void pack_rs_a_fragments(const float (&s)[kNTiles][4], uint32_t (&pa)[kNTiles / 2][4]) {
  using Ops = ElementOps<Element>;
#pragma unroll
  for (int kt = 0; kt < kNTiles / 2; ++kt) {
    pa[kt][0] = Ops::pack(s[2 * kt][0], s[2 * kt][1]);
    pa[kt][1] = Ops::pack(s[2 * kt][2], s[2 * kt][3]);
    pa[kt][2] = Ops::pack(s[2 * kt + 1][0], s[2 * kt + 1][1]);
    pa[kt][3] = Ops::pack(s[2 * kt + 1][2], s[2 * kt + 1][3]);
  }
}

// Byte offset of element (row, col) in a swizzled [kHeadDim / 64][kRows][64] tile; col % 8 == 0.
template <int kRows>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int col) {
  const int block = col / 64, chunk = (col % 64) / 8;
  return uint32_t(block * kRows * 128 + row * 128 + ((chunk ^ (row % 8)) << 4));
}

// Zeroes columns [kHeadDim, kHeadDimPad) of every row of a swizzled [kHeadDimPad / 64][kRows][64]
// tile: the pad that load_tile_swizzled_async never writes, so that a GEMM whose N covers whole
// swizzle rows reads zeros there, not whatever shared memory held. Plain stores: the caller
// fences them for the async proxy (fence_proxy_async_smem) before a wgmma reads them.
template <int kRows, int kHeadDim, int kHeadDimPad, int kThreads>
__device__ __forceinline__ void zero_tile_pad_columns(unsigned char* smem_base, uint32_t tile, int tid) {
  constexpr int kPadChunksPerRow = (kHeadDimPad - kHeadDim) / 8;
  static_assert(kHeadDim % 8 == 0 && kPadChunksPerRow >= 0, "whole 16-byte chunks");
  constexpr int kChunks = kRows * kPadChunksPerRow;
  const uint32_t base = smem_u32(smem_base);
  for (int chunk = tid; chunk < kChunks; chunk += kThreads) {
    const int row = chunk / kPadChunksPerRow, col = kHeadDim + (chunk % kPadChunksPerRow) * 8;
    *reinterpret_cast<uint4*>(smem_base + (tile + swizzled_offset<kRows>(row, col) - base)) = make_uint4(0, 0, 0, 0);
  }
}

// The same for a tile whose pad is a whole number of chunks per thread, unrolled, with
// st.shared on the 32-bit address (the padded wgmma backward: the generic-pointer loop above,
// at its start, cost that register-bound kernel 32 to 152 more bytes of spills).
template <int kRows, int kHeadDim, int kHeadDimPad, int kThreads>
__device__ __forceinline__ void zero_tile_pad_columns_unrolled(uint32_t tile, int tid) {
  constexpr int kPadChunksPerRow = (kHeadDimPad - kHeadDim) / 8;
  static_assert(kHeadDim % 8 == 0 && kPadChunksPerRow > 0, "whole 16-byte chunks");
  constexpr int kChunks = kRows * kPadChunksPerRow;
  static_assert(kChunks % kThreads == 0, "the same number of chunks for every thread");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int row = chunk / kPadChunksPerRow, col = kHeadDim + (chunk % kPadChunksPerRow) * 8;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(tile + swizzled_offset<kRows>(row, col)), "r"(0)
                 : "memory");
  }
}

// Copies rows [0, kRows) of a strided global tile into a swizzled shared tile, zero-filling rows
// at or past valid_rows. Consecutive threads take consecutive 16-byte chunks of a row.
template <int kRows, int kHeadDim, int kThreads, typename Element>
__device__ __forceinline__ void load_tile_swizzled_async(uint32_t smem, const Element* gmem, int64_t row_stride,
                                                         int valid_rows, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
      const bool valid = row < valid_rows;
      const Element* src = valid ? gmem + row * row_stride + col : gmem;
      cp_async_16(smem + swizzled_offset<kRows>(row, col), src, valid);
    }
  }
}

}  // namespace flashgpt::attn

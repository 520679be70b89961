// Hopper (sm_90) building blocks of the warp-specialized kernels: TMA tensor maps (host side:
// encoded through the driver entry point, so nothing links against libcuda), bulk tensor
// copies that complete on an mbarrier, an mbarrier pipeline state (pipeline_parity.h),
// named barriers and register reallocation (setmaxnreg, sm_90a).
//
// The tensor maps describe a [batch][rows][heads][head_dim] tensor with arbitrary (16-byte
// multiple) strides as 4 dimensions, innermost first: (column, row, head, batch). A box is
// 64 columns (128 bytes, the widest the 128-byte swizzle allows) x kRows rows x 1 x 1, so
// one copy fills one [kRows][64] column block of the shared-memory layout of
// wgmma_common.cuh (16-byte chunk c of row r at chunk c ^ (r % 8), 1024-byte aligned): the
// layout TMA's 128-byte swizzle writes. Rows past the tensor's end are zero-filled by the
// copy engine and still count toward the transaction bytes.
#pragma once

#include "flash_common.cuh"
#include "pipeline_parity.h"  // PipelineState

#include <cuda.h>  // CUtensorMap and its enums (types only: the function comes from the runtime)
#include <cuda_runtime.h>

#include <flashgpt/cuda_check.h>

#include <cstdint>
#include <cstdio>

namespace flashgpt::attn {

// ---- Host: tensor maps ----

// The columns of one TMA box: 128 bytes of 16-bit elements, one swizzle row.
inline constexpr int kTmaBoxCols = 64;

// A 4-D tensor map over a 16-bit [batch][rows][heads][cols] tensor (strides in elements, each a
// multiple of 8: the validation guarantees it) whose box is kTmaBoxCols x box_rows x 1 x 1 with
// the 128-byte swizzle. Throws flashgpt::Error (through cuda_error_throw) when the driver lacks
// cuTensorMapEncodeTiled or rejects the map.
// Extents of 0 become 1 (the map must be valid; a kernel with nothing to read never copies).
inline CUtensorMap make_tensor_map_16bit(const void* base, bool bf16, int64_t cols, int64_t rows, int64_t heads,
                                         int64_t batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride,
                                         int box_rows) {
  using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  // Asked of the driver once: the runtime hands out the driver's entry point (the ABI of CUDA
  // 12.0's cuTensorMapEncodeTiled), so the program needs no link against libcuda.
  static const EncodeFn encode = []() -> EncodeFn {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<EncodeFn>(fn);
  }();
  if (encode == nullptr)
    cuda_error_throw(cudaErrorNotSupported,
                     "attention (CUDA): the driver has no cuTensorMapEncodeTiled (CUDA 12.0 or newer is needed for the "
                     "TMA forward)",
                     __FILE__, __LINE__);
  auto at_least_1 = [](int64_t v) { return cuuint64_t(v > 0 ? v : 1); };
  const cuuint64_t dims[4] = {at_least_1(cols), at_least_1(rows), at_least_1(heads), at_least_1(batch)};
  // A dimension of extent 1 is only ever read at coordinate 0, so its stride does not matter;
  // callers may leave it 0 (one batch entry, one head), which the driver rejects.
  auto stride_bytes = [](int64_t stride, int64_t extent) {
    return cuuint64_t(extent <= 1 && stride == 0 ? 8 : stride) * 2;
  };
  const cuuint64_t strides[3] = {stride_bytes(row_stride, rows), stride_bytes(head_stride, heads),
                                 stride_bytes(batch_stride, batch)};
  const cuuint32_t box[4] = {cuuint32_t(kTmaBoxCols), cuuint32_t(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                            const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    static thread_local char what[256];
    std::snprintf(what, sizeof what,
                  "attention (CUDA): cuTensorMapEncodeTiled rejected a tensor map (CUresult %d; strides in bytes %llu, "
                  "%llu, %llu must be multiples of 16 below 2^40)",
                  int(r), static_cast<unsigned long long>(strides[0]), static_cast<unsigned long long>(strides[1]),
                  static_cast<unsigned long long>(strides[2]));
    cuda_error_throw(cudaErrorInvalidValue, what, __FILE__, __LINE__);
  }
  return map;
}

// ---- Device ----

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initialized barriers visible to the other threads and the async proxy (the copy
// engine); a __syncthreads follows it.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// The producer's arrival that also announces `bytes` of copies completing on the barrier.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}
// Whether the phase with this parity has completed (a fresh barrier is in phase 0, so waiting
// for parity 1 returns at once: the "previous" phase counts as completed).
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// One box of a 4-D tensor map into shared memory at dst, completing on bar (complete_tx).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads). `threads` counts every thread that syncs or
// arrives, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif  // sm_90

#ifdef __CUDA_ARCH_FEAT_SM90_ALL
// Register reallocation between warpgroups (sm_90a): every thread of the warpgroup executes it.
// It takes effect only with a register cap at entry (__launch_bounds__(threads, 1)).
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
#endif

}  // namespace flashgpt::attn

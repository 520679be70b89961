// Host-side helpers shared by the forward and backward launchers.
#pragma once

#include <flashgpt/cuda_check.h>

#include <cuda_runtime.h>

#include <cstddef>

namespace flashgpt::attn {

// Host-side checks for the launchers (nvcc cannot compile fmt, so no FLASHGPT_CHECK here): what
// names the launch, "launch of kernel flash_fwd_kernel".
inline void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) cuda_error_throw(status, what, __FILE__, __LINE__);
}
// A plan naming a kernel that the instance reported it lacks: the entry point's bug.
[[noreturn]] inline void plan_error(const char* what) { cuda_error_throw(cudaErrorInvalidValue, what, __FILE__, __LINE__); }

template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    FLASHGPT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace flashgpt::attn

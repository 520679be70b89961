// The CUDA member of the error-checking macro family (see flashgpt/error.h): every runtime
// call and every kernel launch goes through one of these, which throw flashgpt::Error
// naming the failing call, the CUDA error string, file and line.
//
// Deliberately free of fmt: nvcc's front end cannot compile fmt's constexpr format
// checking, so .cu files include this header and the message is built in cuda_check.cc.
#pragma once

#include <cuda_runtime.h>

namespace flashgpt {
[[noreturn]] void cuda_error_throw(cudaError_t status, const char* what, const char* file, int line);
}  // namespace flashgpt

// FLASHGPT_CUDA_CHECK(cudaMemsetAsync(...)): throws on any status other than cudaSuccess.
#define FLASHGPT_CUDA_CHECK(call)                                                         \
  do {                                                                                    \
    const cudaError_t flashgpt_status_ = (call);                                          \
    if (flashgpt_status_ != cudaSuccess)                                                  \
      ::flashgpt::cuda_error_throw(flashgpt_status_, "CUDA call `" #call "`", __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: reports launch-configuration errors (too much shared memory,
// bad grid) at the launch site instead of at the next synchronizing call.
#define FLASHGPT_CUDA_CHECK_LAUNCH(kernel_name)                                           \
  do {                                                                                    \
    const cudaError_t flashgpt_status_ = cudaGetLastError();                              \
    if (flashgpt_status_ != cudaSuccess)                                                  \
      ::flashgpt::cuda_error_throw(flashgpt_status_, "launch of kernel " kernel_name, __FILE__, __LINE__); \
  } while (0)

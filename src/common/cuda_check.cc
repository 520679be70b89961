#include <flashgpt/cuda_check.h>

#include <flashgpt/error.h>

namespace flashgpt {

void cuda_error_throw(cudaError_t status, const char* what, const char* file, int line) {
  error_throw(file, line, fmt::format("{} failed: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status)));
}

}  // namespace flashgpt

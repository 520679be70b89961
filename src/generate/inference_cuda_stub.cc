// A build without CUDA: the CUDA engine is absent, and says so.
#include <flashgpt/error.h>
#include <flashgpt/generate.h>

namespace flashgpt {

std::unique_ptr<InferenceEngine> inference_create_cuda(const ModelConfig&, std::span<const float>,
                                                       const InferenceOptions&) {
  FLASHGPT_FAIL("inference: flashgpt was built without CUDA; use --device cpu");
}

bool inference_cuda_available() { return false; }

bool inference_cuda_supports(const ModelConfig&) { return false; }

double inference_cuda_copy_bandwidth(size_t) {
  FLASHGPT_FAIL("inference: flashgpt was built without CUDA; no copy bandwidth to measure");
}

}  // namespace flashgpt

// main() for tests labelled gpu: skip (exit 77, which ctest reports as Skipped) when the
// build has no CUDA or the machine has no CUDA device, instead of failing or passing.
#include <gtest/gtest.h>

#include <cstdio>

#ifdef FLASHGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

int main(int argc, char** argv) {
#ifdef FLASHGPT_WITH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device on this machine\n");
    return 77;
  }
#else
  std::printf("SKIPPED: this build has no CUDA\n");
  return 77;
#endif
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

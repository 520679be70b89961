// main() of the CPU test binaries (see tests/CMakeLists.txt): like gtest_main, but a run in
// which nothing failed and some case skipped exits 77, which ctest reports as skipped. So
// does a run whose FLASHGPT_CPU_ISA (the ctest entries that force a vector ISA) names one
// this CPU lacks.
#include <flashgpt/cpu_isa.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (const char* isa = std::getenv("FLASHGPT_CPU_ISA"); isa != nullptr && *isa != '\0') {
    for (const auto candidate : {flashgpt::CpuIsa::baseline, flashgpt::CpuIsa::avx2, flashgpt::CpuIsa::avx512}) {
      if (std::strcmp(isa, flashgpt::cpu_isa_name(candidate)) == 0 && !flashgpt::cpu_isa_supported(candidate)) {
        std::printf("FLASHGPT_CPU_ISA=%s: this CPU cannot run it; skipped\n", isa);
        return 77;
      }
    }
  }
  if (const int failed = RUN_ALL_TESTS()) return failed;
  return ::testing::UnitTest::GetInstance()->skipped_test_count() > 0 ? 77 : 0;
}

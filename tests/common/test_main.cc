// main() of the CPU test binaries (see tests/CMakeLists.txt): like gtest_main, but a run in
// which nothing failed and some case skipped exits 77, which ctest reports as skipped.
#include <gtest/gtest.h>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (const int failed = RUN_ALL_TESTS()) return failed;
  return ::testing::UnitTest::GetInstance()->skipped_test_count() > 0 ? 77 : 0;
}

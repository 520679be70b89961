// The op-test harness itself (op_test.h): the error measure's norms, floor and non-finite
// rules, the finite-difference check catching a wrong gradient, and the case registration.
#include "common/op_test.h"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace flashgpt::testing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(OpError, MaxNormIsRelativeToTheLargestReferenceElementWithAFloor) {
  const std::vector<double> want{0.5, -4.0, 2.0}, got{0.5, -4.0, 2.5};
  const OpError e = op_error(got, want);
  EXPECT_DOUBLE_EQ(e.absolute, 0.5);
  EXPECT_DOUBLE_EQ(e.scale, 4.0);
  EXPECT_DOUBLE_EQ(e.value, 0.125);
  EXPECT_EQ(e.worst, 2u);
  EXPECT_EQ(e.got_worst, 2.5);
  // Small tensors: the floor (1 by default) makes the error absolute.
  const std::vector<float> tiny_want{1e-3f}, tiny_got{2e-3f};
  EXPECT_NEAR(op_error(tiny_got, tiny_want).value, 1e-3, 1e-9);
  EXPECT_NEAR(op_error(tiny_got, tiny_want, {Norm::max, 1e-30}).value, 1.0, 1e-6);
}

TEST(OpError, RmsNormIsTheRatioOfRootMeanSquares) {
  const std::vector<double> want{3.0, 4.0}, got{3.0, 5.0};  // rms(err) = sqrt(1/2), rms(want) = sqrt(25/2)
  EXPECT_NEAR(op_error(got, want, {Norm::rms, 1e-30}).value, 0.2, 1e-12);
  // A zero reference: the floor stands in for its RMS.
  const std::vector<float> zero(4, 0.0f), noise(4, 0.01f);
  EXPECT_NEAR(op_error(noise, zero, {Norm::rms, 0.05}).value, 0.2, 1e-6);
}

TEST(OpError, InfinitiesMustMatchAndNaNNeverDoes) {
  const std::vector<double> want{1.0, kInf, 2.0};
  EXPECT_EQ(op_error(std::vector<double>{1.0, kInf, 2.0}, want).value, 0.0);
  EXPECT_EQ(op_error(std::vector<double>{1.0, -kInf, 2.0}, want).value, kInf);
  EXPECT_EQ(op_error(std::vector<double>{1.0, 5.0, 2.0}, want).value, kInf);
  EXPECT_EQ(op_error(std::vector<double>{kNaN, kInf, 2.0}, want).value, kInf);
  EXPECT_EQ(op_error(std::vector<double>{kNaN, kInf, 2.0}, want, {Norm::rms, 1.0}).value, kInf);
  EXPECT_EQ(op_error(std::vector<double>{1.0}, want).value, kInf) << "a size mismatch";
  EXPECT_NE(op_error(std::vector<double>{1.0}, want).describe().find("size 1 where the reference has 3"),
            std::string::npos);
}

TEST(OpError, OpCloseNamesTheTensorAndTheWorstElement) {
  const std::vector<float> got{1.0f, 2.0f, 3.5f};
  const std::vector<double> want{1.0, 2.0, 3.0};
  EXPECT_TRUE(op_close("x", got, want, 0.2));
  const ::testing::AssertionResult r = op_close("dQ", got, want, 0.1);
  ASSERT_FALSE(r);
  EXPECT_NE(std::string(r.message()).find("dQ: error"), std::string::npos) << r.message();
  EXPECT_NE(std::string(r.message()).find("worst at element 2: got 3.5, want 3"), std::string::npos) << r.message();
}

TEST(FiniteDifferences, AcceptTheRightGradientAndCatchAWrongOne) {
  std::vector<double> x{0.3, -1.2, 2.0};
  const auto loss = [&x] { return x[0] * x[0] + std::sin(x[1]) + x[0] * x[2]; };
  const std::vector<double> right{2 * x[0] + x[2], std::cos(x[1]), x[0]};
  EXPECT_LT(expect_gradient_matches_fd("f", x, right, loss, strided_indices(3, 1)), 1e-8);
  EXPECT_EQ(x, (std::vector<double>{0.3, -1.2, 2.0})) << "x must be restored";
  std::vector<double> wrong = right;
  wrong[1] += 1e-3;
  EXPECT_NONFATAL_FAILURE(expect_gradient_matches_fd("f", x, wrong, loss, strided_indices(3, 1)), "gradient element 1");
  // An index left out is not checked.
  EXPECT_LT(expect_gradient_matches_fd("f", x, wrong, loss, {0, 2}), 1e-8);
}

TEST(FiniteDifferences, IndexHelpers) {
  EXPECT_EQ(strided_indices(7, 3), (std::vector<int64_t>{0, 3, 6}));
  EXPECT_EQ(sample_indices(3, 64), (std::vector<int64_t>{0, 1, 2}));
  const auto sampled = sample_indices(1000, 10, 5);
  EXPECT_EQ(sampled.size(), 10u);
  for (const int64_t i : sampled) EXPECT_TRUE(i >= 0 && i < 1000);
}

struct Case {
  std::string name;
  int value;
};

const int kRegistered = register_op_cases<Case>(
    "HarnessOp", "test", {{"one", 1}, {"two", 2}, {"skipped_by_backend", 3}},
    [](const Case& c) { EXPECT_LT(c.value, 3); },
    [](const Case& c) { return c.value < 3; });

TEST(OpCases, RegistersOneTestPerSupportedCase) {
  EXPECT_EQ(kRegistered, 2);
  const ::testing::TestSuite* suite = nullptr;
  auto* unit = ::testing::UnitTest::GetInstance();
  for (int i = 0; i < unit->total_test_suite_count(); ++i) {
    if (std::string(unit->GetTestSuite(i)->name()) == "HarnessOp/test") suite = unit->GetTestSuite(i);
  }
  ASSERT_NE(suite, nullptr);
  ASSERT_EQ(suite->total_test_count(), 2);
  EXPECT_EQ(std::string(suite->GetTestInfo(0)->name()), "one");
  EXPECT_EQ(std::string(suite->GetTestInfo(1)->name()), "two");
}

}  // namespace
}  // namespace flashgpt::testing

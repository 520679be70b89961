// The op-test harness, in the spirit of ggml's test-backend-ops: an op's tests are a table of
// cases (awkward shapes included) that every backend runs against the op's reference, one
// gtest per (backend, case), plus central finite differences for the reference's gradients
// and the one error measure every comparison of the repository uses.
//
//   register_op_cases<MyCase>("MatmulOp", "cuda", cases, [](const MyCase& c) { ... });
//   // -> tests MatmulOp/cuda.<case name>, selectable with --gtest_filter='MatmulOp/cuda.*'
//
//   EXPECT_TRUE(op_close("dQ", got.dq, want.dq, 1e-4));                 // max-abs, scale floor 1
//   EXPECT_LT(op_error(got, want, {Norm::rms, 0.05}).value, 1.6e-2);  // RMS, floor 0.05
//
// A case a backend cannot run (a head dim this build lacks) is left out when the cases are
// registered, not skipped at run time: a skipped case would make the whole binary report
// "skipped" (tests/common/test_main.cc).
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace flashgpt::testing {

// ---- the error measure ----------------------------------------------------------------------

// max: max_i |got_i - want_i|; rms: sqrt(mean_i (got_i - want_i)^2).
enum class Norm { max, rms };

struct ErrorOptions {
  Norm norm = Norm::max;
  // The error is divided by max(floor, the same norm of want): floor 1 makes it absolute for
  // small tensors; a small floor (1e-30) makes it purely relative.
  double floor = 1.0;
};

// The error of `got` against the reference `want`. Infinities must match exactly (then they
// count as no error and are left out of the scale); a NaN on either side, an infinity on one
// side only or a size mismatch gives +inf.
struct OpError {
  double value = 0.0;     // absolute / scale: what tolerances bound
  double absolute = 0.0;  // the norm of got - want
  double scale = 1.0;     // max(floor, the norm of want)
  size_t worst = 0;       // the element of the largest |got - want|
  double got_worst = 0.0, want_worst = 0.0;
  size_t got_size = 0, want_size = 0;
  // "max error 3e-3 (scale 1.2) at element 17: got 0.51, want 0.513"
  std::string describe() const;
};

OpError op_error(std::span<const float> got, std::span<const double> want, ErrorOptions options = {});
OpError op_error(std::span<const float> got, std::span<const float> want, ErrorOptions options = {});
OpError op_error(std::span<const double> got, std::span<const double> want, ErrorOptions options = {});
OpError op_error(std::span<const double> got, std::span<const float> want, ErrorOptions options = {});

// Success when op_error(got, want, options).value <= tolerance; the failure names `what` and
// the worst element. For EXPECT_TRUE / ASSERT_TRUE.
template <class A, class B>
::testing::AssertionResult op_close(const std::string& what, const std::vector<A>& got, const std::vector<B>& want,
                                    double tolerance, ErrorOptions options = {}) {
  const OpError e = op_error(std::span<const A>(got), std::span<const B>(want), options);
  if (e.value <= tolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << e.describe() << " > tolerance " << tolerance;
}

// ---- finite differences -----------------------------------------------------------------------

struct FdOptions {
  double step = 1e-5;       // h of (f(x + h) - f(x - h)) / 2h
  double tolerance = 1e-6;  // on |analytic - numeric| / max(1, |numeric|)
};

// Checks analytic[i] against the central difference of loss() in x[i] for each i of `indices`,
// restoring x afterwards; loss() must read x. Records one failure per element out of
// tolerance, naming it, and returns the worst relative difference. In double with a smooth
// loss the central difference is good to about 1e-9 relative.
double expect_gradient_matches_fd(const std::string& what, std::vector<double>& x, const std::vector<double>& analytic,
                                  const std::function<double()>& loss, const std::vector<int64_t>& indices,
                                  FdOptions options = {});

// Every index of a tensor of n elements when n <= count, else `count` drawn at random.
std::vector<int64_t> sample_indices(int64_t n, int64_t count = 64, uint64_t seed = 7);
// 0, stride, 2 stride, ... < n (a stride prime to the inner sizes reaches every row and column).
std::vector<int64_t> strided_indices(int64_t n, int64_t stride);

// ---- the case table ----------------------------------------------------------------------------

// Registers one gtest per case, named `suite`/`backend`.`case.name`, running run(case); cases
// for which supported(case) is false are left out. Call before RUN_ALL_TESTS, e.g. from a
// namespace-scope initializer: `const bool registered = (register_op_cases(...), true);`.
// Returns the number registered.
template <class Case>
int register_op_cases(const std::string& suite, const std::string& backend, const std::vector<Case>& cases,
                      std::function<void(const Case&)> run,
                      std::function<bool(const Case&)> supported = [](const Case&) { return true; },
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  class OpCaseTest : public ::testing::Test {
   public:
    OpCaseTest(std::function<void(const Case&)> run, Case c) : run_(std::move(run)), case_(std::move(c)) {}
    void TestBody() override { run_(case_); }

   private:
    std::function<void(const Case&)> run_;
    Case case_;
  };
  const std::string suite_name = suite + "/" + backend;
  int registered = 0;
  for (const Case& c : cases) {
    if (!supported(c)) continue;
    ::testing::RegisterTest(suite_name.c_str(), c.name.c_str(), nullptr, nullptr, file, line,
                            [run, c]() -> ::testing::Test* { return new OpCaseTest(run, c); });
    ++registered;
  }
  return registered;
}

}  // namespace flashgpt::testing

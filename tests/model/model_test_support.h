// Helpers of the model tests: seeded random tensors and weighted losses; finite differences
// and the error measure come from the op-test harness (tests/common/op_test.h).
#pragma once

#include "common/op_test.h"

#include <flashgpt/tokenizer.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace flashgpt::model::testing {

template <class S = double>
std::vector<S> random_vector(int64_t n, uint64_t seed, double stddev = 1.0, double mean = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<S> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<S>(dist(gen));
  return v;
}

inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, vocab - 1);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int32_t>(dist(gen));
  return v;
}

// B training windows of T + 1 tokens, each drawn as mt19937(seed)() % V: the GPU model tests'
// batches.
inline std::vector<TokenId> random_windows(int64_t B, int64_t T, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> w(size_t(B * (T + 1)));
  for (auto& t : w) t = static_cast<TokenId>(rng() % V);
  return w;
}

template <class To, class From>
std::vector<To> cast_vector(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}

// Finite differences, index sampling and the error measure are the op-test harness's
// (tests/common/op_test.h), shared with every other op test.
using flashgpt::testing::expect_gradient_matches_fd;
using flashgpt::testing::op_close;
using flashgpt::testing::op_error;
using flashgpt::testing::sample_indices;

// The model tests' measure: max_i |a_i - b_i| / max_i |b_i|, the error relative to the
// reference tensor's scale.
inline constexpr flashgpt::testing::ErrorOptions kRelativeToMax{flashgpt::testing::Norm::max, 1e-30};

// sum_i w_i y_i: the scalar loss whose gradient w.r.t. y is w.
inline double weighted_sum(const std::vector<double>& y, const std::vector<double>& w) {
  double s = 0.0;
  for (size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
  return s;
}

}  // namespace flashgpt::model::testing

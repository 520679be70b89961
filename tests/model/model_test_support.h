// Helpers of the model tests: seeded random tensors, central finite differences in
// double, and error measures.
#pragma once

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

template <class To, class From>
std::vector<To> cast_vector(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}

// Checks analytic[i] against (f(x + h e_i) - f(x - h e_i)) / 2h for each index, x
// restored afterwards. f must be smooth near x; in double with h = 1e-5 the central
// difference is good to about 1e-9 relative for the functions tested here.
inline void expect_gradient_matches_fd(const char* what, std::vector<double>& x, const std::vector<double>& analytic,
                                       const std::function<double()>& f, const std::vector<int64_t>& indices,
                                       double tolerance = 1e-6, double h = 1e-5) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  for (const int64_t i : indices) {
    const double saved = x[static_cast<size_t>(i)];
    x[static_cast<size_t>(i)] = saved + h;
    const double plus = f();
    x[static_cast<size_t>(i)] = saved - h;
    const double minus = f();
    x[static_cast<size_t>(i)] = saved;
    const double numeric = (plus - minus) / (2 * h);
    const double a = analytic[static_cast<size_t>(i)];
    EXPECT_NEAR(a, numeric, tolerance * std::max(1.0, std::abs(numeric)))
        << what << ": gradient element " << i << " analytic " << a << " numeric " << numeric;
  }
}

// Every index of a tensor of n elements when n is small, else `count` spread over it.
inline std::vector<int64_t> sample_indices(int64_t n, int64_t count = 64, uint64_t seed = 7) {
  std::vector<int64_t> out;
  if (n <= count) {
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
    return out;
  }
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, n - 1);
  for (int64_t k = 0; k < count; ++k) out.push_back(dist(gen));
  return out;
}

// max_i |a_i - b_i| / max(max_i |b_i|, floor): the error relative to the tensor's scale.
template <class A, class B>
double max_scaled_error(const std::vector<A>& a, const std::vector<B>& b, double floor = 1e-30) {
  EXPECT_EQ(a.size(), b.size());
  double scale = floor, err = 0.0;
  for (size_t i = 0; i < b.size(); ++i) scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    err = std::max(err, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return err / scale;
}

// sum_i w_i y_i: the scalar loss whose gradient w.r.t. y is w.
inline double weighted_sum(const std::vector<double>& y, const std::vector<double>& w) {
  double s = 0.0;
  for (size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
  return s;
}

}  // namespace flashgpt::model::testing

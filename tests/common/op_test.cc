#include "common/op_test.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>

namespace flashgpt::testing {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

template <class A, class B>
OpError measure(std::span<const A> got, std::span<const B> want, ErrorOptions options) {
  OpError e;
  e.got_size = got.size(), e.want_size = want.size();
  if (got.size() != want.size()) {
    e.value = e.absolute = kInf;
    return e;
  }
  double scale_acc = 0.0, error_acc = 0.0, worst = -1.0;
  size_t finite = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    double err;
    if (std::isnan(g) || std::isnan(w)) {
      err = kInf;
    } else if (std::isinf(g) || std::isinf(w)) {
      err = g == w ? 0.0 : kInf;
    } else {
      err = std::abs(g - w);
      ++finite;
      scale_acc = options.norm == Norm::max ? std::max(scale_acc, std::abs(w)) : scale_acc + w * w;
    }
    error_acc = options.norm == Norm::max ? std::max(error_acc, err) : error_acc + err * err;
    if (err > worst) worst = err, e.worst = i;
  }
  if (options.norm == Norm::rms) {
    const double n = static_cast<double>(std::max<size_t>(want.size(), 1));
    error_acc = std::sqrt(error_acc / n);
    scale_acc = std::sqrt(scale_acc / static_cast<double>(std::max<size_t>(finite, 1)));
  }
  e.absolute = error_acc;
  e.scale = std::max(options.floor, scale_acc);
  e.value = e.absolute / e.scale;
  if (!want.empty()) e.got_worst = static_cast<double>(got[e.worst]), e.want_worst = static_cast<double>(want[e.worst]);
  return e;
}

}  // namespace

std::string OpError::describe() const {
  std::ostringstream out;
  if (got_size != want_size) {
    out << "size " << got_size << " where the reference has " << want_size;
    return out.str();
  }
  out << "error " << value << " (absolute " << absolute << ", scale " << scale << "), worst at element " << worst
      << ": got " << got_worst << ", want " << want_worst;
  return out.str();
}

OpError op_error(std::span<const float> got, std::span<const double> want, ErrorOptions options) {
  return measure(got, want, options);
}
OpError op_error(std::span<const float> got, std::span<const float> want, ErrorOptions options) {
  return measure(got, want, options);
}
OpError op_error(std::span<const double> got, std::span<const double> want, ErrorOptions options) {
  return measure(got, want, options);
}
OpError op_error(std::span<const double> got, std::span<const float> want, ErrorOptions options) {
  return measure(got, want, options);
}

double expect_gradient_matches_fd(const std::string& what, std::vector<double>& x, const std::vector<double>& analytic,
                                  const std::function<double()>& loss, const std::vector<int64_t>& indices,
                                  FdOptions options) {
  EXPECT_EQ(x.size(), analytic.size()) << what << ": the gradient and its input differ in size";
  if (x.size() != analytic.size()) return kInf;
  double worst = 0.0;
  for (const int64_t index : indices) {
    const size_t i = static_cast<size_t>(index);
    const double saved = x[i];
    x[i] = saved + options.step;
    const double plus = loss();
    x[i] = saved - options.step;
    const double minus = loss();
    x[i] = saved;
    const double numeric = (plus - minus) / (2 * options.step);
    const double difference = std::abs(analytic[i] - numeric) / std::max(1.0, std::abs(numeric));
    worst = std::max(worst, std::isnan(difference) ? kInf : difference);
    EXPECT_LE(difference, options.tolerance)
        << what << ": gradient element " << index << " analytic " << analytic[i] << " numeric " << numeric;
  }
  return worst;
}

std::vector<int64_t> sample_indices(int64_t n, int64_t count, uint64_t seed) {
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

std::vector<int64_t> strided_indices(int64_t n, int64_t stride) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; i += stride) out.push_back(i);
  return out;
}

}  // namespace flashgpt::testing

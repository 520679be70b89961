// Each kernel of the CUDA model backend (src/model/gpt_cuda_ops.h) and each cuBLASLt
// product shape (matmul_cublaslt.h) against a plain double-precision reference written
// here from the definitions, on random inputs rounded to bf16 where the kernel reads bf16,
// at awkward shapes (1, 17, 33, 1000 rows; channels not a multiple of 16; V not a multiple
// of 8). Dropout masks are compared bit for bit with philox.h's dropout_keep.
#include "common/op_test.h"

#include <flashgpt/model.h>
#include <flashgpt/philox.h>

#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "model/gpt_cuda_ops.h"
#include "model/matmul_cublaslt.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace flashgpt {
namespace {

using model_cuda::bf16;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

float bf16_round(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

template <typename T>
struct Dev {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  Dev(const std::vector<T>& host) : Dev(host.size()) { put(host); }
  ~Dev() { cudaFree(ptr); }
  Dev(const Dev&) = delete;
  void put(const std::vector<T>& host) {
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> get() const {
    std::vector<T> host(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  // Fills with a byte pattern, so unwritten elements show.
  void poison() { EXPECT_EQ(cudaMemset(ptr, 0x7F, n * sizeof(T)), cudaSuccess); }
};

std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f, float shift = 0.0f) {
  std::normal_distribution<float> dist(shift, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16_rn(v[i]);
  return out;
}
std::vector<float> to_float(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
  return out;
}
std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = bf16_round(x);
  return v;
}

// ||a - b|| / ||b|| (op_error's RMS norm, tests/common/op_test.h); any NaN gives +inf.
double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  return testing::op_error(a, b, {testing::Norm::rms, 1e-30}).value;
}

double gelu_tanh(double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
double gelu_tanh_grad(double x) {
  const double k = 0.7978845608028654, u = k * (x + 0.044715 * x * x * x), t = std::tanh(u);
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

// ---- LayerNorm ----

struct Shape {
  int64_t N;
  int C;
};

class LayerNormTest : public ::testing::TestWithParam<Shape> {};

// The inputs of a LayerNorm backward test: random x, w, b, a bf16-exact dy and the dx it
// accumulates into, on the device, with the forward run so that mean and rstd are there.
struct LayerNormBackwardCase {
  std::mt19937 rng;
  std::vector<float> x, w, b, dy, dx0;
  Dev<float> d_x, d_w, d_b, d_mean, d_rstd;
  Dev<bf16> d_dy;

  LayerNormBackwardCase(int64_t N, int C, uint32_t seed)
      : rng(seed),
        x(random_floats(size_t(N) * C, rng, 2.0f, 0.5f)),
        w(random_floats(C, rng, 0.5f, 1.0f)),
        b(random_floats(C, rng, 0.3f)),
        dy(rounded(random_floats(size_t(N) * C, rng))),
        dx0(random_floats(size_t(N) * C, rng)),
        d_x(x),
        d_w(w),
        d_b(b),
        d_mean(N),
        d_rstd(N),
        d_dy(to_bf16(dy)) {
    Dev<bf16> out(size_t(N) * C);
    model_cuda::layernorm_forward(out.ptr, d_mean.ptr, d_rstd.ptr, d_x.ptr, d_w.ptr, d_b.ptr, N, C, nullptr);
  }
};

TEST_P(LayerNormTest, ForwardAndBackwardMatchDoubleReference) {
  const auto [N, C] = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(N * 131 + C));
  const auto x = random_floats(size_t(N) * C, rng, 2.0f, 0.5f);
  const auto w = random_floats(C, rng, 0.5f, 1.0f);
  const auto b = random_floats(C, rng, 0.3f);
  const auto dy = rounded(random_floats(size_t(N) * C, rng));
  const auto dx0 = random_floats(size_t(N) * C, rng);  // accumulated into
  Dev<float> d_x(x), d_w(w), d_b(b), d_mean(N), d_rstd(N), d_dx(dx0);
  Dev<bf16> d_out(size_t(N) * C), d_dy(to_bf16(dy));
  d_out.poison();
  model_cuda::layernorm_forward(d_out.ptr, d_mean.ptr, d_rstd.ptr, d_x.ptr, d_w.ptr, d_b.ptr, N, C, nullptr);
  std::vector<float> dw0(C, 1.0f), db0(C, -1.0f);
  Dev<float> d_dw(dw0), d_db(db0), d_partial(model_cuda::layernorm_backward_partial_floats(N, C));
  model_cuda::layernorm_backward(d_dx.ptr, /*accumulate=*/true, d_dw.ptr, d_db.ptr, d_partial.ptr, d_dy.ptr, d_x.ptr,
                                 d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, nullptr);
  const auto out = to_float(d_out.get());
  const auto dx = d_dx.get(), dw = d_dw.get(), db = d_db.get(), mean = d_mean.get(), rstd = d_rstd.get();

  std::vector<double> ref_out(out.size()), ref_dx(dx.size()), ref_dw(C, 1.0), ref_db(C, -1.0);
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = &x[size_t(n) * C];
    const float* g = &dy[size_t(n) * C];
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += xr[c];
    m /= C;
    for (int c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    v /= C;
    const double rs = 1.0 / std::sqrt(v + kLayerNormEps);
    EXPECT_NEAR(mean[n], m, 1e-5 * (1 + std::fabs(m)));
    EXPECT_NEAR(rstd[n], rs, 1e-4 * rs);
    double a = 0, bsum = 0;
    for (int c = 0; c < C; ++c) {
      const double xhat = (xr[c] - m) * rs;
      ref_out[size_t(n) * C + c] = xhat * w[c] + b[c];
      a += g[c] * w[c];
      bsum += g[c] * w[c] * xhat;
      ref_dw[c] += g[c] * xhat;
      ref_db[c] += g[c];
    }
    a /= C;
    bsum /= C;
    for (int c = 0; c < C; ++c) {
      const double xhat = (xr[c] - m) * rs;
      ref_dx[size_t(n) * C + c] = dx0[size_t(n) * C + c] + rs * (g[c] * w[c] - a - xhat * bsum);
    }
  }
  EXPECT_LT(rel_error(out, ref_out), 5e-3);  // bf16 output: 2^-9 relative rounding
  EXPECT_LT(rel_error(dx, ref_dx), 1e-4);
  EXPECT_LT(rel_error(dw, ref_dw), 1e-4);
  EXPECT_LT(rel_error(db, ref_db), 1e-4);
}

// The LayerNorm backward fused with the next dropout backward: dx, dw, db and the bf16
// gradient of the dropout site must be the same bits as layernorm_backward followed by
// dropout_backward (whose mask the residual-dropout test checks against philox.h), with
// dropout on and off, accumulating or not, vector (C % 128 == 0) and scalar shapes.
TEST_P(LayerNormTest, BackwardFusedWithDropoutEqualsTheTwoOps) {
  const auto [N, C] = GetParam();
  for (const float p : {0.1f, 0.0f}) {
    for (const bool accumulate : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "p " << p << " accumulate " << accumulate);
      const LayerNormBackwardCase in(N, C, static_cast<uint32_t>(N * 17 + C + (accumulate ? 1 : 0)));
      const auto& dx0 = in.dx0;
      const auto &d_x = in.d_x, &d_w = in.d_w, &d_mean = in.d_mean, &d_rstd = in.d_rstd;
      const auto& d_dy = in.d_dy;
      const model_cuda::DropoutSite site = model_cuda::dropout_site(42, 9, 5, p);
      std::vector<float> dw0(C, 1.0f), db0(C, -1.0f);
      Dev<float> d_dx1(dx0), d_dw1(dw0), d_db1(db0), d_dx2(dx0), d_dw2(dw0), d_db2(db0);
      Dev<float> d_partial(model_cuda::layernorm_backward_partial_floats(N, C));
      Dev<bf16> d_next1(size_t(N) * C), d_next2(size_t(N) * C);
      d_next1.poison();
      d_next2.poison();
      model_cuda::layernorm_backward(d_dx1.ptr, accumulate, d_dw1.ptr, d_db1.ptr, d_partial.ptr, d_dy.ptr, d_x.ptr,
                                     d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, nullptr);
      model_cuda::dropout_backward(d_next1.ptr, d_dx1.ptr, N, C, site, nullptr);
      model_cuda::layernorm_backward_dropout(d_dx2.ptr, accumulate, d_dw2.ptr, d_db2.ptr, d_partial.ptr, d_dy.ptr,
                                             d_x.ptr, d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, d_next2.ptr, site,
                                             nullptr);
      EXPECT_EQ(d_dx1.get(), d_dx2.get());
      EXPECT_EQ(d_dw1.get(), d_dw2.get());
      EXPECT_EQ(d_db1.get(), d_db2.get());
      const auto next1 = to_float(d_next1.get()), next2 = to_float(d_next2.get());
      EXPECT_EQ(next1, next2);
      size_t dropped = 0;
      for (float v : next2) dropped += v == 0.0f;
      if (p > 0 && N * C >= 1000) {
        EXPECT_GT(dropped, size_t(N * C) / 20) << "the mask drops about 10 %";
      }
      if (p == 0) {
        EXPECT_LT(dropped, size_t(N * C) / 100 + 1);
      }
    }
  }
}

// The register LayerNorm backward (LayerNormBackwardKernel::registers; shared-memory kernel
// where C does not fit it): dx, dw, db against the shared-memory kernel (tested against
// double precision above) within fp32 rounding, the fused dropout gradient the same bits as
// dropout_backward of its own dx, and a second run the same bits; dropout on and off,
// accumulating or not.
TEST_P(LayerNormTest, RegisterBackwardMatchesSharedKernel) {
  const auto [N, C] = GetParam();
  for (const float p : {0.1f, 0.0f}) {
    for (const bool accumulate : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "p " << p << " accumulate " << accumulate);
      const LayerNormBackwardCase in(N, C, static_cast<uint32_t>(N * 23 + C + (accumulate ? 1 : 0)));
      const auto& dx0 = in.dx0;
      const auto &d_x = in.d_x, &d_w = in.d_w, &d_mean = in.d_mean, &d_rstd = in.d_rstd;
      const auto& d_dy = in.d_dy;
      const model_cuda::DropoutSite site = model_cuda::dropout_site(42, 9, 5, p);
      std::vector<float> dw0(C, 1.0f), db0(C, -1.0f);
      Dev<float> d_dx1(dx0), d_dw1(dw0), d_db1(db0), d_dx2(dx0), d_dw2(dw0), d_db2(db0), d_dx3(dx0), d_dw3(dw0),
          d_db3(db0);
      Dev<float> d_partial(model_cuda::layernorm_backward_partial_floats(N, C));
      Dev<bf16> d_next2(size_t(N) * C), d_next3(size_t(N) * C), d_mask_ref(size_t(N) * C);
      d_next2.poison();
      d_next3.poison();
      const auto shared = model_cuda::LayerNormBackwardKernel::shared;
      const auto registers = model_cuda::LayerNormBackwardKernel::registers;
      model_cuda::layernorm_backward_dropout(d_dx1.ptr, accumulate, d_dw1.ptr, d_db1.ptr, d_partial.ptr, d_dy.ptr,
                                             d_x.ptr, d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, nullptr, site, nullptr,
                                             shared);
      model_cuda::layernorm_backward_dropout(d_dx2.ptr, accumulate, d_dw2.ptr, d_db2.ptr, d_partial.ptr, d_dy.ptr,
                                             d_x.ptr, d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, d_next2.ptr, site, nullptr,
                                             registers);
      model_cuda::layernorm_backward_dropout(d_dx3.ptr, accumulate, d_dw3.ptr, d_db3.ptr, d_partial.ptr, d_dy.ptr,
                                             d_x.ptr, d_mean.ptr, d_rstd.ptr, d_w.ptr, N, C, d_next3.ptr, site, nullptr,
                                             registers);
      model_cuda::dropout_backward(d_mask_ref.ptr, d_dx2.ptr, N, C, site, nullptr);
      const auto dx1 = d_dx1.get(), dx2 = d_dx2.get(), dw1 = d_dw1.get(), dw2 = d_dw2.get(), db1 = d_db1.get(),
                 db2 = d_db2.get();
      EXPECT_LT(rel_error(dx2, std::vector<double>(dx1.begin(), dx1.end())), 1e-5);
      EXPECT_LT(rel_error(dw2, std::vector<double>(dw1.begin(), dw1.end())), 1e-5);
      EXPECT_LT(rel_error(db2, std::vector<double>(db1.begin(), db1.end())), 1e-5);
      EXPECT_EQ(to_float(d_next2.get()), to_float(d_mask_ref.get())) << "the fused dropout of its own dx";
      EXPECT_EQ(d_dx3.get(), dx2) << "a second run";
      EXPECT_EQ(d_dw3.get(), dw2);
      EXPECT_EQ(d_db3.get(), db2);
      EXPECT_EQ(to_float(d_next3.get()), to_float(d_next2.get()));
    }
  }
}

// The next sums (next_db, FLASHGPT_LN_BIAS_GRAD's bias gradients), both kernels, dropout on
// and off, accumulating or not: next_db += the column sums of the next_dy written, against a
// double reference within fp32 summation error (1e-5 of the column's sum of magnitudes:
// a row left out or counted twice is 1/N of it, at least 2e-4 here); dx, dw, db and next_dy
// the same bits as without next_db; a second run the same bits. C % 128 != 0 takes the
// column_sum fallback, C = 2048 (96 KB of shared memory) the raised shared-memory limit.
TEST_P(LayerNormTest, BackwardSumsTheNextGradientsColumns) {
  const auto [N, C] = GetParam();
  using model_cuda::LayerNormBackwardKernel;
  for (const auto kernel : {LayerNormBackwardKernel::shared, LayerNormBackwardKernel::registers}) {
    for (const float p : {0.1f, 0.0f}) {
      for (const bool accumulate : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "registers " << (kernel == LayerNormBackwardKernel::registers) << " p "
                                          << p << " accumulate " << accumulate);
        const LayerNormBackwardCase in(N, C, static_cast<uint32_t>(N * 29 + C + (accumulate ? 1 : 0)));
        const auto& dx0 = in.dx0;
        const model_cuda::DropoutSite site = model_cuda::dropout_site(42, 9, 5, p);
        std::vector<float> dw0(C, 1.0f), db0(C, -1.0f), ndb0(C);
        for (int c = 0; c < C; ++c) ndb0[size_t(c)] = 0.25f * float(c % 7) - 0.5f;
        Dev<float> d_dx1(dx0), d_dw1(dw0), d_db1(db0), d_dx2(dx0), d_dw2(dw0), d_db2(db0), d_ndb2(ndb0);
        Dev<float> d_dx3(dx0), d_dw3(dw0), d_db3(db0), d_ndb3(ndb0);
        Dev<float> d_partial(model_cuda::layernorm_backward_partial_floats(N, C));
        Dev<bf16> d_next1(size_t(N) * C), d_next2(size_t(N) * C), d_next3(size_t(N) * C);
        d_next1.poison();
        d_next2.poison();
        d_next3.poison();
        const auto run = [&](Dev<float>& dx, Dev<float>& dw, Dev<float>& db, Dev<bf16>& next, float* ndb) {
          model_cuda::layernorm_backward_dropout(dx.ptr, accumulate, dw.ptr, db.ptr, d_partial.ptr, in.d_dy.ptr,
                                                 in.d_x.ptr, in.d_mean.ptr, in.d_rstd.ptr, in.d_w.ptr, N, C, next.ptr,
                                                 site, nullptr, kernel, ndb);
        };
        run(d_dx1, d_dw1, d_db1, d_next1, nullptr);
        run(d_dx2, d_dw2, d_db2, d_next2, d_ndb2.ptr);
        run(d_dx3, d_dw3, d_db3, d_next3, d_ndb3.ptr);
        const auto next = to_float(d_next2.get());
        EXPECT_EQ(d_dx2.get(), d_dx1.get());
        EXPECT_EQ(d_dw2.get(), d_dw1.get());
        EXPECT_EQ(d_db2.get(), d_db1.get());
        EXPECT_EQ(next, to_float(d_next1.get()));
        const auto ndb = d_ndb2.get();
        std::vector<double> ref(ndb0.begin(), ndb0.end()), magnitude(size_t(C), 0.0);
        for (int64_t n = 0; n < N; ++n) {
          for (int c = 0; c < C; ++c) {
            ref[size_t(c)] += next[size_t(n * C + c)];
            magnitude[size_t(c)] += std::fabs(next[size_t(n * C + c)]);
          }
        }
        double worst = 0;
        for (int c = 0; c < C; ++c) {
          const double tol = 1e-5 * magnitude[size_t(c)] + 1e-6;
          ASSERT_NEAR(ndb[size_t(c)], ref[size_t(c)], tol) << "column " << c;
          worst = std::max(worst, std::fabs(ndb[size_t(c)] - ref[size_t(c)]) / tol);
        }
        EXPECT_EQ(d_ndb3.get(), ndb) << "a second run";
        EXPECT_EQ(to_float(d_next3.get()), next);
        EXPECT_EQ(d_dw3.get(), d_dw2.get());
        if (p > 0 && accumulate && kernel == LayerNormBackwardKernel::shared) {
          std::printf("N %lld C %d: next sums within %.3f of the tolerance\n", static_cast<long long>(N), C, worst);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, LayerNormTest,
                         ::testing::Values(Shape{1, 32}, Shape{17, 48}, Shape{33, 40}, Shape{1000, 768},
                                           Shape{4097, 80}, Shape{5, 2048}, Shape{3, 128}, Shape{257, 384},
                                           Shape{4097, 768}, Shape{17, 1024}, Shape{9, 640}));

// ---- residual + dropout, embedding ----

struct DropoutCase {
  int64_t N;
  int C;
  float p;
};

class ResidualDropoutTest : public ::testing::TestWithParam<DropoutCase> {};

TEST_P(ResidualDropoutTest, MaskIsPhiloxConventionBitForBit) {
  const auto [N, C, p] = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(N + 7 * C));
  const auto in = random_floats(size_t(N) * C, rng);
  const auto y = rounded(random_floats(size_t(N) * C, rng));
  const auto site = model_cuda::dropout_site(0x1234567890ull, 42, 5, p);
  Dev<float> d_in(in), d_out(size_t(N) * C), d_ones(std::vector<float>(size_t(N) * C, 1.0f)), d_mask(size_t(N) * C);
  Dev<bf16> d_y(to_bf16(y)), d_mask_bf16(size_t(N) * C);
  d_out.poison();
  model_cuda::residual_forward(d_out.ptr, d_in.ptr, d_y.ptr, N, C, site, nullptr);
  model_cuda::dropout_backward(d_mask.ptr, d_ones.ptr, N, C, site, nullptr);
  model_cuda::dropout_backward(d_mask_bf16.ptr, d_ones.ptr, N, C, site, nullptr);
  const auto out = d_out.get(), mask = d_mask.get();
  const auto mask_bf16 = to_float(d_mask_bf16.get());
  const uint32_t t = dropout_threshold(p);
  const float scale = static_cast<float>(dropout_keep_scale(t));
  int64_t dropped = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int c = 0; c < C; ++c) {
      const size_t i = size_t(n) * C + c;
      const bool keep = t == 0 || dropout_keep(DropoutRng{0x1234567890ull, 42}, 5, n, c, t);
      dropped += !keep;
      ASSERT_EQ(mask[i], keep ? scale : 0.0f) << "n " << n << " c " << c;
      ASSERT_EQ(mask_bf16[i], bf16_round(keep ? scale : 0.0f));
      const double ref = in[i] + (keep ? double(y[i]) * scale : 0.0);
      ASSERT_NEAR(out[i], ref, 1e-6 * (1 + std::fabs(ref))) << "n " << n << " c " << c;
    }
  }
  if (p > 0) {
    const double rate = double(dropped) / double(N * C);
    EXPECT_NEAR(rate, t / 256.0, 0.05) << "dropout rate";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ResidualDropoutTest,
                         ::testing::Values(DropoutCase{37, 768, 0.1f}, DropoutCase{17, 40, 0.5f},
                                           DropoutCase{1, 16, 0.0f}, DropoutCase{100, 72, 0.1f}));

// The fused residual + LayerNorm forward: the residual the same bits as residual_forward
// (whose mask the test above checks against philox.h), also in place (out == in); the
// LayerNorm of that residual against double precision; shapes on the fused path (C % 16 == 0,
// C <= 2048: one, two and four groups of 16 channels per lane) and on the fallback (the two
// ops in turn: C = 40, 2064).
class ResidualLayerNormTest : public ::testing::TestWithParam<DropoutCase> {};

TEST_P(ResidualLayerNormTest, ResidualBitsAndLayerNormMatchReference) {
  const auto [N, C, p] = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(N * 31 + C));
  const auto in = random_floats(size_t(N) * C, rng, 2.0f, 0.5f);
  const auto y = rounded(random_floats(size_t(N) * C, rng));
  const auto w = random_floats(C, rng, 0.5f, 1.0f);
  const auto b = random_floats(C, rng, 0.3f);
  const auto site = model_cuda::dropout_site(0xABCDEF12345ull, 7, 3, p);
  Dev<float> d_in(in), d_out(size_t(N) * C), d_ref_out(size_t(N) * C), d_w(w), d_b(b), d_mean(N), d_rstd(N),
      d_inplace(in), d_mean2(N), d_rstd2(N);
  Dev<bf16> d_y(to_bf16(y)), d_ln(size_t(N) * C), d_ln2(size_t(N) * C);
  d_out.poison();
  d_ln.poison();
  d_mean.poison();
  d_rstd.poison();
  model_cuda::residual_layernorm_forward(d_out.ptr, d_ln.ptr, d_mean.ptr, d_rstd.ptr, d_in.ptr, d_y.ptr, d_w.ptr,
                                         d_b.ptr, N, C, site, nullptr);
  model_cuda::residual_forward(d_ref_out.ptr, d_in.ptr, d_y.ptr, N, C, site, nullptr);
  model_cuda::residual_layernorm_forward(d_inplace.ptr, d_ln2.ptr, d_mean2.ptr, d_rstd2.ptr, d_inplace.ptr, d_y.ptr,
                                         d_w.ptr, d_b.ptr, N, C, site, nullptr);
  const auto out = d_out.get(), ref_out = d_ref_out.get(), inplace = d_inplace.get();
  const auto ln = to_float(d_ln.get()), ln2 = to_float(d_ln2.get());
  const auto mean = d_mean.get(), rstd = d_rstd.get();
  ASSERT_EQ(0, std::memcmp(out.data(), ref_out.data(), out.size() * sizeof(float)))
      << "the residual differs from residual_forward's";
  ASSERT_EQ(0, std::memcmp(inplace.data(), ref_out.data(), out.size() * sizeof(float))) << "in place";
  EXPECT_EQ(ln2, ln) << "in place, the LayerNorm output";
  std::vector<double> ref_ln(ln.size());
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = &out[size_t(n) * C];
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += xr[c];
    m /= C;
    for (int c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    v /= C;
    const double rs = 1.0 / std::sqrt(v + kLayerNormEps);
    EXPECT_NEAR(mean[n], m, 1e-5 * (1 + std::fabs(m))) << "row " << n;
    EXPECT_NEAR(rstd[n], rs, 1e-4 * rs) << "row " << n;
    for (int c = 0; c < C; ++c) ref_ln[size_t(n) * C + c] = (xr[c] - m) * rs * w[c] + b[c];
  }
  EXPECT_LT(rel_error(ln, ref_ln), 5e-3);  // bf16 output: 2^-9 relative rounding
}

INSTANTIATE_TEST_SUITE_P(Shapes, ResidualLayerNormTest,
                         ::testing::Values(DropoutCase{1, 768, 0.1f}, DropoutCase{17, 48, 0.5f},
                                           DropoutCase{1000, 768, 0.1f}, DropoutCase{4097, 80, 0.0f},
                                           DropoutCase{5, 2048, 0.1f}, DropoutCase{3, 1040, 0.1f},
                                           DropoutCase{257, 384, 0.1f}, DropoutCase{33, 40, 0.1f},
                                           DropoutCase{2, 2064, 0.1f}, DropoutCase{9, 16, 0.0f}));

// Both LayerNorm forwards with rows C + 8 apart (FLASHGPT_BIAS_ONES' ln1 / ln2): every row
// the same bits as with packed rows, and the columns from C on as write_ones_column left them
// (1, then seven 0), never touched. The shapes above, all with C % 8 == 0.
TEST_P(ResidualLayerNormTest, StridedOutputEqualsPackedAndKeepsTheOnesColumn) {
  const auto [N, C, p] = GetParam();
  const int64_t ld = C + 8;
  std::mt19937 rng(static_cast<uint32_t>(N * 17 + C));
  const auto in = random_floats(size_t(N) * C, rng, 2.0f, 0.5f);
  const auto y = rounded(random_floats(size_t(N) * C, rng));
  const auto w = random_floats(C, rng, 0.5f, 1.0f);
  const auto b = random_floats(C, rng, 0.3f);
  const auto site = model_cuda::dropout_site(0xABCDEF12345ull, 7, 3, p);
  Dev<float> d_in(in), d_out(size_t(N) * C), d_out2(size_t(N) * C), d_w(w), d_b(b), d_mean(N), d_rstd(N);
  Dev<bf16> d_y(to_bf16(y)), d_packed(size_t(N) * C), d_strided(size_t(N) * ld), d_plain_packed(size_t(N) * C),
      d_plain_strided(size_t(N) * ld);
  for (auto* d : {&d_strided, &d_plain_strided}) {
    d->poison();
    model_cuda::write_ones_column(d->ptr, N, C, ld, nullptr);
  }
  model_cuda::residual_layernorm_forward(d_out.ptr, d_packed.ptr, d_mean.ptr, d_rstd.ptr, d_in.ptr, d_y.ptr, d_w.ptr,
                                         d_b.ptr, N, C, site, nullptr);
  model_cuda::residual_layernorm_forward(d_out2.ptr, d_strided.ptr, d_mean.ptr, d_rstd.ptr, d_in.ptr, d_y.ptr,
                                         d_w.ptr, d_b.ptr, N, C, site, nullptr, ld);
  model_cuda::layernorm_forward(d_plain_packed.ptr, d_mean.ptr, d_rstd.ptr, d_in.ptr, d_w.ptr, d_b.ptr, N, C, nullptr);
  model_cuda::layernorm_forward(d_plain_strided.ptr, d_mean.ptr, d_rstd.ptr, d_in.ptr, d_w.ptr, d_b.ptr, N, C, nullptr,
                                ld);
  for (const auto& [packed_dev, strided_dev, what] :
       {std::tuple{&d_packed, &d_strided, "residual + layernorm"},
        std::tuple{&d_plain_packed, &d_plain_strided, "layernorm"}}) {
    SCOPED_TRACE(what);
    const auto packed = to_float(packed_dev->get()), strided = to_float(strided_dev->get());
    for (int64_t n = 0; n < N; ++n) {
      ASSERT_EQ(0, std::memcmp(&packed[size_t(n) * C], &strided[size_t(n) * ld], size_t(C) * sizeof(float)))
          << "row " << n;
      for (int64_t c = C; c < ld; ++c) {
        ASSERT_EQ(strided[size_t(n * ld + c)], c == C ? 1.0f : 0.0f) << "row " << n << ", column " << c;
      }
    }
  }
}

TEST(EncoderTest, ForwardAndBackwardMatchReference) {
  const int B = 3, T = 7, C = 40, Vrows = 50;
  const int64_t N = B * T;
  std::mt19937 rng(11);
  std::vector<int32_t> tokens(N);
  for (auto& tok : tokens) tok = static_cast<int32_t>(rng() % 6) * 7;  // repeats
  const auto wte = random_floats(size_t(Vrows) * C, rng), wpe = random_floats(size_t(T) * C, rng);
  const auto dx = random_floats(size_t(N) * C, rng);
  const auto site = model_cuda::dropout_site(99, 3, 0, 0.2f);
  Dev<int32_t> d_tokens(tokens);
  Dev<float> d_wte(wte), d_wpe(wpe), d_x0(size_t(N) * C), d_dx(dx);
  d_x0.poison();
  model_cuda::encoder_forward(d_x0.ptr, d_tokens.ptr, d_wte.ptr, d_wpe.ptr, N, T, C, site, nullptr);
  const auto x0 = d_x0.get();
  const uint32_t t = dropout_threshold(0.2f);
  const float scale = static_cast<float>(dropout_keep_scale(t));
  auto keep = [&](int64_t n, int c) { return dropout_keep(DropoutRng{99, 3}, 0, n, c, t); };
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      const float v = wte[size_t(tokens[n]) * C + c] + wpe[size_t(n % T) * C + c];
      ASSERT_FLOAT_EQ(x0[size_t(n) * C + c], keep(n, c) ? v * scale : 0.0f);
    }
  // Backward: through the dropout in place, then position rows and token rows.
  model_cuda::dropout_backward(d_dx.ptr, d_dx.ptr, N, C, site, nullptr);
  std::vector<float> dwte0(size_t(Vrows) * C, 0.5f), dwpe0(size_t(T) * C, -0.5f);
  Dev<float> d_dwte(dwte0), d_dwpe(dwpe0);
  model_cuda::encoder_backward_wpe(d_dwpe.ptr, d_dx.ptr, B, T, C, nullptr);
  std::map<int32_t, std::vector<int32_t>> groups;
  for (int64_t n = 0; n < N; ++n) groups[tokens[n]].push_back(static_cast<int32_t>(n));
  std::vector<int32_t> unique, starts, positions;
  for (auto& [tok, pos] : groups) {
    unique.push_back(tok);
    starts.push_back(static_cast<int32_t>(positions.size()));
    positions.insert(positions.end(), pos.begin(), pos.end());
  }
  starts.push_back(static_cast<int32_t>(positions.size()));
  Dev<int32_t> d_unique(unique), d_starts(starts), d_positions(positions),
      d_count(std::vector<int32_t>{static_cast<int32_t>(unique.size())});
  model_cuda::encoder_backward_wte(d_dwte.ptr, d_dx.ptr, d_unique.ptr, d_starts.ptr, d_positions.ptr, d_count.ptr, N, C,
                                   nullptr);
  const auto dwte = d_dwte.get(), dwpe = d_dwpe.get();
  std::vector<double> ref_wte(dwte0.begin(), dwte0.end()), ref_wpe(dwpe0.begin(), dwpe0.end());
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      const double g = keep(n, c) ? double(dx[size_t(n) * C + c]) * scale : 0.0;
      ref_wte[size_t(tokens[n]) * C + c] += g;
      ref_wpe[size_t(n % T) * C + c] += g;
    }
  EXPECT_LT(rel_error(dwte, ref_wte), 1e-6);
  EXPECT_LT(rel_error(dwpe, ref_wpe), 1e-6);
}

// ---- classifier ----

struct ClassifierCase {
  int64_t rows, V, Vp;
};

class ClassifierTest : public ::testing::TestWithParam<ClassifierCase> {};

// One kernel against the double-precision reference: the loss of every row, the gradient of
// every real column, 0 in every padding column, the logits untouched without gradients, and
// the same bits on a second run (deterministic). Returns the losses and the gradient.
struct ClassifierResult {
  std::vector<float> losses, grad;
};

ClassifierResult check_classifier(const ClassifierCase& shape, model_cuda::ClassifierKernel kernel,
                                  int grid_blocks_per_sm = 1, int grid_sms = 0) {
  const auto [rows, V, Vp] = shape;
  std::mt19937 rng(static_cast<uint32_t>(V + rows));
  const auto logits = rounded(random_floats(size_t(rows) * Vp, rng, 3.0f));
  std::vector<int32_t> targets(rows);
  for (auto& t : targets) t = static_cast<int32_t>(rng() % V);
  if (rows > 1) targets[1] = static_cast<int32_t>(V - 1);  // the last real column, next to the padding
  const float dloss = 0.25f;
  Dev<bf16> d_logits(to_bf16(logits)), d_logits_nograd(to_bf16(logits)), d_again(to_bf16(logits));
  Dev<float> d_losses(rows), d_losses2(rows), d_losses3(rows);
  Dev<int32_t> d_targets(targets);
  d_losses.poison();
  d_losses2.poison();
  d_losses3.poison();
  model_cuda::classifier_softmax_xent(d_logits.ptr, d_losses.ptr, d_targets.ptr, rows, V, Vp, dloss, true, nullptr,
                                      kernel, grid_blocks_per_sm, grid_sms);
  model_cuda::classifier_softmax_xent(d_logits_nograd.ptr, d_losses2.ptr, d_targets.ptr, rows, V, Vp, dloss, false,
                                      nullptr, kernel, grid_blocks_per_sm, grid_sms);
  model_cuda::classifier_softmax_xent(d_again.ptr, d_losses3.ptr, d_targets.ptr, rows, V, Vp, dloss, true, nullptr,
                                      kernel, grid_blocks_per_sm, grid_sms);
  const auto grad = to_float(d_logits.get()), untouched = to_float(d_logits_nograd.get());
  const auto losses = d_losses.get(), losses2 = d_losses2.get(), losses3 = d_losses3.get();
  EXPECT_EQ(untouched, logits) << "without gradients the logits stay";
  EXPECT_EQ(to_float(d_again.get()), grad) << "a second run gives the same gradient bits";
  EXPECT_EQ(losses3, losses) << "a second run gives the same loss bits";
  std::vector<float> grad_real;
  std::vector<double> ref_real;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = &logits[size_t(r) * Vp];
    double mx = -INFINITY, s = 0;
    for (int64_t c = 0; c < V; ++c) mx = std::max<double>(mx, row[c]);
    for (int64_t c = 0; c < V; ++c) s += std::exp(row[c] - mx);
    const double lse = mx + std::log(s);
    EXPECT_NEAR(losses[r], lse - row[targets[r]], 1e-3 * (1 + std::fabs(lse))) << "row " << r;
    EXPECT_EQ(losses[r], losses2[r]);
    for (int64_t c = 0; c < Vp; ++c) {
      const size_t i = size_t(r) * Vp + c;
      if (c >= V) {
        EXPECT_EQ(grad[i], 0.0f) << "padding column " << c << " of row " << r;
        if (grad[i] != 0.0f) return {losses, grad};
        continue;
      }
      grad_real.push_back(grad[i]);
      ref_real.push_back((std::exp(row[c] - lse) - (c == targets[r] ? 1.0 : 0.0)) * dloss);
    }
  }
  EXPECT_LT(rel_error(grad_real, ref_real), 1e-2);
  return {losses, grad};
}

TEST_P(ClassifierTest, LossAndGradientMatchReference) {
  check_classifier(GetParam(), model_cuda::ClassifierKernel::two_pass);
}

// The one-pass kernel (a cluster of blocks per row, the row in registers; two_pass beyond
// 131072 columns) against the same reference, and its losses against two_pass's.
TEST_P(ClassifierTest, ClusterKernelMatchesReferenceAndTwoPass) {
  const auto cluster = check_classifier(GetParam(), model_cuda::ClassifierKernel::cluster).losses;
  const auto two_pass = check_classifier(GetParam(), model_cuda::ClassifierKernel::two_pass).losses;
  ASSERT_EQ(cluster.size(), two_pass.size());
  for (size_t r = 0; r < cluster.size(); ++r)
    EXPECT_NEAR(cluster[r], two_pass[r], 1e-4 * (1 + std::fabs(two_pass[r]))) << "row " << r;
}

// The persistent-grid kernel at every grid size (1024 / B threads per block; fewer rows than
// blocks in the small cases, many rows per block in the large ones) against the same
// reference, and its losses and gradient against two_pass's: the gradient elementwise within
// one bf16 rounding step (at most 2^-7 relative) plus an absolute 1e-6 for values near 0.
TEST_P(ClassifierTest, L2TwoPassKernelMatchesReferenceAndTwoPass) {
  const auto two_pass = check_classifier(GetParam(), model_cuda::ClassifierKernel::two_pass);
  for (const int blocks_per_sm : {1, 2, 4, 8}) {
    SCOPED_TRACE("blocks per SM " + std::to_string(blocks_per_sm));
    const auto grid = check_classifier(GetParam(), model_cuda::ClassifierKernel::l2_two_pass, blocks_per_sm);
    ASSERT_EQ(grid.losses.size(), two_pass.losses.size());
    for (size_t r = 0; r < grid.losses.size(); ++r)
      EXPECT_NEAR(grid.losses[r], two_pass.losses[r], 1e-4 * (1 + std::fabs(two_pass.losses[r]))) << "row " << r;
    ASSERT_EQ(grid.grad.size(), two_pass.grad.size());
    size_t far = 0;
    for (size_t i = 0; i < grid.grad.size(); ++i)
      if (std::fabs(grid.grad[i] - two_pass.grad[i]) > 1e-6 + std::fabs(two_pass.grad[i]) / 128) ++far;
    EXPECT_EQ(far, 0u) << "gradient elements beyond one bf16 step of two_pass's";
  }
}

// l2_two_pass on part of the device (the overlapped classifier gives it a few SMs and the
// matmuls the rest): a block's arithmetic on a row does not depend on the grid, so 1, 3 and
// 37 SMs (more rows per block) give the bits of the whole device's grid.
TEST_P(ClassifierTest, L2TwoPassOnFewSmsGivesTheSameBits) {
  const auto all = check_classifier(GetParam(), model_cuda::ClassifierKernel::l2_two_pass, 1, 0);
  for (const int sms : {1, 3, 37}) {
    SCOPED_TRACE("grid over " + std::to_string(sms) + " SMs");
    const auto few = check_classifier(GetParam(), model_cuda::ClassifierKernel::l2_two_pass, 1, sms);
    EXPECT_EQ(few.losses, all.losses);
    EXPECT_EQ(few.grad, all.grad);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ClassifierTest,
                         ::testing::Values(ClassifierCase{5, 1000, 1024}, ClassifierCase{3, 50257, 50304},
                                           ClassifierCase{1, 8, 128}, ClassifierCase{17, 100277, 100352},
                                           ClassifierCase{2, 8, 8}, ClassifierCase{9, 33000, 33024},
                                           ClassifierCase{4, 100277, 100384}, ClassifierCase{1000, 1000, 1024},
                                           ClassifierCase{3, 1000, 20480},    // the second block all padding
                                           ClassifierCase{2, 16385, 16392},   // just over one block's columns
                                           ClassifierCase{2, 140000, 140032},  // wider than a cluster: two_pass
                                           // Many rows per block of l2_two_pass's grid (132 SMs: 132 to 1056 blocks).
                                           ClassifierCase{5000, 1000, 1024}, ClassifierCase{300, 100277, 100352},
                                           ClassifierCase{1100, 16385, 16392}));

TEST(LossSumTest, SumsInDoubleAndRepeats) {
  std::mt19937 rng(5);
  const auto losses = random_floats(10007, rng, 1.0f, 3.0f);
  Dev<float> d_losses(losses);
  Dev<double> d_out(1), d_out2(1);
  model_cuda::loss_sum(d_out.ptr, d_losses.ptr, 10007, nullptr);
  model_cuda::loss_sum(d_out2.ptr, d_losses.ptr, 10007, nullptr);
  double ref = 0;
  for (float l : losses) ref += l;
  EXPECT_NEAR(d_out.get()[0], ref, 1e-9 * std::fabs(ref));
  EXPECT_EQ(d_out.get()[0], d_out2.get()[0]);
}

// ---- optimizer ----

TEST(AdamWTest, MatchesTorchFormulaPerSegment) {
  const int64_t n = 1003;
  std::mt19937 rng(3);
  auto p = random_floats(n, rng), g = random_floats(n, rng), m = random_floats(n, rng, 0.1f),
       v = random_floats(n, rng, 0.1f);
  for (float& x : v) x = std::fabs(x);
  model_cuda::ParamSegments seg;
  seg.count = 3;
  seg.end[0] = 300, seg.end[1] = 501, seg.end[2] = n;
  seg.decay[0] = true, seg.decay[1] = false, seg.decay[2] = true;
  model_cuda::AdamWArgs a;
  a.lr = 1e-2f, a.beta1 = 0.9f, a.beta2 = 0.95f, a.eps = 1e-8f, a.weight_decay = 0.1f;
  a.bias_correction1 = 1 - std::pow(0.9f, 3.0f), a.bias_correction2 = 1 - std::pow(0.95f, 3.0f), a.grad_scale = 0.5f;
  Dev<float> d_p(p), d_g(g), d_m(m), d_v(v);
  Dev<bf16> d_pb(n);
  d_pb.poison();
  model_cuda::adamw_update(d_p.ptr, d_pb.ptr, d_g.ptr, d_m.ptr, d_v.ptr, n, seg, a, nullptr);
  const auto p1 = d_p.get(), m1 = d_m.get(), v1 = d_v.get();
  const auto pb = to_float(d_pb.get());
  for (int64_t i = 0; i < n; ++i) {
    const bool decay = i < 300 || i >= 501;
    const double gi = double(g[i]) * a.grad_scale;
    const double mi = a.beta1 * double(m[i]) + (1 - a.beta1) * gi;
    const double vi = a.beta2 * double(v[i]) + (1 - a.beta2) * gi * gi;
    double pi = p[i];
    if (decay) pi *= 1 - double(a.lr) * a.weight_decay;
    pi -= a.lr * (mi / a.bias_correction1) / (std::sqrt(vi / a.bias_correction2) + a.eps);
    ASSERT_NEAR(m1[i], mi, 1e-6 * (1 + std::fabs(mi)));
    ASSERT_NEAR(v1[i], vi, 1e-6 * (1 + std::fabs(vi)));
    ASSERT_NEAR(p1[i], pi, 1e-6 * (1 + std::fabs(pi))) << i;
    ASSERT_EQ(pb[i], bf16_round(p1[i]));
  }
}

// The 16-byte path (n, segment ends multiples of 4, aligned arrays) against the scalar one on
// the same values (the arrays shifted by one float, which the vector path cannot take): both
// call adamw_element, so params and moments agree to the last bits (1e-6 relative leaves the
// compiler its choice of FMA contraction), and both against the formula; the bf16 copy is
// the rounding of the params each path wrote.
TEST(AdamWTest, VectorPathEqualsScalarPath) {
  const int64_t n = 4100;
  std::mt19937 rng(5);
  auto p = random_floats(n, rng), g = random_floats(n, rng), m = random_floats(n, rng, 0.1f),
       v = random_floats(n, rng, 0.1f);
  for (float& x : v) x = std::fabs(x);
  model_cuda::ParamSegments seg;
  seg.count = 3;
  seg.end[0] = 1024, seg.end[1] = 1028, seg.end[2] = n;
  seg.decay[0] = true, seg.decay[1] = false, seg.decay[2] = true;
  model_cuda::AdamWArgs a;
  a.lr = 1e-2f, a.beta1 = 0.9f, a.beta2 = 0.95f, a.eps = 1e-8f, a.weight_decay = 0.1f;
  a.bias_correction1 = 1 - std::pow(0.9f, 2.0f), a.bias_correction2 = 1 - std::pow(0.95f, 2.0f), a.grad_scale = 0.7f;
  const auto shifted = [](const std::vector<float>& x) {
    std::vector<float> out(x.size() + 1, 0.0f);
    std::copy(x.begin(), x.end(), out.begin() + 1);
    return out;
  };
  Dev<float> d_p(p), d_g(g), d_m(m), d_v(v), s_p(shifted(p)), s_g(shifted(g)), s_m(shifted(m)), s_v(shifted(v));
  Dev<bf16> d_pb(n), s_pb(n + 1);
  d_pb.poison();
  s_pb.poison();
  model_cuda::adamw_update(d_p.ptr, d_pb.ptr, d_g.ptr, d_m.ptr, d_v.ptr, n, seg, a, nullptr);
  model_cuda::adamw_update(s_p.ptr + 1, s_pb.ptr + 1, s_g.ptr + 1, s_m.ptr + 1, s_v.ptr + 1, n, seg, a, nullptr);
  const auto p1 = d_p.get(), m1 = d_m.get(), v1 = d_v.get(), p2 = s_p.get(), m2 = s_m.get(), v2 = s_v.get();
  const auto pb1 = to_float(d_pb.get()), pb2 = to_float(s_pb.get());
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_NEAR(p1[i], p2[i + 1], 1e-6 * (1 + std::fabs(p2[i + 1]))) << i;
    ASSERT_NEAR(m1[i], m2[i + 1], 1e-6 * (1 + std::fabs(m2[i + 1]))) << i;
    ASSERT_NEAR(v1[i], v2[i + 1], 1e-6 * (1 + std::fabs(v2[i + 1]))) << i;
    ASSERT_EQ(pb1[i], bf16_round(p1[i])) << i;
    ASSERT_EQ(pb2[i + 1], bf16_round(p2[i + 1])) << i;
    const bool decay = i < 1024 || i >= 1028;
    const double gi = double(g[i]) * a.grad_scale;
    const double mi = a.beta1 * double(m[i]) + (1 - a.beta1) * gi;
    const double vi = a.beta2 * double(v[i]) + (1 - a.beta2) * gi * gi;
    double pi = p[i];
    if (decay) pi *= 1 - double(a.lr) * a.weight_decay;
    pi -= a.lr * (mi / a.bias_correction1) / (std::sqrt(vi / a.bias_correction2) + a.eps);
    ASSERT_NEAR(p1[i], pi, 1e-6 * (1 + std::fabs(pi))) << i;
  }
}

TEST(SumSquaresTest, MatchesDoubleAndRepeatsBitForBit) {
  // 1000, 4000000: the 16-byte path (n % 4 == 0); 1, 1000003: the scalar one.
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1000003}, int64_t{4000000}}) {
    std::mt19937 rng(static_cast<uint32_t>(n));
    const auto x = random_floats(n, rng);
    Dev<float> d_x(x);
    Dev<double> d_partial(model_cuda::sum_squares_partial_doubles()), d_out(1), d_out2(1);
    model_cuda::sum_squares(d_out.ptr, d_partial.ptr, d_x.ptr, n, nullptr);
    model_cuda::sum_squares(d_out2.ptr, d_partial.ptr, d_x.ptr, n, nullptr);
    double ref = 0;
    for (float f : x) ref += double(f) * f;
    EXPECT_NEAR(d_out.get()[0], ref, 1e-6 * ref) << "n " << n;
    EXPECT_EQ(d_out.get()[0], d_out2.get()[0]);
  }
}

TEST(ColumnSumTest, MatchesReferenceAndAccumulates) {
  for (auto [N, M] : {std::pair<int64_t, int>{1000, 40}, {3, 3072}, {1, 1}, {4097, 2304}, {17, 37}, {32768, 768},
                        {10000, 3072}}) {  // 10000: four-row steps and rows left over
    std::mt19937 rng(static_cast<uint32_t>(N + M));
    const auto x = rounded(random_floats(size_t(N) * M, rng));
    const auto out0 = random_floats(M, rng);
    Dev<bf16> d_x(to_bf16(x));
    Dev<float> d_out(out0), d_partial(model_cuda::column_sum_partial_floats(M));
    model_cuda::column_sum(d_out.ptr, d_partial.ptr, d_x.ptr, N, M, nullptr);
    std::vector<double> ref(out0.begin(), out0.end());
    for (int64_t r = 0; r < N; ++r)
      for (int c = 0; c < M; ++c) ref[c] += x[size_t(r) * M + c];
    EXPECT_LT(rel_error(d_out.get(), ref), 1e-5) << N << "x" << M;
  }
}

TEST(FloatToBf16Test, RoundsToNearestEven) {
  std::mt19937 rng(8);
  const auto x = random_floats(777, rng, 100.0f);
  Dev<float> d_x(x);
  Dev<bf16> d_y(777);
  model_cuda::float_to_bf16(d_y.ptr, d_x.ptr, 777, nullptr);
  const auto y = to_float(d_y.get());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(y[i], bf16_round(x[i]));
}

// split_weight_bias_grad against a plain loop, bit for bit (one fp32 addition or a copy per
// element): added and written, the float4 path (in % 4 == 0, ld % 4 == 0, aligned) and the
// scalar one (odd in, an ext shifted by one float), out not a multiple of anything.
TEST(SplitWeightBiasGradTest, MatchesPlainLoop) {
  struct Case {
    int64_t out;
    int in;
    int64_t ld, shift;
  };
  for (const Case& k : {Case{17, 40, 48, 0}, Case{3072, 768, 776, 0}, Case{1, 8, 16, 0}, Case{5, 6, 9, 0},
                        Case{33, 64, 72, 1}, Case{2304, 128, 129, 0}}) {
    for (const bool accumulate : {true, false}) {
      SCOPED_TRACE(std::to_string(k.out) + " x " + std::to_string(k.in) + ", ld " + std::to_string(k.ld) +
                   (accumulate ? ", added" : ", written"));
      std::mt19937 rng(static_cast<uint32_t>(k.out * 3 + k.in));
      const auto ext = random_floats(size_t(k.out * k.ld + k.shift), rng);
      const auto dw0 = random_floats(size_t(k.out) * k.in, rng), db0 = random_floats(size_t(k.out), rng);
      Dev<float> d_ext(ext), d_dw(dw0), d_db(db0);
      model_cuda::split_weight_bias_grad(d_dw.ptr, d_db.ptr, d_ext.ptr + k.shift, k.out, k.in, k.ld, accumulate,
                                         nullptr);
      std::vector<float> dw(dw0), db(db0);
      const float* e = ext.data() + k.shift;
      for (int64_t o = 0; o < k.out; ++o) {
        for (int i = 0; i < k.in; ++i) {
          float& d = dw[size_t(o * k.in + i)];
          d = accumulate ? d + e[o * k.ld + i] : e[o * k.ld + i];
        }
        db[size_t(o)] = accumulate ? db[size_t(o)] + e[o * k.ld + k.in] : e[o * k.ld + k.in];
      }
      EXPECT_EQ(d_dw.get(), dw);
      EXPECT_EQ(d_db.get(), db);
    }
  }
}

// ---- cuBLASLt products ----

struct MatmulCase {
  int64_t rows, in, out;
};

class MatmulTest : public ::testing::TestWithParam<MatmulCase> {};

// Every forward and backward epilogue, fp32 logits and dW += dY^T X (beta = 1) against
// double, with autotuning forced on or off (Matmul::set_autotune). Autotuned, each product
// first times its heuristic algorithms into scratch outputs: dW must still hold dw0 plus the
// product once, and once more after a second call with the chosen algorithm.
void expect_epilogues_match(const MatmulCase& c, bool autotune) {
  const auto [rows, in, out] = c;
  std::mt19937 rng(static_cast<uint32_t>(rows * 7 + in * 3 + out));
  const auto x = rounded(random_floats(size_t(rows) * in, rng));
  const auto w = rounded(random_floats(size_t(out) * in, rng, 0.2f));
  const auto bias = rounded(random_floats(out, rng, 0.5f));
  const auto dy = rounded(random_floats(size_t(rows) * out, rng));
  const auto aux_in = rounded(random_floats(size_t(rows) * in, rng));  // pre-activation for dgelu
  model_cuda::Matmul mm(size_t{32} << 20, /*deterministic=*/false);
  mm.set_autotune(autotune);
  Dev<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_bias(to_bf16(bias)), d_dy(to_bf16(dy)), d_aux_in(to_bf16(aux_in));
  Dev<bf16> d_y(size_t(rows) * out), d_gelu(size_t(rows) * out), d_pre(size_t(rows) * out), d_dx(size_t(rows) * in),
      d_dx_gelu(size_t(rows) * in);
  Dev<float> d_y32(size_t(rows) * out);
  const std::vector<float> dw0(size_t(out) * in, 0.5f);
  Dev<float> d_dw(dw0);
  for (auto* d : {&d_y, &d_gelu, &d_pre, &d_dx, &d_dx_gelu}) d->poison();
  mm.forward(d_y.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::bias, d_bias.ptr, nullptr, nullptr);
  mm.forward(d_gelu.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::gelu_aux_bias, d_bias.ptr, d_pre.ptr,
             nullptr);
  mm.forward_f32(d_y32.ptr, d_x.ptr, d_w.ptr, rows, in, out, nullptr);
  mm.backward_input(d_dx.ptr, d_dy.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::none, nullptr, nullptr);
  mm.backward_input(d_dx_gelu.ptr, d_dy.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::dgelu, d_aux_in.ptr,
                    nullptr);
  mm.backward_weight(d_dw.ptr, d_dy.ptr, d_x.ptr, rows, in, out, nullptr);
  std::vector<double> ref_y(size_t(rows) * out), ref_y32(size_t(rows) * out), ref_gelu(size_t(rows) * out),
      ref_dx(size_t(rows) * in), ref_dx_gelu(size_t(rows) * in), ref_dw(dw0.begin(), dw0.end());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += double(x[r * in + i]) * w[o * in + i];
      ref_y32[r * out + o] = s;
      ref_y[r * out + o] = s + bias[o];
      ref_gelu[r * out + o] = gelu_tanh(s + bias[o]);
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < in; ++i) {
      double s = 0;
      for (int64_t o = 0; o < out; ++o) s += double(dy[r * out + o]) * w[o * in + i];
      ref_dx[r * in + i] = s;
      ref_dx_gelu[r * in + i] = s * gelu_tanh_grad(aux_in[r * in + i]);
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += double(dy[r * out + o]) * x[r * in + i];
      ref_dw[o * in + i] += s;
    }
  EXPECT_LT(rel_error(to_float(d_y.get()), ref_y), 1e-2);
  EXPECT_LT(rel_error(to_float(d_pre.get()), ref_y), 1e-2);
  EXPECT_LT(rel_error(to_float(d_gelu.get()), ref_gelu), 1e-2);
  EXPECT_LT(rel_error(d_y32.get(), ref_y32), 1e-5);
  EXPECT_LT(rel_error(to_float(d_dx.get()), ref_dx), 1e-2);
  EXPECT_LT(rel_error(to_float(d_dx_gelu.get()), ref_dx_gelu), 1e-2);
  EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5);
  EXPECT_EQ(mm.tuned_plans(), autotune ? 6 : 0);
  EXPECT_EQ(mm.pending_plans(), 0);
  mm.backward_weight(d_dw.ptr, d_dy.ptr, d_x.ptr, rows, in, out, nullptr);
  for (size_t i = 0; i < ref_dw.size(); ++i) ref_dw[i] += ref_dw[i] - dw0[i];
  EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5);
}

TEST_P(MatmulTest, EpiloguesMatchDoubleReference) { expect_epilogues_match(GetParam(), /*autotune=*/false); }
TEST_P(MatmulTest, AutotunedEpiloguesMatchDoubleReference) { expect_epilogues_match(GetParam(), /*autotune=*/true); }

// The bias-gradient epilogue BGRADB (dW += dY^T X and db = column sums of dY) against
// double; db comes as fp32 or, where cuBLASLt takes no fp32 bias, bf16. Where cuBLASLt
// offers no algorithm (the model then sums the columns itself, ColumnSumTest), the test
// says so and is skipped.
void expect_bias_gradient_epilogue_matches(const MatmulCase& c, bool autotune) {
  const auto [rows, in, out] = c;
  std::mt19937 rng(static_cast<uint32_t>(rows * 5 + in * 11 + out));
  const auto x = rounded(random_floats(size_t(rows) * in, rng));
  const auto dy = rounded(random_floats(size_t(rows) * out, rng));
  model_cuda::Matmul mm(size_t{32} << 20, /*deterministic=*/false);
  mm.set_autotune(autotune);
  Dev<bf16> d_x(to_bf16(x)), d_dy(to_bf16(dy));
  const std::vector<float> dw0(size_t(out) * in, 0.25f);
  Dev<float> d_dw(dw0), d_db_out(out);
  d_db_out.poison();
  using BiasGrad = model_cuda::Matmul::BiasGrad;
  const BiasGrad bgradb = mm.backward_weight_bgrad(d_dw.ptr, d_db_out.ptr, d_dy.ptr, d_x.ptr, rows, in, out, nullptr);
  auto name = [](BiasGrad g) { return g == BiasGrad::none ? "no algorithm" : g == BiasGrad::f32 ? "fp32" : "bf16"; };
  std::printf("rows %lld in %lld out %lld: BGRADB %s\n", (long long)rows, (long long)in, (long long)out,
              name(bgradb));
  // db as written: fp32, or bf16 in the first half of the buffer.
  auto db_of = [](const Dev<float>& d, int64_t n, BiasGrad g) {
    const std::vector<float> raw = d.get();
    std::vector<float> values(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      values[size_t(i)] =
          g == BiasGrad::f32 ? raw[size_t(i)] : __bfloat162float(reinterpret_cast<const bf16*>(raw.data())[i]);
    }
    return values;
  };
  if (bgradb != BiasGrad::none) {
    std::vector<double> ref_dw(dw0.begin(), dw0.end()), ref_db(size_t(out), 0.0);
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t r = 0; r < rows; ++r) ref_db[o] += dy[r * out + o];
      for (int64_t i = 0; i < in; ++i) {
        double s = 0;
        for (int64_t r = 0; r < rows; ++r) s += double(dy[r * out + o]) * x[r * in + i];
        ref_dw[o * in + i] += s;
      }
    }
    EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5);
    EXPECT_LT(rel_error(db_of(d_db_out, out, bgradb), ref_db), bgradb == BiasGrad::f32 ? 1e-5 : 5e-3);
    EXPECT_EQ(mm.tuned_plans(), autotune ? 1 : 0);
  }
  // Deterministic mode never uses it (the column-sum kernel is its path).
  model_cuda::Matmul det(size_t{32} << 20, /*deterministic=*/true);
  det.set_autotune(autotune);
  EXPECT_EQ(det.backward_weight_bgrad(d_dw.ptr, d_db_out.ptr, d_dy.ptr, d_x.ptr, rows, in, out, nullptr),
            BiasGrad::none);
  if (bgradb == BiasGrad::none) {
    GTEST_SKIP() << "cuBLASLt offers no BGRADB algorithm here (" << rows << " x " << in << " x " << out
                 << "); the model sums the bias columns itself";
  }
}

TEST_P(MatmulTest, BiasGradientEpilogueMatchesDoubleReference) {
  expect_bias_gradient_epilogue_matches(GetParam(), /*autotune=*/false);
}
TEST_P(MatmulTest, AutotunedBiasGradientEpilogueMatchesDoubleReference) {
  expect_bias_gradient_epilogue_matches(GetParam(), /*autotune=*/true);
}

// The bias-ones products (FLASHGPT_BIAS_ONES): X (rows, in) stored ld = in + 8 apart with
// write_ones_column's constant columns; the forward with ld_x against double; the weight
// product dY^T [X | 1 | 0 ...] written (accumulate false) into a poisoned (out, ld) scratch
// and split_weight_bias_grad into dW += dY^T X and db += column sums of dY, against double.
void expect_bias_ones_products_match(const MatmulCase& c, bool autotune) {
  const auto [rows, in, out] = c;
  const int64_t ld = in + 8;
  std::mt19937 rng(static_cast<uint32_t>(rows * 13 + in * 7 + out));
  const auto x = rounded(random_floats(size_t(rows) * in, rng));
  const auto w = rounded(random_floats(size_t(out) * in, rng, 0.2f));
  const auto bias = rounded(random_floats(out, rng, 0.5f));
  const auto dy = rounded(random_floats(size_t(rows) * out, rng));
  model_cuda::Matmul mm(size_t{32} << 20, /*deterministic=*/false);
  mm.set_autotune(autotune);
  Dev<bf16> d_x(size_t(rows) * ld), d_w(to_bf16(w)), d_bias(to_bf16(bias)), d_dy(to_bf16(dy)),
      d_y(size_t(rows) * out);
  d_x.poison();
  const auto x_bf16 = to_bf16(x);
  CUDA_OK(cudaMemcpy2D(d_x.ptr, size_t(ld) * sizeof(bf16), x_bf16.data(), size_t(in) * sizeof(bf16),
                       size_t(in) * sizeof(bf16), size_t(rows), cudaMemcpyHostToDevice));
  model_cuda::write_ones_column(d_x.ptr, rows, static_cast<int>(in), ld, nullptr);
  const std::vector<float> dw0(size_t(out) * in, 0.5f), db0(size_t(out), -0.25f);
  Dev<float> d_ext(size_t(out) * ld), d_dw(dw0), d_db(db0);
  d_ext.poison();
  mm.forward(d_y.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::bias, d_bias.ptr, nullptr, nullptr, ld);
  mm.backward_weight(d_ext.ptr, d_dy.ptr, d_x.ptr, rows, ld, out, nullptr, /*accumulate=*/false);
  model_cuda::split_weight_bias_grad(d_dw.ptr, d_db.ptr, d_ext.ptr, out, static_cast<int>(in), ld,
                                     /*accumulate=*/true, nullptr);
  std::vector<double> ref_y(size_t(rows) * out), ref_dw(dw0.begin(), dw0.end()), ref_db(db0.begin(), db0.end());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = bias[o];
      for (int64_t i = 0; i < in; ++i) s += double(x[r * in + i]) * w[o * in + i];
      ref_y[r * out + o] = s;
    }
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t r = 0; r < rows; ++r) ref_db[o] += dy[r * out + o];
    for (int64_t i = 0; i < in; ++i) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += double(dy[r * out + o]) * x[r * in + i];
      ref_dw[o * in + i] += s;
    }
  }
  EXPECT_LT(rel_error(to_float(d_y.get()), ref_y), 1e-2);
  EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5);
  EXPECT_LT(rel_error(d_db.get(), ref_db), 1e-5);
  // A second step over the same scratch: the product overwrites it, the gradients add again.
  mm.backward_weight(d_ext.ptr, d_dy.ptr, d_x.ptr, rows, ld, out, nullptr, /*accumulate=*/false);
  model_cuda::split_weight_bias_grad(d_dw.ptr, d_db.ptr, d_ext.ptr, out, static_cast<int>(in), ld,
                                     /*accumulate=*/true, nullptr);
  for (size_t i = 0; i < ref_dw.size(); ++i) ref_dw[i] += ref_dw[i] - dw0[i];
  for (size_t i = 0; i < ref_db.size(); ++i) ref_db[i] += ref_db[i] - db0[i];
  EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5);
  EXPECT_LT(rel_error(d_db.get(), ref_db), 1e-5);
}

TEST_P(MatmulTest, BiasOnesProductsMatchDoubleReference) {
  expect_bias_ones_products_match(GetParam(), /*autotune=*/false);
}
TEST_P(MatmulTest, AutotunedBiasOnesProductsMatchDoubleReference) {
  expect_bias_ones_products_match(GetParam(), /*autotune=*/true);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatmulTest,
                         ::testing::Values(MatmulCase{17, 40, 24}, MatmulCase{1, 64, 192}, MatmulCase{33, 128, 512},
                                           MatmulCase{1000, 768, 2304}, MatmulCase{64, 512, 128},
                                           MatmulCase{256, 768, 3072}));

// Plans first met while a stream captures a graph (as GptCuda's first step does) run
// heuristic #0 in the graph and wait for tune_pending, which times them outside the capture
// without writing into any output (all still poisoned, dW and dbias as they were); the graph
// and then the tuned plans, eagerly, each add dY^T X once.
TEST(MatmulAutotuneTest, PlansMadeWhileCapturingAreTunedLaterWithoutTouchingOutputs) {
  const int64_t rows = 256, in = 768, out = 3072;
  std::mt19937 rng(16);
  const auto x = rounded(random_floats(size_t(rows) * in, rng));
  const auto w = rounded(random_floats(size_t(out) * in, rng, 0.2f));
  const auto bias = rounded(random_floats(out, rng, 0.5f));
  const auto dy = rounded(random_floats(size_t(rows) * out, rng));
  const auto aux_in = rounded(random_floats(size_t(rows) * in, rng));
  Dev<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_bias(to_bf16(bias)), d_dy(to_bf16(dy)), d_aux_in(to_bf16(aux_in));
  Dev<bf16> d_y(size_t(rows) * out), d_gelu(size_t(rows) * out), d_pre(size_t(rows) * out),
      d_dx_gelu(size_t(rows) * in);
  const std::vector<float> dw0(size_t(out) * in, 0.5f);
  Dev<float> d_dw(dw0), d_dw_bgrad(dw0), d_db(out);
  for (auto* d : {&d_y, &d_gelu, &d_pre, &d_dx_gelu}) d->poison();
  d_db.poison();
  // Dev::poison's pattern, byte 0x7F everywhere.
  auto untouched = [](const auto& host) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
    return std::all_of(bytes, bytes + host.size() * sizeof(host[0]), [](unsigned char b) { return b == 0x7F; });
  };

  model_cuda::Matmul mm(size_t{32} << 20, /*deterministic=*/false);
  mm.set_autotune(true);
  using BiasGrad = model_cuda::Matmul::BiasGrad;
  BiasGrad bgradb = BiasGrad::none;
  auto enqueue = [&](cudaStream_t s) {
    mm.forward(d_y.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::bias, d_bias.ptr, nullptr, s);
    mm.forward(d_gelu.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::gelu_aux_bias, d_bias.ptr,
               d_pre.ptr, s);
    mm.backward_input(d_dx_gelu.ptr, d_dy.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::dgelu, d_aux_in.ptr, s);
    mm.backward_weight(d_dw.ptr, d_dy.ptr, d_x.ptr, rows, in, out, s);
    bgradb = mm.backward_weight_bgrad(d_dw_bgrad.ptr, d_db.ptr, d_dy.ptr, d_x.ptr, rows, in, out, s);
  };
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue(stream);
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  const int plans = bgradb == BiasGrad::none ? 4 : 5;
  EXPECT_EQ(mm.pending_plans(), plans);
  EXPECT_EQ(mm.tuned_plans(), 0);
  mm.tune_pending(stream);
  CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT_EQ(mm.pending_plans(), 0);
  EXPECT_EQ(mm.tuned_plans(), plans);
  for (auto* d : {&d_y, &d_gelu, &d_pre, &d_dx_gelu}) EXPECT_TRUE(untouched(d->get()));
  EXPECT_EQ(d_dw.get(), dw0);
  EXPECT_EQ(d_dw_bgrad.get(), dw0);
  EXPECT_TRUE(untouched(d_db.get()));

  std::vector<double> ref_y(size_t(rows) * out), ref_gelu(size_t(rows) * out), ref_dx_gelu(size_t(rows) * in),
      ref_dw(dw0.begin(), dw0.end()), ref_db(size_t(out), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += double(x[r * in + i]) * w[o * in + i];
      ref_y[r * out + o] = acc + bias[o];
      ref_gelu[r * out + o] = gelu_tanh(acc + bias[o]);
      ref_db[o] += dy[r * out + o];
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < in; ++i) {
      double acc = 0;
      for (int64_t o = 0; o < out; ++o) acc += double(dy[r * out + o]) * w[o * in + i];
      ref_dx_gelu[r * in + i] = acc * gelu_tanh_grad(aux_in[r * in + i]);
    }
  std::vector<double> product(size_t(out) * in, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) product[o * in + i] += double(dy[r * out + o]) * x[r * in + i];
  auto check = [&](int adds) {
    for (size_t i = 0; i < ref_dw.size(); ++i) ref_dw[i] = dw0[i] + adds * product[i];
    EXPECT_LT(rel_error(to_float(d_y.get()), ref_y), 1e-2) << adds;
    EXPECT_LT(rel_error(to_float(d_pre.get()), ref_y), 1e-2) << adds;
    EXPECT_LT(rel_error(to_float(d_gelu.get()), ref_gelu), 1e-2) << adds;
    EXPECT_LT(rel_error(to_float(d_dx_gelu.get()), ref_dx_gelu), 1e-2) << adds;
    EXPECT_LT(rel_error(d_dw.get(), ref_dw), 1e-5) << adds;
    if (bgradb == BiasGrad::none) return;
    EXPECT_LT(rel_error(d_dw_bgrad.get(), ref_dw), 1e-5) << adds;
    std::vector<float> db = d_db.get();
    if (bgradb == BiasGrad::bf16) {
      for (int64_t o = 0; o < out; ++o) db[size_t(o)] = __bfloat162float(reinterpret_cast<const bf16*>(db.data())[o]);
    }
    db.resize(size_t(out));
    EXPECT_LT(rel_error(db, ref_db), bgradb == BiasGrad::f32 ? 1e-5 : 5e-3) << adds;
  };
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  check(1);  // the graph: heuristic #0
  enqueue(stream);
  CUDA_OK(cudaStreamSynchronize(stream));
  check(2);  // the tuned plans
  EXPECT_EQ(mm.tuned_plans(), plans);  // nothing timed twice
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// Deterministic mode keeps heuristic #0 whatever set_autotune says: nothing is timed and the
// bits equal those of a deterministic Matmul without autotuning.
TEST(MatmulAutotuneTest, DeterministicModeIgnoresIt) {
  const int64_t rows = 1000, in = 768, out = 2304;
  std::mt19937 rng(17);
  const auto x = rounded(random_floats(size_t(rows) * in, rng));
  const auto w = rounded(random_floats(size_t(out) * in, rng, 0.2f));
  const auto bias = rounded(random_floats(out, rng, 0.5f));
  Dev<bf16> d_x(to_bf16(x)), d_w(to_bf16(w)), d_bias(to_bf16(bias));
  struct Result {
    std::vector<bf16> dx;
    std::vector<float> dw;
    int timed_or_pending = -1;
  };
  auto run = [&](bool autotune) {
    model_cuda::Matmul mm(size_t{32} << 20, /*deterministic=*/true);
    mm.set_autotune(autotune);
    Dev<bf16> d_y(size_t(rows) * out), d_pre(size_t(rows) * out), d_dx(size_t(rows) * in);
    Dev<float> d_dw(std::vector<float>(size_t(out) * in, 0.5f));
    mm.forward(d_y.ptr, d_x.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::gelu_aux_bias, d_bias.ptr, d_pre.ptr,
               nullptr);
    mm.backward_input(d_dx.ptr, d_y.ptr, d_w.ptr, rows, in, out, model_cuda::Epilogue::dgelu, d_pre.ptr, nullptr);
    mm.backward_weight(d_dw.ptr, d_y.ptr, d_x.ptr, rows, in, out, nullptr);
    return Result{d_dx.get(), d_dw.get(), mm.tuned_plans() + mm.pending_plans()};
  };
  const Result with = run(/*autotune=*/true), without = run(/*autotune=*/false);
  EXPECT_EQ(with.timed_or_pending, 0);
  EXPECT_EQ(without.timed_or_pending, 0);
  ASSERT_EQ(with.dx.size(), without.dx.size());
  EXPECT_EQ(std::memcmp(with.dx.data(), without.dx.data(), with.dx.size() * sizeof(bf16)), 0);
  EXPECT_EQ(std::memcmp(with.dw.data(), without.dw.data(), with.dw.size() * sizeof(float)), 0);
}

TEST(ModelCudaOpsTest, EntryPointsRejectBadArguments) {
  EXPECT_THROW(model_cuda::layernorm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4, 8, nullptr),
               std::exception);
  Dev<bf16> logits(16);
  Dev<float> losses(1);
  Dev<int32_t> targets(1);
  EXPECT_THROW(model_cuda::classifier_softmax_xent(logits.ptr, losses.ptr, targets.ptr, 1, 20, 12, 1.0f, true, nullptr),
               std::exception);
  EXPECT_THROW(model_cuda::classifier_softmax_xent(logits.ptr, losses.ptr, targets.ptr, 1, 20, 12, 1.0f, true, nullptr,
                                                   model_cuda::ClassifierKernel::cluster),
               std::exception);
  for (const int blocks_per_sm : {0, 3, 16}) {
    EXPECT_THROW(model_cuda::classifier_softmax_xent(logits.ptr, losses.ptr, targets.ptr, 1, 8, 16, 1.0f, true,
                                                     nullptr, model_cuda::ClassifierKernel::l2_two_pass,
                                                     blocks_per_sm),
                 std::exception)
        << blocks_per_sm << " blocks per SM";
  }
  EXPECT_THROW(model_cuda::classifier_softmax_xent(logits.ptr, losses.ptr, targets.ptr, 1, 8, 16, 1.0f, true, nullptr,
                                                   model_cuda::ClassifierKernel::l2_two_pass, 1, -1),
               std::exception)
      << "a negative SM count";
  Dev<float> x(64);
  Dev<bf16> y(64), ln(64);
  EXPECT_THROW(model_cuda::residual_layernorm_forward(x.ptr, ln.ptr, losses.ptr, losses.ptr, nullptr, y.ptr, x.ptr,
                                                      x.ptr, 4, 16, model_cuda::DropoutSite{}, nullptr),
               std::exception);
  EXPECT_THROW(model_cuda::residual_layernorm_forward(x.ptr, ln.ptr, losses.ptr, losses.ptr, x.ptr, y.ptr, x.ptr,
                                                      x.ptr, 4, 0, model_cuda::DropoutSite{}, nullptr),
               std::exception);
  // A LayerNorm output's row stride below C, or not a multiple of 8 where C is.
  EXPECT_THROW(model_cuda::layernorm_forward(ln.ptr, losses.ptr, losses.ptr, x.ptr, x.ptr, x.ptr, 2, 16, nullptr, 8),
               std::exception);
  EXPECT_THROW(model_cuda::residual_layernorm_forward(x.ptr, ln.ptr, losses.ptr, losses.ptr, x.ptr, y.ptr, x.ptr,
                                                      x.ptr, 2, 16, model_cuda::DropoutSite{}, nullptr, 20),
               std::exception);
  // The split needs the bias column after the weight's: ld > in.
  EXPECT_THROW(model_cuda::split_weight_bias_grad(x.ptr, x.ptr, x.ptr, 2, 8, 8, true, nullptr), std::exception);
  EXPECT_THROW(model_cuda::write_ones_column(y.ptr, 2, 8, 8, nullptr), std::exception);
  // next_db sums next_dy: without it there is nothing to sum.
  Dev<float> partial(model_cuda::layernorm_backward_partial_floats(4, 16));
  EXPECT_THROW(model_cuda::layernorm_backward_dropout(x.ptr, true, x.ptr, x.ptr, partial.ptr, y.ptr, x.ptr, x.ptr,
                                                      x.ptr, x.ptr, 4, 16, nullptr, model_cuda::DropoutSite{},
                                                      nullptr, model_cuda::LayerNormBackwardKernel::shared, x.ptr),
               std::exception);
}

}  // namespace
}  // namespace flashgpt

// The layers: each reference backward (double) against central finite differences, each
// fp32 layer against its double reference on random inputs with awkward shapes, and the
// dropout masks against the Philox convention of model.h.
#include "model/gemm_cpu.h"
#include "model/layers_cpu.h"
#include "model/layers_reference.h"
#include "model/model_test_support.h"
#include "model/rows_cpu.h"

#include <flashgpt/model.h>
#include <flashgpt/philox.h>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace flashgpt::model {
namespace {

namespace ref = reference;
using testing::cast_vector;
using testing::expect_gradient_matches_fd;
using testing::kRelativeToMax;
using testing::op_close;
using testing::op_error;
using testing::random_tokens;
using testing::random_vector;
using testing::sample_indices;
using testing::weighted_sum;

// fp32 layers against double references: the error relative to the output's scale.
// Sums of up to ~800 fp32 products carry ~1e-6 relative error; 2e-5 leaves a margin of
// ten while catching any indexing or formula mistake (those give O(1) errors).
constexpr double kFp32Tolerance = 2e-5;

// ---- finite differences of the double references ----

TEST(ModelLayersFd, Encoder) {
  const int64_t B = 2, T = 3, C = 5, V = 7;
  const std::vector<int32_t> tokens = {1, 4, 1, 6, 1, 0};  // repeats: the scatter must add
  std::vector<double> wte = random_vector(V * C, 1), wpe = random_vector(T * C, 2);
  const std::vector<double> w = random_vector(B * T * C, 3);
  auto f = [&] {
    std::vector<double> out(B * T * C);
    ref::encoder_forward<double>(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    return weighted_sum(out, w);
  };
  std::vector<double> dwte(V * C, 0.0), dwpe(T * C, 0.0);
  ref::encoder_backward<double>(dwte.data(), dwpe.data(), w.data(), tokens.data(), B, T, C);
  expect_gradient_matches_fd("encoder dwte", wte, dwte, f, sample_indices(V * C));
  expect_gradient_matches_fd("encoder dwpe", wpe, dwpe, f, sample_indices(T * C));
}

TEST(ModelLayersFd, LayerNorm) {
  const int64_t N = 3, C = 17;
  std::vector<double> x = random_vector(N * C, 4, 2.0, 0.5), wt = random_vector(C, 5, 1.0, 1.0),
                      b = random_vector(C, 6);
  const std::vector<double> w = random_vector(N * C, 7);
  auto f = [&] {
    std::vector<double> out(N * C);
    ref::layernorm_forward<double>(out.data(), x.data(), wt.data(), b.data(), N, C);
    return weighted_sum(out, w);
  };
  std::vector<double> dx(N * C, 0.0), dw(C, 0.0), db(C, 0.0);
  ref::layernorm_backward<double>(dx.data(), dw.data(), db.data(), w.data(), x.data(), wt.data(), N, C);
  expect_gradient_matches_fd("layernorm dinp", x, dx, f, sample_indices(N * C));
  expect_gradient_matches_fd("layernorm dw", wt, dw, f, sample_indices(C));
  expect_gradient_matches_fd("layernorm db", b, db, f, sample_indices(C));
}

TEST(ModelLayersFd, Matmul) {
  const int64_t N = 3, IC = 5, OC = 7;
  std::vector<double> x = random_vector(N * IC, 8), wt = random_vector(OC * IC, 9), b = random_vector(OC, 10);
  const std::vector<double> w = random_vector(N * OC, 11);
  auto f = [&] {
    std::vector<double> out(N * OC);
    ref::matmul_forward<double>(out.data(), x.data(), wt.data(), b.data(), N, IC, OC);
    return weighted_sum(out, w);
  };
  std::vector<double> dx(N * IC, 0.0), dw(OC * IC, 0.0), db(OC, 0.0);
  ref::matmul_backward<double>(dx.data(), dw.data(), db.data(), w.data(), x.data(), wt.data(), N, IC, OC);
  expect_gradient_matches_fd("matmul dinp", x, dx, f, sample_indices(N * IC));
  expect_gradient_matches_fd("matmul dw", wt, dw, f, sample_indices(OC * IC));
  expect_gradient_matches_fd("matmul db", b, db, f, sample_indices(OC));
}

TEST(ModelLayersFd, Gelu) {
  const int64_t n = 41;
  std::vector<double> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = -5.0 + 0.25 * i;  // both tails and the bend
  const std::vector<double> w = random_vector(n, 12);
  auto f = [&] {
    std::vector<double> out(n);
    ref::gelu_forward<double>(out.data(), x.data(), n);
    return weighted_sum(out, w);
  };
  std::vector<double> dx(n, 0.0);
  ref::gelu_backward<double>(dx.data(), x.data(), w.data(), n);
  expect_gradient_matches_fd("gelu", x, dx, f, sample_indices(n));
  EXPECT_NEAR(ref::gelu(1.0), 0.8411919906082768, 1e-12);  // torch gelu(1, approximate='tanh')
}

TEST(ModelLayersFd, ResidualDropout) {
  const int64_t N = 4, C = 19;
  const DropoutRng rng{1234, 5};
  const uint32_t threshold = dropout_threshold(0.3f);
  std::vector<double> x = random_vector(N * C, 13), y = random_vector(N * C, 14);
  const std::vector<double> w = random_vector(N * C, 15);
  auto f = [&] {
    std::vector<double> out(N * C);
    ref::residual_dropout_forward<double>(out.data(), x.data(), y.data(), N, C, rng, 3, threshold);
    return weighted_sum(out, w);
  };
  std::vector<double> dy(N * C, 0.0);
  ref::dropout_backward<double>(dy.data(), w.data(), N, C, rng, 3, threshold);
  expect_gradient_matches_fd("residual dropout dx", x, w, f, sample_indices(N * C));
  expect_gradient_matches_fd("residual dropout dy", y, dy, f, sample_indices(N * C));
}

void attention_fd(float dropout) {
  const int64_t B = 2, T = 5, C = 64, NH = 2;
  const DropoutRng rng{99, 3};
  std::vector<double> qkv = random_vector(B * T * 3 * C, 16, 0.5);
  const std::vector<double> w = random_vector(B * T * C, 17);
  auto f = [&] {
    std::vector<double> out(B * T * C);
    ref::attention_forward<double>(out.data(), qkv.data(), B, T, C, NH, dropout, rng);
    return weighted_sum(out, w);
  };
  std::vector<double> dqkv(B * T * 3 * C, 0.0);
  ref::attention_backward<double>(dqkv.data(), w.data(), qkv.data(), B, T, C, NH, dropout, rng);
  expect_gradient_matches_fd("attention dqkv", qkv, dqkv, f, sample_indices(B * T * 3 * C, 200));
}

TEST(ModelLayersFd, Attention) { attention_fd(0.0f); }
TEST(ModelLayersFd, AttentionDropout) { attention_fd(0.25f); }

TEST(ModelLayersFd, Classifier) {
  const int64_t N = 4, C = 6, V = 11, Vp = 16;
  std::vector<double> x = random_vector(N * C, 18), wte = random_vector(Vp * C, 19);
  const std::vector<int32_t> targets = {3, 10, 0, 3};
  const double dloss = 0.7;
  auto f = [&] { return dloss * ref::classifier_forward_backward<double>(nullptr, nullptr, x.data(), wte.data(),
                                                                          targets.data(), N, C, V, 0.0); };
  std::vector<double> dx(N * C, 0.0), dwte(Vp * C, 0.0);
  ref::classifier_forward_backward<double>(dx.data(), dwte.data(), x.data(), wte.data(), targets.data(), N, C, V,
                                           dloss);
  expect_gradient_matches_fd("classifier dinp", x, dx, f, sample_indices(N * C));
  expect_gradient_matches_fd("classifier dwte", wte, dwte, f, sample_indices(Vp * C, 200));
  for (int64_t i = V * C; i < Vp * C; ++i) EXPECT_EQ(dwte[i], 0.0) << "padding row gradient at " << i;
}

// ---- fp32 layers against the double references ----

// The fp32 layers as op tables (tests/common/op_test.h): ModelLayerOp/cpu.<layer>_<shape>, each
// case the fp32 layer forward and backward against the double reference on random inputs.
// A CUDA backend registers the same tables under ModelLayerOp/cuda.

struct EncoderCase {
  std::string name;
  int64_t B, T, C;
};

void encoder_fp32(const EncoderCase& c) {
  const auto [name, B, T, C] = c;
  const int64_t V = 50, Tmax = T + 3;
  const auto tokens = random_tokens(B * T, V, 20);
  const auto wte = random_vector(V * C, 21), wpe = random_vector(Tmax * C, 22), g = random_vector(B * T * C, 23);
  std::vector<double> out_ref(B * T * C), dwte_ref(V * C, 0.0), dwpe_ref(Tmax * C, 0.0);
  ref::encoder_forward<double>(out_ref.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
  ref::encoder_backward<double>(dwte_ref.data(), dwpe_ref.data(), g.data(), tokens.data(), B, T, C);
  const auto wte_f = cast_vector<float>(wte), wpe_f = cast_vector<float>(wpe), g_f = cast_vector<float>(g);
  std::vector<float> out(B * T * C), dwte(V * C, 0.0f), dwpe(Tmax * C, 0.0f);
  encoder_forward(out.data(), tokens.data(), wte_f.data(), wpe_f.data(), B, T, C);
  encoder_backward(dwte.data(), dwpe.data(), g_f.data(), tokens.data(), B, T, C);
  EXPECT_TRUE(op_close("out", out, out_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("dwte", dwte, dwte_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("dwpe", dwpe, dwpe_ref, kFp32Tolerance, kRelativeToMax));
}

[[maybe_unused]] const int kEncoderCases = flashgpt::testing::register_op_cases<EncoderCase>(
    "ModelLayerOp", "cpu", {{"encoder_1x1x1", 1, 1, 1}, {"encoder_3x17x33", 3, 17, 33}, {"encoder_2x64x64", 2, 64, 64}},
    encoder_fp32);

struct LayerNormCase {
  std::string name;
  int64_t N, C;
};

void layernorm_fp32(const LayerNormCase& c) {
  const auto [name, N, C] = c;
  const auto x = random_vector(N * C, 24, 3.0, 1.0), w = random_vector(C, 25, 0.5, 1.0), b = random_vector(C, 26),
             g = random_vector(N * C, 27);
  std::vector<double> out_ref(N * C), dx_ref(N * C, 0.0), dw_ref(C, 0.0), db_ref(C, 0.0);
  ref::layernorm_forward<double>(out_ref.data(), x.data(), w.data(), b.data(), N, C);
  ref::layernorm_backward<double>(dx_ref.data(), dw_ref.data(), db_ref.data(), g.data(), x.data(), w.data(), N, C);
  const auto x_f = cast_vector<float>(x), w_f = cast_vector<float>(w), b_f = cast_vector<float>(b),
             g_f = cast_vector<float>(g);
  std::vector<float> out(N * C), mean(N), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f), db(C, 0.0f);
  layernorm_forward(out.data(), mean.data(), rstd.data(), x_f.data(), w_f.data(), b_f.data(), N, C);
  layernorm_backward(dx.data(), dw.data(), db.data(), g_f.data(), x_f.data(), w_f.data(), mean.data(), rstd.data(), N,
                     C);
  EXPECT_TRUE(op_close("out", out, out_ref, kFp32Tolerance, kRelativeToMax));
  if (C > 1) {  // with C = 1 the normalised value is 0 and dinp is 0 up to rounding
    EXPECT_TRUE(op_close("dinp", dx, dx_ref, kFp32Tolerance, kRelativeToMax));
  }
  EXPECT_TRUE(op_close("dw", dw, dw_ref, kFp32Tolerance, {flashgpt::testing::Norm::max, 1e-6}));
  EXPECT_TRUE(op_close("db", db, db_ref, kFp32Tolerance, kRelativeToMax));
}

[[maybe_unused]] const int kLayerNormCases = flashgpt::testing::register_op_cases<LayerNormCase>(
    "ModelLayerOp", "cpu",
    {{"layernorm_1x1", 1, 1}, {"layernorm_17x17", 17, 17}, {"layernorm_64x64", 64, 64}, {"layernorm_5x771", 5, 771}},
    layernorm_fp32);

struct MatmulCase {
  std::string name;
  int64_t N, IC, OC;
  bool bias;
};

void matmul_fp32(const MatmulCase& c) {
  const auto [name, N, IC, OC, bias] = c;
  const auto x = random_vector(N * IC, 28), w = random_vector(OC * IC, 29), b = random_vector(OC, 30),
             g = random_vector(N * OC, 31);
  std::vector<double> out_ref(N * OC), dx_ref(N * IC, 0.0), dw_ref(OC * IC, 0.0), db_ref(OC, 0.0);
  ref::matmul_forward<double>(out_ref.data(), x.data(), w.data(), bias ? b.data() : nullptr, N, IC, OC);
  ref::matmul_backward<double>(dx_ref.data(), dw_ref.data(), db_ref.data(), g.data(), x.data(), w.data(), N, IC, OC);
  const auto x_f = cast_vector<float>(x), w_f = cast_vector<float>(w), b_f = cast_vector<float>(b),
             g_f = cast_vector<float>(g);
  // The gradients accumulate: start them from a known value and subtract it again.
  std::vector<float> out(N * OC, 7.0f), dx(N * IC, 7.0f), dw(OC * IC, 1.0f), db(OC, 1.0f);
  matmul_forward(out.data(), x_f.data(), w_f.data(), bias ? b_f.data() : nullptr, N, IC, OC);
  matmul_backward(dx.data(), dw.data(), db.data(), g_f.data(), x_f.data(), w_f.data(), N, IC, OC);
  for (auto& v : dw) v -= 1.0f;
  for (auto& v : db) v -= 1.0f;
  EXPECT_TRUE(op_close("out", out, out_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("dinp", dx, dx_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("dw", dw, dw_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("db", db, db_ref, kFp32Tolerance, kRelativeToMax));
}

std::vector<MatmulCase> matmul_cases() {
  std::vector<MatmulCase> cases;
  for (const auto& [N, IC, OC] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {17, 33, 5}, {64, 64, 192},
                                 {5, 100, 1}, {3, 768, 17}}) {
    for (const bool bias : {true, false}) {
      cases.push_back({"matmul_" + std::to_string(N) + "x" + std::to_string(IC) + "x" + std::to_string(OC) +
                           (bias ? "_bias" : ""),
                       N, IC, OC, bias});
    }
  }
  return cases;
}

[[maybe_unused]] const int kMatmulCases =
    flashgpt::testing::register_op_cases<MatmulCase>("ModelLayerOp", "cpu", matmul_cases(), matmul_fp32);

// gemm_cpu (BLAS where built with it) and the OpenMP loops against a double product, for
// every transpose combination, padded leading dimensions and alpha/beta.
TEST(ModelLayersFp32, GemmBothPaths) {
  for (const auto& [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {17, 5, 33}, {7, 64, 1}, {40, 13, 9},
                                   {3, 700, 20}, {150, 70, 5}}) {  // column slabs; several row slabs
    for (const Trans ta : {Trans::no, Trans::yes}) {
      for (const Trans tb : {Trans::no, Trans::yes}) {
        const int64_t lda = (ta == Trans::no ? K : M) + 3, ldb = (tb == Trans::no ? N : K) + 2, ldc = N + 1;
        const int64_t a_rows = ta == Trans::no ? M : K, b_rows = tb == Trans::no ? K : N;
        const auto A = random_vector<float>(a_rows * lda, 32), B = random_vector<float>(b_rows * ldb, 33),
                   C0 = random_vector<float>(M * ldc, 34);
        const float alpha = 0.75f, beta = -0.5f;
        std::vector<double> expected(M * ldc);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            if (j >= N) {
              expected[i * ldc + j] = C0[i * ldc + j];  // outside C: untouched
              continue;
            }
            double acc = 0.0;
            for (int64_t k = 0; k < K; ++k) {
              const double a = ta == Trans::no ? A[i * lda + k] : A[k * lda + i];
              const double b = tb == Trans::no ? B[k * ldb + j] : B[j * ldb + k];
              acc += a * b;
            }
            expected[i * ldc + j] = alpha * acc + beta * C0[i * ldc + j];
          }
        std::vector<float> c_fast = C0, c_loops = C0;
        gemm_cpu(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, c_fast.data(), ldc);
        gemm_cpu_loops(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, c_loops.data(), ldc);
        EXPECT_LT(op_error(c_fast, expected, kRelativeToMax).value, kFp32Tolerance) << M << "x" << N << "x" << K;
        EXPECT_LT(op_error(c_loops, expected, kRelativeToMax).value, kFp32Tolerance) << M << "x" << N << "x" << K;
        // beta = 0 overwrites C without reading it, even where it holds NaN.
        std::vector<float> c_nan(M * ldc, NAN);
        gemm_cpu(ta, tb, M, N, K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f, c_nan.data(), ldc);
        gemm_cpu_loops(ta, tb, M, N, K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f, c_nan.data(), ldc);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) ASSERT_TRUE(std::isfinite(c_nan[i * ldc + j])) << i << "," << j;
      }
    }
  }
}

// The softmax's exponential (rows_cpu.h) within 2 ulp of std::exp over its range, 0 below it.
TEST(ModelLayersFp32, ExpNeg) {
  EXPECT_EQ(exp_neg_cpu(0.0f), 1.0f);
  EXPECT_EQ(exp_neg_cpu(-88.0f), 0.0f);
  EXPECT_EQ(exp_neg_cpu(-std::numeric_limits<float>::infinity()), 0.0f);
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f * static_cast<float>(i) / 200000.0f;
    const double want = std::exp(static_cast<double>(x));
    const double ulp = std::nextafter(static_cast<float>(want), 2.0f) - static_cast<float>(want);
    ASSERT_LE(std::fabs(exp_neg_cpu(x) - want), 2.0 * ulp) << "x = " << x;
  }
}

TEST(ModelLayersFp32, Gelu) {
  for (const int64_t n : {int64_t{1}, int64_t{17}, int64_t{1001}, int64_t{4097}, int64_t{40000}}) {
  SCOPED_TRACE(::testing::Message() << "n " << n);
  const auto x = random_vector(n, 35, 3.0), g = random_vector(n, 36);
  std::vector<double> out_ref(n), dx_ref(n, 0.0);
  ref::gelu_forward<double>(out_ref.data(), x.data(), n);
  ref::gelu_backward<double>(dx_ref.data(), x.data(), g.data(), n);
  const auto x_f = cast_vector<float>(x), g_f = cast_vector<float>(g);
  std::vector<float> out(n), dx(n);
  gelu_forward(out.data(), x_f.data(), n);
  gelu_backward(dx.data(), x_f.data(), g_f.data(), n);
  EXPECT_LT(op_error(out, out_ref, kRelativeToMax).value, kFp32Tolerance);
  EXPECT_LT(op_error(dx, dx_ref, kRelativeToMax).value, kFp32Tolerance);
  std::vector<float> in_place = g_f;  // dinp may alias dout
  gelu_backward(in_place.data(), x_f.data(), in_place.data(), n);
  EXPECT_EQ(in_place, dx);
  }
}

struct AttentionLayerCase {
  std::string name;
  int64_t B, T, C, NH;
  float dropout;
};

void attention_fp32(const AttentionLayerCase& c) {
  const auto [name, B, T, C, NH, dropout] = c;
  const DropoutRng rng{0xabcdef12345ull, 77};
  const auto qkv = random_vector(B * T * 3 * C, 37), g = random_vector(B * T * C, 38);
  std::vector<double> out_ref(B * T * C), dqkv_ref(B * T * 3 * C, 0.0);
  ref::attention_forward<double>(out_ref.data(), qkv.data(), B, T, C, NH, dropout, rng);
  ref::attention_backward<double>(dqkv_ref.data(), g.data(), qkv.data(), B, T, C, NH, dropout, rng);
  const auto qkv_f = cast_vector<float>(qkv), g_f = cast_vector<float>(g);
  std::vector<float> out(B * T * C), lse(B * NH * T), dqkv(B * T * 3 * C, NAN);
  attention_forward(out.data(), lse.data(), qkv_f.data(), B, T, C, NH, dropout, rng);
  attention_backward(dqkv.data(), g_f.data(), qkv_f.data(), out.data(), lse.data(), B, T, C, NH, dropout, rng);
  EXPECT_TRUE(op_close("out", out, out_ref, kFp32Tolerance, kRelativeToMax));
  EXPECT_TRUE(op_close("dqkv", dqkv, dqkv_ref, kFp32Tolerance, kRelativeToMax));
}

[[maybe_unused]] const int kAttentionCases = flashgpt::testing::register_op_cases<AttentionLayerCase>(
    "ModelLayerOp", "cpu",
    {{"attention_1x1x64_nh2", 1, 1, 64, 2, 0.0f},
     {"attention_3x17x64_nh2", 3, 17, 64, 2, 0.0f},
     {"attention_2x64x128_nh2", 2, 64, 128, 2, 0.0f},
     {"attention_1x33x96_nh1", 1, 33, 96, 1, 0.0f},
     {"attention_1x1x64_nh2_dropout", 1, 1, 64, 2, 0.1f},
     {"attention_3x17x64_nh2_dropout", 3, 17, 64, 2, 0.1f},
     {"attention_2x40x128_nh4_dropout", 2, 40, 128, 4, 0.3f}},
    attention_fp32);

// Vocabularies of one slab, several with a short last one, and more slabs than dinp groups
// (layers_cpu.cc: 256 columns a slab, 16 groups).
TEST(ModelLayersFp32, ClassifierChunks) {
  for (const auto& [N, C, V] : {std::tuple<int64_t, int64_t, int64_t>{17, 33, 101}, {9, 20, 1000}, {5, 7, 4353}}) {
  SCOPED_TRACE(::testing::Message() << "N " << N << " C " << C << " V " << V);
  const int64_t Vp = model_padded_vocab(V);
  const auto x = random_vector(N * C, 39), wte = random_vector(Vp * C, 40, 0.3);
  const auto targets = random_tokens(N, V, 41);
  const double dloss = 1.0 / N;
  std::vector<double> dx_ref(N * C, 0.0), dwte_ref(Vp * C, 0.0);
  const double loss_ref = ref::classifier_forward_backward<double>(dx_ref.data(), dwte_ref.data(), x.data(), wte.data(),
                                                                   targets.data(), N, C, V, dloss);
  const auto x_f = cast_vector<float>(x), wte_f = cast_vector<float>(wte);
  for (const int64_t chunk : {int64_t{1}, int64_t{5}, N, int64_t{100}}) {
    SCOPED_TRACE(::testing::Message() << "chunk_rows " << chunk);
    std::vector<float> dx(N * C, NAN), dwte(Vp * C, 0.0f), losses(N),
        logits(static_cast<size_t>(classifier_scratch_floats(std::min(chunk, N), C, V)));
    const double loss = classifier_forward_backward(dx.data(), dwte.data(), losses.data(), logits.data(), x_f.data(),
                                                    wte_f.data(), targets.data(), N, C, V, static_cast<float>(dloss),
                                                    chunk);
    EXPECT_NEAR(loss, loss_ref, 1e-5 * loss_ref);
    EXPECT_LT(op_error(dx, dx_ref, kRelativeToMax).value, kFp32Tolerance);
    EXPECT_LT(op_error(dwte, dwte_ref, kRelativeToMax).value, kFp32Tolerance);
    for (int64_t i = V * C; i < Vp * C; ++i) ASSERT_EQ(dwte[i], 0.0f) << "padding row gradient at " << i;
    std::vector<float> losses_fwd(N);
    const double loss_fwd = classifier_forward_backward(nullptr, nullptr, losses_fwd.data(), logits.data(), x_f.data(),
                                                        wte_f.data(), targets.data(), N, C, V, 0.0f, chunk);
    EXPECT_EQ(loss_fwd, loss);
    EXPECT_EQ(losses_fwd, losses);
  }
  }
}

// ---- dropout ----

// The fp32 layers drop exactly the elements the convention names: kept when
// dropout_keep(rng, site, n, c, t), scaled by 256 / (256 - t).
TEST(ModelDropout, MasksFollowThePhiloxConvention) {
  const int64_t N = 37, C = 70;  // C not a multiple of 16: the last Philox call is partial
  const DropoutSite site{DropoutRng{0x1234567890abcdefull, 42}, 5, dropout_threshold(0.1f)};
  ASSERT_EQ(site.threshold, 26u);  // round(0.1 * 256)
  const float scale = static_cast<float>(dropout_keep_scale(site.threshold));
  const auto x = random_vector<float>(N * C, 42), y = random_vector<float>(N * C, 43);
  std::vector<float> out(N * C), dy(N * C), embed = y;
  residual_dropout_forward(out.data(), x.data(), y.data(), N, C, site);
  dropout_backward(dy.data(), y.data(), N, C, site);
  dropout_forward(embed.data(), N, C, site);
  int64_t dropped = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const bool keep = dropout_keep(site.rng, site.site, n, c, site.threshold);
      const size_t i = static_cast<size_t>(n * C + c);
      const float kept = keep ? y[i] * scale : 0.0f;
      ASSERT_EQ(out[i], x[i] + kept) << n << "," << c;
      ASSERT_EQ(dy[i], kept) << n << "," << c;
      ASSERT_EQ(embed[i], kept) << n << "," << c;
      dropped += keep ? 0 : 1;
    }
  EXPECT_GT(dropped, 0);
}

// Over 1M elements the dropped fraction is t / 256 and the mean multiplier is 1 (the
// expectation is kept), within 6 standard deviations; another site or step gives another mask.
TEST(ModelDropout, ExpectationIsKept) {
  const int64_t N = 4096, C = 256;
  for (const float p : {0.1f, 0.5f}) {
    const DropoutSite site{DropoutRng{7, 3}, 1, dropout_threshold(p)};
    const double q = site.threshold / 256.0;
    std::vector<float> ones(N * C, 1.0f), out(N * C), other(N * C);
    dropout_backward(out.data(), ones.data(), N, C, site);
    dropout_backward(other.data(), ones.data(), N, C, DropoutSite{DropoutRng{7, 4}, 1, site.threshold});
    double sum = 0.0;
    int64_t dropped = 0, same = 0;
    for (int64_t i = 0; i < N * C; ++i) {
      sum += out[i];
      dropped += out[i] == 0.0f;
      same += (out[i] == 0.0f) == (other[i] == 0.0f);
    }
    const double n = static_cast<double>(N * C);
    const double sigma_frac = std::sqrt(q * (1 - q) / n);
    EXPECT_NEAR(dropped / n, q, 6 * sigma_frac) << "p " << p;
    // mean multiplier: Bernoulli(1 - q) * 1 / (1 - q): standard deviation sqrt(q / (1 - q) / n)
    EXPECT_NEAR(sum / n, 1.0, 6 * std::sqrt(q / (1 - q) / n)) << "p " << p;
    // two independent masks agree on a fraction q^2 + (1 - q)^2 of the elements
    const double agree = q * q + (1 - q) * (1 - q);
    EXPECT_NEAR(same / n, agree, 6 * std::sqrt(agree * (1 - agree) / n)) << "p " << p;
  }
}

TEST(ModelDropout, BelowOneIn512IsIdentity) {
  const DropoutSite site{DropoutRng{1, 1}, 0, dropout_threshold(0.001f)};
  EXPECT_EQ(site.threshold, 0u);
  const auto x = random_vector<float>(64, 44), y = random_vector<float>(64, 45);
  std::vector<float> out(64);
  residual_dropout_forward(out.data(), x.data(), y.data(), 4, 16, site);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(out[i], x[i] + y[i]);
}

}  // namespace
}  // namespace flashgpt::model

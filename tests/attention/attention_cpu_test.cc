// The tiled CPU attention against the double-accumulating reference, the reference
// against finite differences, and the properties the header promises: masked rows,
// huge logits, the dropout mask and rate, determinism, strides, errors, memory and IO.
#include "attention/attention_cpu_reference.h"
#include "attention/attention_cpu_simd.h"
#include "attention/attention_cpu_test_support.h"
#include "attention/attention_op_cases.h"
#include "common/op_test.h"
#include "common/test_support.h"

#include <flashgpt/attention_cpu.h>
#include <flashgpt/cpu_isa.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

using testing::attention_any_nan;
using testing::attention_buffers_widen;
using testing::AttentionBuffers;
using testing::AttentionShape;
using testing::budget;
using testing::dense;
using testing::kBackwardTol;
using testing::kCausal;
using testing::kForwardTol;
using testing::kFull;
using testing::op_close;
using testing::tiles;
using testing::varlen;

// The ctest entries that force a vector ISA (FLASHGPT_CPU_ISA=baseline, avx2) run this whole
// suite with it; where the CPU lacks it they skip (77) instead of failing.
[[maybe_unused]] const bool kIsaAvailable = [] {
  const char* forced = std::getenv("FLASHGPT_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return true;
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    if (std::strcmp(forced, cpu_isa_name(isa)) == 0 && !cpu_isa_supported(isa)) {
      std::printf("FLASHGPT_CPU_ISA=%s: this CPU cannot run it, skipping\n", forced);
      std::exit(77);
    }
  }
  return true;
}();

// The op table (attention_op_cases.h) on the CPU backend: AttentionOp/cpu.<case>.
[[maybe_unused]] const int kCpuCases = testing::register_op_cases<testing::AttentionCase>(
    "AttentionOp", "cpu", testing::cases_for(testing::kCpuBackend, testing::attention_op_cases()),
    testing::expect_cpu_matches_reference);

// The edges of the vector kernels: tiles whose sides are not multiples of any register width
// (the padded lanes and keys), a row block wider than one register group with a ragged last
// group, causal blocks cut inside a register, GQA, varlen and dropout together.
[[maybe_unused]] const int kCpuVectorEdgeCases = testing::register_op_cases<testing::AttentionCase>(
    "AttentionVectorEdges", "cpu",
    {
        {"q33_k45_d96_causal_dropout_gqa", dense(2, 33, 45, 4, 2, 96, kCausal, 0.2f), tiles(19, 21)},
        {"q45_k33_d32_causal", dense(1, 45, 33, 2, 2, 32, kCausal, 0.0f), tiles(17, 9)},
        {"len70_d256_full", dense(1, 70, 70, 2, 1, 256, kFull, 0.1f), tiles(23, 17)},
        {"len31_d128_one_tile", dense(2, 31, 31, 2, 2, 128, kCausal, 0.0f), tiles(31, 31)},
        {"len200_d64_tall_rows", dense(1, 200, 200, 2, 2, 64, kCausal, 0.1f), tiles(37, 5)},
        {"varlen_d64_odd_tiles", varlen({9, 0, 50, 1}, {20, 3, 50, 0}, 2, 1, 64, kCausal, 0.15f), tiles(11, 13)},
    },
    testing::expect_cpu_matches_reference);

// simd_exp, the softmax's exp, against double exp for every ISA this CPU runs: within 2 ulp
// over its normal range (every 97th float of it, both signs), 0 below, the same at the ends.
TEST(AttentionVectorExp, WithinTwoUlpOfDoubleExpForEveryIsa) {
  std::vector<float> x;
  for (float v = -87.33f; v <= 88.37f;) {
    x.push_back(v);
    float next = v;
    for (int step = 0; step < 97; ++step) next = std::nextafter(next, 100.0f);
    v = next;
  }
  x.push_back(0.0f), x.push_back(-0.0f);
  const std::vector<float> below = {-87.5f, -100.0f, -1e30f, -std::numeric_limits<float>::infinity()};
  std::vector<float> y(x.size()), y_below(below.size());
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    if (!cpu_isa_supported(isa)) continue;
    attention_cpu::attention_cpu_exp(isa, x.data(), y.data(), static_cast<int64_t>(x.size()));
    double worst_ulp = 0.0;
    float worst_x = 0.0f;
    for (size_t i = 0; i < x.size(); ++i) {
      const double want = std::exp(double(x[i]));
      const float want_f = static_cast<float>(want);
      const double ulp = double(std::nextafter(want_f, INFINITY)) - double(want_f);
      const double err = std::abs(double(y[i]) - want) / ulp;
      if (!(err <= worst_ulp)) worst_ulp = err, worst_x = x[i];
    }
    EXPECT_LE(worst_ulp, 2.0) << cpu_isa_name(isa) << ": worst at x = " << worst_x;
    attention_cpu::attention_cpu_exp(isa, below.data(), y_below.data(), static_cast<int64_t>(below.size()));
    for (size_t i = 0; i < below.size(); ++i) EXPECT_EQ(y_below[i], 0.0f) << cpu_isa_name(isa) << " x = " << below[i];
  }
}

// ---- the reference itself -----------------------------------------------------------------

// Sum(O * W) for a fixed W: the loss whose gradient the backward computes with dO = W.
double loss_f64(AttentionBuffers<double>& x) {
  x.clear_outputs();
  attention_forward_reference_f64(x.params());
  double loss = 0.0;
  for (size_t i = 0; i < x.o.size(); ++i) loss += x.o[i] * x.d_o[i];
  return loss;
}

// Central differences of the double forward against the double backward, for every third
// element of each input (a stride prime to head_dim, so every row, head and column gets
// checked); the dropout mask is fixed by the seed, so the loss is smooth.
void expect_backward_matches_finite_differences(const AttentionShape& shape) {
  AttentionBuffers<double> x(shape);
  x.fill_random(99);
  AttentionBuffers<double> grads = x;
  grads.clear_outputs();
  attention_forward_reference_f64(grads.params());
  attention_backward_reference_f64(grads.params());
  const auto loss = [&x] { return loss_f64(x); };
  const testing::FdOptions options{.step = 1e-6, .tolerance = 1e-7};
  testing::expect_gradient_matches_fd("dq", x.q, grads.dq, loss, testing::strided_indices(int64_t(x.q.size()), 3), options);
  testing::expect_gradient_matches_fd("dk", x.k, grads.dk, loss, testing::strided_indices(int64_t(x.k.size()), 3), options);
  testing::expect_gradient_matches_fd("dv", x.v, grads.dv, loss, testing::strided_indices(int64_t(x.v.size()), 3), options);
}

TEST(AttentionReference, BackwardMatchesFiniteDifferences) {
  expect_backward_matches_finite_differences(dense(2, 5, 7, 4, 2, 32, kFull, 0.0f));
}

TEST(AttentionReference, BackwardMatchesFiniteDifferencesCausalWithDropout) {
  expect_backward_matches_finite_differences(dense(1, 6, 6, 2, 1, 32, kCausal, 0.3f));
}

TEST(AttentionReference, BackwardMatchesFiniteDifferencesVarlenMaskedRows) {
  // Sequence 1 has more queries than keys: its first rows see nothing.
  expect_backward_matches_finite_differences(varlen({3, 6, 0}, {4, 2, 3}, 2, 2, 32, kCausal, 0.25f));
}

// A case small enough to work out by hand, for both implementations: it pins the default
// scale 1/sqrt(d), the softmax, LSE and the bottom-right causal alignment, which a shared
// mistake would hide from the tiled-vs-reference comparisons.
TEST(AttentionReference, MatchesAHandComputedExample) {
  // seqlen_q 2, seqlen_k 3, d 32. q_i = (a_i, 0, ...), k_j = (j, 0, ...), V = identity rows:
  // O[i, j] = P[i, j]. Causal bottom-right: row 0 sees keys 0, 1; row 1 sees keys 0, 1, 2.
  for (bool tiled : {false, true}) {
    AttentionBuffers<float> x(dense(1, 2, 3, 1, 1, 32, kCausal, 0.0f));
    std::fill(x.q.begin(), x.q.end(), 0.0f);
    std::fill(x.k.begin(), x.k.end(), 0.0f);
    std::fill(x.v.begin(), x.v.end(), 0.0f);
    const float a[2] = {2.0f, -3.0f};
    for (int i = 0; i < 2; ++i) x.q[i * 32] = a[i];
    for (int j = 0; j < 3; ++j) x.k[j * 32] = float(j), x.v[j * 32 + j] = 1.0f;
    if (tiled) {
      attention_forward_cpu(x.params(), tiles(1, 2));
    } else {
      attention_forward_reference(x.params());
    }
    const double scale = 1.0 / std::sqrt(32.0);
    for (int i = 0; i < 2; ++i) {
      const int visible = i == 0 ? 2 : 3;
      double sum = 0.0;
      for (int j = 0; j < visible; ++j) sum += std::exp(scale * a[i] * j);
      EXPECT_NEAR(x.lse[i], std::log(sum), 1e-6) << "row " << i << " tiled " << tiled;
      for (int j = 0; j < 3; ++j) {
        const double want = j < visible ? std::exp(scale * a[i] * j) / sum : 0.0;
        EXPECT_NEAR(x.o[i * 32 + j], want, 1e-6) << "row " << i << " key " << j << " tiled " << tiled;
      }
    }
  }
}

// The fp32 reference and the tiled path against the double reference on the same inputs.
TEST(AttentionReference, Fp32PathsMatchDoublePrecision) {
  for (float dropout : {0.0f, 0.2f}) {
    AttentionBuffers<float> f(dense(2, 33, 47, 4, 2, 64, kCausal, dropout));
    f.fill_random(5);
    AttentionBuffers<double> d = attention_buffers_widen(f);
    attention_forward_reference_f64(d.params());
    attention_backward_reference_f64(d.params());
    AttentionBuffers<float> tiled = f;
    attention_forward_reference(f.params());
    attention_backward_reference(f.params());
    attention_forward_cpu(tiled.params(), tiles(8, 8));
    attention_backward_cpu(tiled.params(), tiles(8, 8));
    for (const auto* run : {&f, &tiled}) {
      const std::string who = run == &f ? "fp32 reference " : "tiled ";
      EXPECT_TRUE(op_close(who + "O", run->o, d.o, kForwardTol));
      EXPECT_TRUE(op_close(who + "LSE", run->lse, d.lse, kForwardTol));
      EXPECT_TRUE(op_close(who + "dQ", run->dq, d.dq, kBackwardTol));
      EXPECT_TRUE(op_close(who + "dK", run->dk, d.dk, kBackwardTol));
      EXPECT_TRUE(op_close(who + "dV", run->dv, d.dv, kBackwardTol));
    }
  }
}

// ---- masked rows, huge logits ----------------------------------------------------------------

void expect_rows_without_keys_are_zero(AttentionBuffers<float>& x, bool tiled) {
  x.fill_random(17);
  x.clear_outputs();
  if (tiled) {
    attention_forward_cpu(x.params(), tiles(2, 3));
    attention_backward_cpu(x.params(), tiles(2, 3));
  } else {
    attention_forward_reference(x.params());
    attention_backward_reference(x.params());
  }
  EXPECT_FALSE(attention_any_nan(x.o) || attention_any_nan(x.lse) || attention_any_nan(x.dq) ||
               attention_any_nan(x.dk) || attention_any_nan(x.dv));
}

TEST(AttentionMaskedRows, CausalWithMoreQueriesThanKeysGivesZerosNotNaN) {
  // seqlen_q 9 > seqlen_k 4: rows 0..4 see no key under the bottom-right causal mask.
  for (bool tiled : {false, true}) {
    AttentionBuffers<float> x(dense(2, 9, 4, 2, 1, 32, kCausal, 0.1f));
    expect_rows_without_keys_are_zero(x, tiled);
    const int d = 32;
    for (int b = 0; b < 2; ++b) {
      for (int row = 0; row < 9; ++row) {
        for (int h = 0; h < 2; ++h) {
          const float lse = x.lse[(size_t(b) * 2 + h) * 9 + row];
          const size_t base = ((size_t(b) * 9 + row) * 2 + h) * d;
          if (row < 5) {
            EXPECT_EQ(lse, std::numeric_limits<float>::infinity()) << "row " << row << " tiled " << tiled;
            for (int c = 0; c < d; ++c) {
              ASSERT_EQ(x.o[base + c], 0.0f) << "row " << row;
              ASSERT_EQ(x.dq[base + c], 0.0f) << "row " << row;
            }
          } else {
            EXPECT_TRUE(std::isfinite(lse)) << "row " << row;
          }
        }
      }
    }
  }
}

TEST(AttentionMaskedRows, EmptyKeySequenceGivesZeroOutputAndGradients) {
  for (bool tiled : {false, true}) {
    AttentionBuffers<float> x(varlen({4, 3}, {0, 5}, 2, 2, 64, kFull, 0.0f));
    expect_rows_without_keys_are_zero(x, tiled);
    for (size_t i = 0; i < size_t(4) * 2 * 64; ++i) {  // sequence 0: the first 4 packed rows
      ASSERT_EQ(x.o[i], 0.0f);
      ASSERT_EQ(x.dq[i], 0.0f);
    }
    for (int h = 0; h < 2; ++h) {
      for (int row = 0; row < 4; ++row) EXPECT_EQ(x.lse[size_t(h) * 7 + row], std::numeric_limits<float>::infinity());
    }
  }
}

TEST(AttentionLargeLogits, LogitsOfMagnitude1e4DoNotOverflow) {
  // Integer inputs make every dot product exact, so logits are 1000 * (integer in [-64, 64]):
  // about 2e4 at most here, far beyond where exp overflows in float (88). Ties split exactly.
  AttentionBuffers<float> want(dense(1, 64, 80, 2, 1, 64, kFull, 0.0f));
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> trit(-1, 1);
  for (auto* t : {&want.q, &want.k}) {
    for (float& x : *t) x = static_cast<float>(trit(gen));
  }
  for (float& x : want.v) x = static_cast<float>(trit(gen));
  for (float& x : want.d_o) x = static_cast<float>(trit(gen));
  want.shape.softmax_scale = 1000.0f;
  AttentionBuffers<float> got = want;
  attention_forward_reference(want.params());
  attention_forward_cpu(got.params(), tiles(8, 8));
  float max_lse = 0.0f;
  for (float x : got.lse) max_lse = std::max(max_lse, std::abs(x));
  EXPECT_GT(max_lse, 1e4f);
  EXPECT_FALSE(attention_any_nan(got.o));
  EXPECT_TRUE(op_close("O", got.o, want.o, 1e-6));
  EXPECT_TRUE(op_close("LSE", got.lse, want.lse, 1e-6));
  want.o = got.o, want.lse = got.lse;
  attention_backward_reference(want.params());
  attention_backward_cpu(got.params(), tiles(8, 8));
  EXPECT_FALSE(attention_any_nan(got.dq) || attention_any_nan(got.dk) || attention_any_nan(got.dv));
  // The backward recomputes P = exp(S - LSE) from the fp32 LSE the header prescribes, whose
  // rounding (half an ulp of |LSE|, 2^-24 |LSE| relative) becomes a relative error of P.
  const double lse_rounding = max_lse * std::ldexp(1.0, -24);
  EXPECT_TRUE(op_close("dV", got.dv, want.dv, 2 * lse_rounding));
  EXPECT_TRUE(op_close("dQ", got.dq, want.dq, 2 * lse_rounding));
  EXPECT_TRUE(op_close("dK", got.dk, want.dk, 2 * lse_rounding));
}

// ---- dropout ------------------------------------------------------------------------------------

// With Q = 0 every probability is 1 / seqlen_k, and with V[:, :, :, 0] = 1 the first output
// column is kept_count * 256 / (seqlen_k (256 - t)): O tells how many elements of each row were
// kept, and its mean over rows is the mean of dropout(1), 1 within its standard error.
TEST(AttentionDropout, KeepRateIsRightAndMatchesThePhiloxMask) {
  for (float p : {0.1f, 0.5f}) {
    for (bool tiled : {false, true}) {
      const int batch = 2, heads = 4, seqlen_q = 128, seqlen_k = 512, d = 32;
      AttentionBuffers<float> x(dense(batch, seqlen_q, seqlen_k, heads, heads, d, kFull, p));
      std::fill(x.q.begin(), x.q.end(), 0.0f);
      std::fill(x.k.begin(), x.k.end(), 1.0f);
      std::fill(x.v.begin(), x.v.end(), 1.0f);
      if (tiled) {
        attention_forward_cpu(x.params(), tiles(16, 24));
      } else {
        attention_forward_reference(x.params());
      }
      const uint32_t threshold = dropout_threshold(p);
      const double q = threshold / 256.0;  // the effective dropout probability
      int64_t kept_total = 0;
      double out_sum = 0;
      for (int b = 0; b < batch; ++b) {
        for (int row = 0; row < seqlen_q; ++row) {
          for (int h = 0; h < heads; ++h) {
            const float out = x.o[((size_t(b) * seqlen_q + row) * heads + h) * d];
            out_sum += out;
            const int64_t kept = std::llround(double(out) * seqlen_k * (1.0 - q));
            int64_t expected = 0;
            for (int col = 0; col < seqlen_k; ++col) {
              expected += dropout_keep(x.shape.rng, int64_t{b} * heads + h, row, col, threshold);
            }
            ASSERT_EQ(kept, expected) << "b " << b << " row " << row << " head " << h << " tiled " << tiled;
            kept_total += kept;
          }
        }
      }
      const double n = double(batch) * heads * seqlen_q * seqlen_k;
      const double rate = kept_total / n, sigma = std::sqrt(q * (1.0 - q) / n);
      EXPECT_NEAR(rate, 1.0 - q, 5 * sigma) << "p " << p << " tiled " << tiled;
      const double mean = out_sum / (double(batch) * heads * seqlen_q);
      EXPECT_NEAR(mean, 1.0, 5 * sigma * dropout_keep_scale(threshold)) << "p " << p << " tiled " << tiled;
    }
  }
}

// The edges of t = round(256 p): t == 256 drops every element, so O is 0 (not NaN: the keep
// scale is 0, not 256 / 0) while the LSE is the undropped one; t == 0 is no dropout at all.
TEST(AttentionDropout, EverythingDroppedGivesZerosAndTinyPNothing) {
  AttentionBuffers<float> x(dense(2, 70, 33, 2, 1, 32, kCausal, 0.999f));  // rows 0..36 see no key
  x.fill_random(3);
  AttentionBuffers<float> plain = x;
  plain.shape.dropout_p = 0.0f;
  attention_forward_cpu(plain.params());
  for (bool tiled : {false, true}) {
    x.clear_outputs();
    if (tiled) {
      attention_forward_cpu(x.params(), tiles(16, 24));
    } else {
      attention_forward_reference(x.params());
    }
    for (float v : x.o) ASSERT_EQ(v, 0.0f) << "tiled " << tiled;
    for (size_t i = 0; i < x.lse.size(); ++i) {
      if (std::isinf(plain.lse[i])) {
        EXPECT_EQ(x.lse[i], plain.lse[i]);
      } else {
        EXPECT_NEAR(x.lse[i], plain.lse[i], 1e-5) << "tiled " << tiled;
      }
    }
    // Backward of an all-dropped forward: every gradient is exactly zero.
    std::fill(x.d_o.begin(), x.d_o.end(), 1.0f);
    if (tiled) {
      attention_backward_cpu(x.params(), tiles(16, 24));
    } else {
      attention_backward_reference(x.params());
    }
    for (const auto* grad : {&x.dq, &x.dk, &x.dv})
      for (float v : *grad) ASSERT_EQ(v, 0.0f) << "tiled " << tiled;
  }
  AttentionBuffers<float> tiny = plain;
  tiny.shape.dropout_p = 0.001f;  // t = round(0.256) = 0
  tiny.clear_outputs();
  attention_forward_cpu(tiny.params());
  EXPECT_EQ(tiny.o, plain.o);
}

// With V the identity (seqlen_k == d), O[i, j] = dropout(P)[i, j]: zero exactly where the
// mask drops. The mask must be philox.h's for every tiling and thread count.
TEST(AttentionDropout, MaskIsTheSameForEveryTilingAndThreadCount) {
  const int seqlen = 64, d = 64, heads = 2;
  const float p = 0.3f;
  AttentionBuffers<float> x(varlen({seqlen, 7, seqlen}, {seqlen, seqlen, seqlen}, heads, heads, d, kFull, p));
  x.fill_random(11, 0.1);
  std::fill(x.v.begin(), x.v.end(), 0.0f);
  for (int64_t t = 0; t < x.total_k; ++t) {
    for (int h = 0; h < heads; ++h) x.v[(t * heads + h) * d + (t - x.cu_k[t >= 2 * seqlen ? 2 : t >= seqlen])] = 1;
  }
  const uint32_t threshold = dropout_threshold(p);
  const CpuTiling tilings[] = {tiles(1, 1, 1),
                               tiles(7, 5, 2),
                               tiles(64, 64, 3),
                               budget(16 * 1024),
                               budget(64 * 1024, CpuTileRule::max_rows),
                               {}};
  for (const CpuTiling& tiling : tilings) {
    x.clear_outputs();
    attention_forward_cpu(x.params(), tiling);
    int64_t dropped = 0;
    for (int b = 0; b < 3; ++b) {
      for (int row = 0; row < x.shape.lens_q[b]; ++row) {
        for (int h = 0; h < heads; ++h) {
          for (int col = 0; col < seqlen; ++col) {
            const float out = x.o[((x.cu_q[b] + row) * heads + h) * size_t(d) + col];
            const bool keep = dropout_keep(x.shape.rng, int64_t{b} * heads + h, row, col, threshold);
            ASSERT_EQ(out != 0.0f, keep) << "tiling " << tiling.block_rows << "x" << tiling.block_cols << " b " << b
                                         << " row " << row << " col " << col;
            dropped += !keep;
          }
        }
      }
    }
    EXPECT_GT(dropped, 0);
  }
}

TEST(AttentionDropout, DifferentSeedOrOffsetGivesADifferentMask) {
  AttentionBuffers<float> x(dense(1, 32, 32, 1, 1, 32, kFull, 0.5f));
  x.fill_random(1);
  attention_forward_cpu(x.params());
  const std::vector<float> first = x.o;
  x.shape.rng.offset += 1;
  attention_forward_cpu(x.params());
  EXPECT_NE(first, x.o);
  x.shape.rng.offset -= 1;
  attention_forward_cpu(x.params());
  EXPECT_EQ(first, x.o);
}

// ---- determinism, strides ---------------------------------------------------------------------

TEST(AttentionTiled, BitIdenticalForAnyThreadCount) {
  AttentionBuffers<float> one(dense(2, 200, 150, 4, 2, 64, kCausal, 0.1f));
  one.fill_random(21);
  AttentionBuffers<float> many = one;
  attention_forward_cpu(one.params(), tiles(16, 16, 1));
  attention_backward_cpu(one.params(), tiles(16, 16, 1));
  for (int threads : {2, 3, 5}) {
    many.clear_outputs();
    attention_forward_cpu(many.params(), tiles(16, 16, threads));
    attention_backward_cpu(many.params(), tiles(16, 16, threads));
    EXPECT_EQ(one.o, many.o) << threads << " threads";
    EXPECT_EQ(one.lse, many.lse) << threads << " threads";
    EXPECT_EQ(one.dq, many.dq) << threads << " threads";
    EXPECT_EQ(one.dk, many.dk) << threads << " threads";
    EXPECT_EQ(one.dv, many.dv) << threads << " threads";
  }
}

TEST(AttentionReference, BitIdenticalForAnyThreadCount) {
  AttentionBuffers<float> one(dense(1, 300, 260, 2, 1, 32, kCausal, 0.1f));
  one.fill_random(31);
  AttentionBuffers<float> many = one;
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  attention_forward_reference(one.params());
  attention_backward_reference(one.params());
  omp_set_num_threads(3);
  attention_forward_reference(many.params());
  attention_backward_reference(many.params());
  omp_set_num_threads(saved_threads);
  EXPECT_EQ(one.o, many.o);
  EXPECT_EQ(one.lse, many.lse);
  EXPECT_EQ(one.dq, many.dq);
  EXPECT_EQ(one.dk, many.dk);
  EXPECT_EQ(one.dv, many.dv);
}

// Q, K, V as views into one packed QKV tensor (batch, seqlen, 3, heads, d), and O, dO, dQ,
// dK, dV, LSE with padded strides: the results must equal those of contiguous tensors.
TEST(AttentionTiled, StridedViewsGiveTheSameResultAsContiguousTensors) {
  const int batch = 2, seqlen = 45, heads = 3, d = 32;
  AttentionBuffers<float> contiguous(dense(batch, seqlen, seqlen, heads, heads, d, kCausal, 0.1f));
  contiguous.fill_random(8);
  const int64_t row = 3 * heads * d, pad_row = heads * d + 16, pad_batch = seqlen * pad_row + 5;
  std::vector<float> qkv(size_t(batch) * seqlen * row);
  std::vector<float> padded_do(size_t(batch) * pad_batch);
  for (int b = 0; b < batch; ++b) {
    for (int t = 0; t < seqlen; ++t) {
      for (int h = 0; h < heads; ++h) {
        for (int c = 0; c < d; ++c) {
          const size_t dense_index = ((size_t(b) * seqlen + t) * heads + h) * d + c;
          float* slot = &qkv[(size_t(b) * seqlen + t) * row + h * d + c];
          slot[0] = contiguous.q[dense_index];
          slot[heads * d] = contiguous.k[dense_index];
          slot[2 * heads * d] = contiguous.v[dense_index];
          padded_do[b * pad_batch + t * pad_row + h * d + c] = contiguous.d_o[dense_index];
        }
      }
    }
  }
  for (bool tiled : {false, true}) {
    AttentionBuffers<float> want = contiguous;
    std::vector<float> o(padded_do.size(), -1.0f), dq(o), dk(o), dv(o), lse(size_t(batch) * heads * 64, -1.0f);
    AttentionParams p = want.params();
    p.q = qkv.data(), p.k = qkv.data() + heads * d, p.v = qkv.data() + 2 * heads * d;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = seqlen * row;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = row;
    p.o = o.data(), p.d_o = padded_do.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
    p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = pad_batch;
    p.o_row_stride = p.do_row_stride = p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = pad_row;
    p.lse = lse.data(), p.lse_batch_stride = heads * 64, p.lse_head_stride = 64;
    if (tiled) {
      attention_forward_cpu(want.params(), tiles(8, 8));
      attention_backward_cpu(want.params(), tiles(8, 8));
      attention_forward_cpu(p, tiles(8, 8));
      attention_backward_cpu(p, tiles(8, 8));
    } else {
      attention_forward_reference(want.params());
      attention_backward_reference(want.params());
      attention_forward_reference(p);
      attention_backward_reference(p);
    }
    for (int b = 0; b < batch; ++b) {
      for (int t = 0; t < seqlen; ++t) {
        for (int h = 0; h < heads; ++h) {
          ASSERT_EQ(lse[b * heads * 64 + h * 64 + t], want.lse[(size_t(b) * heads + h) * seqlen + t]);
          for (int c = 0; c < d; ++c) {
            const size_t dense_index = ((size_t(b) * seqlen + t) * heads + h) * d + c;
            const size_t padded = b * pad_batch + t * pad_row + h * d + c;
            ASSERT_EQ(o[padded], want.o[dense_index]) << "tiled " << tiled;
            ASSERT_EQ(dq[padded], want.dq[dense_index]) << "tiled " << tiled;
            ASSERT_EQ(dk[padded], want.dk[dense_index]) << "tiled " << tiled;
            ASSERT_EQ(dv[padded], want.dv[dense_index]) << "tiled " << tiled;
          }
        }
      }
    }
    EXPECT_EQ(o[pad_row - 1], -1.0f) << "padding must stay untouched";
  }
}

TEST(AttentionTiled, VarlenEqualsEachSequenceAlone) {
  const std::vector<int32_t> lens_q{5, 0, 33, 1}, lens_k{9, 4, 20, 1};
  AttentionBuffers<float> packed(varlen(lens_q, lens_k, 2, 1, 64, kCausal, 0.0f));
  packed.fill_random(4);
  attention_forward_cpu(packed.params(), tiles(4, 8));
  attention_backward_cpu(packed.params(), tiles(4, 8));
  for (size_t b = 0; b < lens_q.size(); ++b) {
    if (lens_q[b] == 0) {  // no query: its keys get no gradient
      for (int64_t i = packed.cu_k[b] * 64; i < packed.cu_k[b + 1] * 64; ++i) {
        ASSERT_EQ(packed.dk[i], 0.0f);
        ASSERT_EQ(packed.dv[i], 0.0f);
      }
      continue;
    }
    AttentionBuffers<float> alone(dense(1, lens_q[b], lens_k[b], 2, 1, 64, kCausal, 0.0f));
    const size_t q0 = size_t(packed.cu_q[b]) * 2 * 64, k0 = size_t(packed.cu_k[b]) * 64;
    std::copy_n(packed.q.begin() + q0, alone.q.size(), alone.q.begin());
    std::copy_n(packed.d_o.begin() + q0, alone.d_o.size(), alone.d_o.begin());
    std::copy_n(packed.k.begin() + k0, alone.k.size(), alone.k.begin());
    std::copy_n(packed.v.begin() + k0, alone.v.size(), alone.v.begin());
    attention_forward_cpu(alone.params(), tiles(4, 8));
    attention_backward_cpu(alone.params(), tiles(4, 8));
    EXPECT_TRUE(std::equal(alone.o.begin(), alone.o.end(), packed.o.begin() + q0)) << "sequence " << b;
    EXPECT_TRUE(std::equal(alone.dq.begin(), alone.dq.end(), packed.dq.begin() + q0)) << "sequence " << b;
    EXPECT_TRUE(std::equal(alone.dk.begin(), alone.dk.end(), packed.dk.begin() + k0)) << "sequence " << b;
    EXPECT_TRUE(std::equal(alone.dv.begin(), alone.dv.end(), packed.dv.begin() + k0)) << "sequence " << b;
  }
}

// ---- errors ----------------------------------------------------------------------------------

std::string error_of(void (*run)(const AttentionParams&), const AttentionParams& p) {
  return testing::error_of([&] { run(p); });
}

TEST(AttentionErrors, BadInputGetsAClearError) {
  using Run = void (*)(const AttentionParams&);
  const Run runs[] = {attention_forward_reference, attention_backward_reference,
                      [](const AttentionParams& p) { attention_forward_cpu(p); },
                      [](const AttentionParams& p) { attention_backward_cpu(p); }};
  struct Case {
    void (*spoil)(AttentionParams&);
    const char* expected;
  };
  static const int32_t kDecreasing[] = {0, 5, 3};
  static const int32_t kTooLong[] = {0, 2, 9};  // a sequence of 7 in a batch declared max 5
  const Case cases[] = {
      {[](AttentionParams& p) { p.dtype = DType::bf16; }, "dtype bfloat16 is not supported on the CPU"},
      {[](AttentionParams& p) { p.head_dim = 48; }, "head_dim 48 is not supported"},
      {[](AttentionParams& p) { p.heads_q = 3; }, "heads_q (3) must be a multiple of heads_kv (2)"},
      {[](AttentionParams& p) { p.dropout_p = 1.0f; }, "dropout_p must be in [0, 1)"},
      {[](AttentionParams& p) { p.dropout_p = -0.5f; }, "dropout_p must be in [0, 1)"},
      {[](AttentionParams& p) { p.k = nullptr; }, "q, k and v must not be null"},
      {[](AttentionParams& p) { p.cu_seqlens_q = p.cu_seqlens_k = kDecreasing; }, "must be non-decreasing"},
      {[](AttentionParams& p) { p.cu_seqlens_q = p.cu_seqlens_k = kTooLong; }, "more than its max_seqlen 5"},
  };
  AttentionBuffers<float> x(dense(2, 5, 5, 4, 2, 32, kFull, 0.0f));
  for (Run run : runs) {
    for (const Case& c : cases) {
      AttentionParams p = x.params();
      c.spoil(p);
      EXPECT_NE(error_of(run, p).find(c.expected), std::string::npos)
          << "expected '" << c.expected << "', got '" << error_of(run, p) << "'";
    }
  }
  AttentionParams p = x.params();
  p.dq = nullptr;
  EXPECT_NE(error_of(runs[3], p).find("dq, dk and dv must not be null"), std::string::npos);
  CpuTiling tiny;
  tiny.onchip_bytes = 64;
  EXPECT_THROW(attention_forward_cpu(x.params(), tiny), Error);
  EXPECT_THROW(attention_forward_cpu(x.params(), tiles(-1, 4)), Error);
}

// ---- tiles, memory, IO -------------------------------------------------------------------------

TEST(AttentionTiles, PaperRuleAndMaxRowsRuleFitTheBudget) {
  // M = 32768 floats, d = 64: Bc = ceil(M / 4d) = 128, Br = min(128, 64) = 64.
  const CpuTileShape paper = attention_cpu_tile_shape(budget(128 * 1024), 64);
  EXPECT_EQ(paper.block_cols, 128);
  EXPECT_EQ(paper.block_rows, 64);
  for (int64_t kib : {16, 64, 256, 1024}) {
    for (int d : {32, 64, 128, 256}) {
      const CpuTileShape t = attention_cpu_tile_shape(budget(kib * 1024, CpuTileRule::max_rows), d);
      const int64_t used =
          2 * int64_t{t.block_rows} * d + 2 * int64_t{t.block_cols} * d + int64_t{t.block_rows} * t.block_cols;
      EXPECT_LE(used, kib * 1024 / 4) << kib << " KiB, d " << d;
      EXPECT_GT(used, kib * 1024 / 4 * 3 / 4) << "the budget should be mostly used: " << kib << " KiB, d " << d;
    }
  }
}

TEST(AttentionMemory, ReferenceGrowsQuadraticallyTiledLinearly) {
  auto params_for = [](int n) {
    AttentionParams p;
    p.batch = 1, p.seqlen_q = p.seqlen_k = n, p.heads_q = p.heads_kv = 1, p.head_dim = 64;
    attention_set_dense_strides(p);
    return p;
  };
  const CpuTiling tiling = tiles(64, 64, 2);
  for (int n : {1024, 4096}) {
    const AttentionParams small = params_for(n), big = params_for(2 * n);
    EXPECT_EQ(attention_reference_workspace_bytes(big, AttentionPass::forward),
              4 * attention_reference_workspace_bytes(small, AttentionPass::forward));
    EXPECT_EQ(attention_cpu_workspace_bytes(big, AttentionPass::forward, tiling),
              attention_cpu_workspace_bytes(small, AttentionPass::forward, tiling));
    const int64_t grow = attention_cpu_workspace_bytes(big, AttentionPass::backward, tiling) -
                         attention_cpu_workspace_bytes(small, AttentionPass::backward, tiling);
    EXPECT_EQ(grow, int64_t{n} * 4) << "one float of D per extra query row";
  }
}

// The forward reads Q once, K and V once per row block, and writes O and LSE once.
TEST(AttentionIo, CountsTheLoadsAndStoresOfAlgorithm1) {
  const int n = 300, d = 64, br = 32, bc = 48;
  AttentionBuffers<float> x(dense(1, n, n, 1, 1, d, kFull, 0.0f));
  x.fill_random(2);
  IoCounter io;
  attention_forward_cpu(x.params(), tiles(br, bc), &io);
  const uint64_t row_blocks = (n + br - 1) / br;
  EXPECT_EQ(io.bytes_read, 4 * (uint64_t(n) * d + row_blocks * 2 * uint64_t(n) * d));
  EXPECT_EQ(io.bytes_written, 4 * (uint64_t(n) * d + n));
  // Causal: row block [i0, i0 + Br) loads only the keys its last row sees, i0 + Br of them.
  IoCounter causal_io;
  x.shape.mask = kCausal;
  attention_forward_cpu(x.params(), tiles(br, bc), &causal_io);
  uint64_t causal_keys = 0;
  for (int i0 = 0; i0 < n; i0 += br) causal_keys += std::min(i0 + br, n);
  EXPECT_EQ(causal_io.bytes_read, 4 * (uint64_t(n) * d + 2 * causal_keys * d));
}

// Theorem 2: Theta(N^2 d^2 / M) for d <= M <= N d. The max_rows rule stays within a
// constant of it over the whole range; the paper's rule stops improving at M = 4 d^2.
TEST(AttentionIo, MaxRowsRuleFollowsTheN2D2OverMBound) {
  const int n = 2048, d = 64;  // N d = 512 KiB of floats
  AttentionBuffers<float> x(dense(1, n, n, 1, 1, d, kFull, 0.0f));
  x.fill_random(2);
  std::vector<uint64_t> paper_io;
  for (int64_t kib : {16, 64, 128, 256}) {
    IoCounter io;
    attention_forward_cpu(x.params(), budget(kib * 1024, CpuTileRule::max_rows), &io);
    const double m = kib * 1024 / 4.0;                   // floats
    const double bound = double(n) * n * d * d / m * 4;  // bytes
    EXPECT_GT(io.total(), 1.0 * bound) << kib << " KiB";
    EXPECT_LT(io.total(), 8.0 * bound) << kib << " KiB";
    IoCounter paper;
    attention_forward_cpu(x.params(), budget(kib * 1024, CpuTileRule::paper), &paper);
    paper_io.push_back(paper.total());
  }
  EXPECT_GT(paper_io[0], 3 * paper_io[1]) << "below 4 d^2 floats the paper's rule follows 1 / M";
  EXPECT_EQ(paper_io[2], paper_io[3]) << "above it Br = d and the IO no longer falls";
}

TEST(AttentionIo, BackwardNeverReadsOrWritesAnNxNMatrix) {
  const int n = 512, d = 32;
  AttentionBuffers<float> x(dense(1, n, n, 1, 1, d, kFull, 0.0f));
  x.fill_random(2);
  attention_forward_cpu(x.params());
  IoCounter io;
  attention_backward_cpu(x.params(), tiles(n, n), &io);  // one tile: every tensor once
  // D: O and dO; pass A: K, V, Q, dO, LSE, D, then dK, dV; pass B: Q, dO, LSE, D, K, V, then dQ.
  EXPECT_EQ(io.total(), 4 * uint64_t(n) * (2 * d + 1 + 4 * d + 2 + 2 * d + 2 * d + 2 + 2 * d + d));
}

}  // namespace
}  // namespace flashgpt

#include <flashgpt/philox.h>

#include <gtest/gtest.h>

#include <cmath>

namespace flashgpt {
namespace {

// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
TEST(Philox, MatchesRandom123KnownAnswers) {
  auto zero = philox4x32_10({0, 0, 0, 0}, 0, 0);
  EXPECT_EQ(zero.x, 0x6627e8d5u);
  EXPECT_EQ(zero.y, 0xe169c58du);
  EXPECT_EQ(zero.z, 0xbc57ac4cu);
  EXPECT_EQ(zero.w, 0x9b00dbd8u);

  auto ones = philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(ones.x, 0x408f276du);
  EXPECT_EQ(ones.y, 0x41c83b0eu);
  EXPECT_EQ(ones.z, 0xa20bc7c6u);
  EXPECT_EQ(ones.w, 0x6d5451fdu);

  auto pi = philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(pi.x, 0xd16cfe09u);
  EXPECT_EQ(pi.y, 0x94fdccebu);
  EXPECT_EQ(pi.z, 0x5001e420u);
  EXPECT_EQ(pi.w, 0x24126ea1u);
}

TEST(Philox, DropoutKeepRateWithinBinomialBounds) {
  const DropoutRng rng{1234, 5};
  for (float p : {0.1f, 0.5f, 0.9f}) {
    const uint32_t threshold = dropout_threshold(p);
    const int n = 200000;
    int kept = 0;
    for (int i = 0; i < n; ++i) kept += dropout_keep(rng, /*batch_head=*/3, /*row=*/i / 500, /*col=*/i % 500, threshold);
    const double expected = n * (1.0 - p);
    const double sigma = std::sqrt(n * p * (1.0 - p));
    EXPECT_NEAR(kept, expected, 6 * sigma) << "p=" << p;
  }
}

TEST(Philox, DropoutStreamDependsOnEveryKey) {
  const uint32_t threshold = dropout_threshold(0.5f);
  auto count_differences = [&](DropoutRng a, DropoutRng b, int64_t bh_a, int64_t bh_b) {
    int differ = 0;
    for (int col = 0; col < 1024; ++col)
      differ += dropout_keep(a, bh_a, 7, col, threshold) != dropout_keep(b, bh_b, 7, col, threshold);
    return differ;
  };
  EXPECT_GT(count_differences({1, 0}, {2, 0}, 0, 0), 400);                  // seed
  EXPECT_GT(count_differences({1, 0}, {1, 1}, 0, 0), 400);                  // offset
  EXPECT_GT(count_differences({1, 0}, {1, uint64_t{1} << 40}, 0, 0), 400);  // offset's high word
  EXPECT_GT(count_differences({1, 0}, {1, 0}, 0, 1), 400);                  // batch * heads + head
  EXPECT_EQ(count_differences({9, 3}, {9, 3}, 2, 2), 0);                    // and nothing else
}

TEST(Philox, ThresholdEdges) {
  EXPECT_EQ(dropout_threshold(0.0f), 0u);
  EXPECT_EQ(dropout_threshold(0.5f), 0x80000000u);
  EXPECT_TRUE(dropout_keep({1, 2}, 0, 0, 0, dropout_threshold(0.0f)));
}

}  // namespace
}  // namespace flashgpt

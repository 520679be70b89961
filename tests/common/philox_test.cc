#include <flashgpt/philox.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

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

// The byte mapping of philox.h, recomputed independently: the four words as little-endian
// bytes in memory, column col taking byte col % 16 of call col / 16.
TEST(Philox, DropoutByteMappingMatchesLittleEndianWordBytes) {
  const DropoutRng rng{0x0123456789abcdefull, 0x0000000500000007ull};
  for (int64_t row : {0, 9, 511}) {
    for (int64_t col = 0; col < 64; ++col) {
      const Philox4x32 words = philox4x32_10({static_cast<uint32_t>(col / 16), static_cast<uint32_t>(row), 3u, 7u},
                                             0x89abcdefu, 0x01234567u ^ 5u);
      const uint32_t as_array[4] = {words.x, words.y, words.z, words.w};
      unsigned char bytes[16];
      std::memcpy(bytes, as_array, sizeof(bytes));  // every supported host is little-endian
      const uint32_t byte = bytes[col % 16];
      EXPECT_EQ(dropout_byte(dropout_random_words(rng, 3, row, col / 16), static_cast<int>(col % 16)), byte);
      for (uint32_t t : {0u, 1u, 26u, 128u, 255u, 256u}) {
        EXPECT_EQ(dropout_keep(rng, 3, row, col, t), byte >= t) << "row " << row << " col " << col << " t " << t;
      }
    }
  }
}

// Kept with probability 1 - t / 256, t = round(256 p): the binomial count within 6 sigma.
TEST(Philox, DropoutKeepRateWithinBinomialBounds) {
  const DropoutRng rng{1234, 5};
  for (float p : {0.1f, 0.5f, 0.9f}) {
    const uint32_t threshold = dropout_threshold(p);
    const double q = threshold / 256.0;  // the effective dropout probability
    const int n = 200000;
    int kept = 0;
    for (int i = 0; i < n; ++i) kept += dropout_keep(rng, /*batch_head=*/3, /*row=*/i / 500, /*col=*/i % 500, threshold);
    const double expected = n * (1.0 - q);
    const double sigma = std::sqrt(n * q * (1.0 - q));
    EXPECT_NEAR(kept, expected, 6 * sigma) << "p=" << p;
  }
}

// dropout(1) = keep ? 256 / (256 - t) : 0 has expectation exactly 1; its mean over n draws lies
// within 6 standard errors of 1.
TEST(Philox, DropoutOfOneIsUnbiased) {
  const DropoutRng rng{77, 1};
  for (float p : {0.1f, 0.3f, 0.7f}) {
    const uint32_t threshold = dropout_threshold(p);
    const double scale = dropout_keep_scale(threshold), q = threshold / 256.0;
    const int n = 400000;
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += dropout_keep(rng, 0, i / 1000, i % 1000, threshold) ? scale : 0.0;
    const double standard_error = scale * std::sqrt(q * (1.0 - q) / n);
    EXPECT_NEAR(sum / n, 1.0, 6 * standard_error) << "p=" << p;
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

TEST(Philox, ThresholdRoundsHalfUpAndScaleIsExact) {
  EXPECT_EQ(dropout_threshold(0.0f), 0u);
  EXPECT_EQ(dropout_threshold(0.5f), 128u);
  EXPECT_EQ(dropout_threshold(0.1f), 26u);  // 25.6
  EXPECT_EQ(dropout_threshold(std::nextafter(1.0f / 512, 0.0f)), 0u);
  EXPECT_EQ(dropout_threshold(1.0f / 512), 1u);  // exactly half: up
  EXPECT_EQ(dropout_threshold(0.998f), 255u);   // 255.488
  EXPECT_EQ(dropout_threshold(0.999f), 256u);   // 255.744: everything dropped
  EXPECT_EQ(dropout_threshold(std::nextafter(1.0f, 0.0f)), 256u);
  EXPECT_FALSE(dropout_enabled(dropout_threshold(0.001f)));
  EXPECT_TRUE(dropout_enabled(dropout_threshold(0.002f)));
  EXPECT_EQ(dropout_keep_scale(0), 1.0);
  EXPECT_EQ(dropout_keep_scale(128), 2.0);
  EXPECT_EQ(dropout_keep_scale(26), 256.0 / 230.0);
  EXPECT_EQ(dropout_keep_scale(256), 0.0);  // nothing kept: 0, not inf
  EXPECT_TRUE(dropout_keep({1, 2}, 0, 0, 0, dropout_threshold(0.0f)));
  for (int col = 0; col < 64; ++col) EXPECT_FALSE(dropout_keep({1, 2}, 0, 0, col, 256));
}

}  // namespace
}  // namespace flashgpt

// Philox-4x32-10 (Salmon et al., SC'11): a counter-based RNG, usable identically on the
// host and in CUDA kernels. Attention dropout draws its mask from it so that the CPU
// reference and every GPU kernel produce the same mask for the same seed and offset,
// whatever their tiling or thread count.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASHGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASHGPT_HOST_DEVICE inline
#endif

namespace flashgpt {

struct Philox4x32 {
  uint32_t x, y, z, w;
};

FLASHGPT_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Ten rounds of Philox-4x32 on `counter` under the 64-bit key (key0, key1).
FLASHGPT_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, counter.x, hi0, lo0);
    philox_mulhilo(kMul1, counter.z, hi1, lo1);
    counter = {hi1 ^ counter.y ^ key0, lo1, hi0 ^ counter.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// The attention dropout stream, 8 bits per element. Element (row, col) of head `head` of
// batch entry `batch` takes byte (col % 16) of
//   philox4x32_10({col / 16, row, batch * heads_q + head, offset_lo}, seed_lo, seed_hi ^ offset_hi)
// where byte k is (word[k / 4] >> (8 * (k % 4))) & 0xFF of the words x, y, z, w = 0..3.
// Rows and columns are positions within the sequence (varlen: within that sequence), so
// one call yields sixteen neighbouring columns of one row and any tiling can regenerate
// any element.
//
// The element is dropped when its byte is below t = round(p * 256) (half up), so the
// effective dropout probability is t / 256, and kept values are scaled by 256 / (256 - t):
// the expectation of every element is exact (FlashAttention-2 quantizes p the same way but
// scales by 1 / (1 - p)). t == 0 (p < 1/512) keeps everything with scale 1, i.e. no
// dropout; t == 256 (p >= 511/512) drops everything, and the scale is 0 rather than
// infinite so that a fully dropped row gives zeros, never NaN.
struct DropoutRng {
  uint64_t seed = 0;
  uint64_t offset = 0;
};

FLASHGPT_HOST_DEVICE Philox4x32 dropout_random_words(DropoutRng rng, int64_t batch_head, int64_t row,
                                                     int64_t col_group) {
  const Philox4x32 counter{static_cast<uint32_t>(col_group), static_cast<uint32_t>(row),
                           static_cast<uint32_t>(batch_head), static_cast<uint32_t>(rng.offset)};
  return philox4x32_10(counter, static_cast<uint32_t>(rng.seed),
                       static_cast<uint32_t>(rng.seed >> 32) ^ static_cast<uint32_t>(rng.offset >> 32));
}

constexpr int kDropoutColsPerCall = 16;

// Byte k (0..15) of one call: the random byte of column col_group * 16 + k.
FLASHGPT_HOST_DEVICE uint32_t dropout_byte(Philox4x32 words, int k) {
  const uint32_t word = (k >> 2) == 0 ? words.x : (k >> 2) == 1 ? words.y : (k >> 2) == 2 ? words.z : words.w;
  return (word >> (8 * (k & 3))) & 0xFFu;
}

// t = round(p * 256) in [0, 256]; p is validated to [0, 1) by the entry points. Computed in
// double on host and device alike, so both round the same way.
FLASHGPT_HOST_DEVICE uint32_t dropout_threshold(float dropout_p) {
  const double scaled = static_cast<double>(dropout_p) * 256.0 + 0.5;
  return scaled <= 0.0 ? 0u : scaled >= 256.0 ? 256u : static_cast<uint32_t>(scaled);
}

// Whether dropout changes anything: t == 0 keeps every element with scale 1.
FLASHGPT_HOST_DEVICE bool dropout_enabled(uint32_t threshold) { return threshold > 0; }

// The multiplier of a kept element: 256 / (256 - t), 1 for t == 0, 0 for t == 256 (nothing
// is kept, and 0 keeps 0 * scale finite).
FLASHGPT_HOST_DEVICE double dropout_keep_scale(uint32_t threshold) {
  return threshold >= 256 ? 0.0 : 256.0 / static_cast<double>(256 - threshold);
}

FLASHGPT_HOST_DEVICE bool dropout_keep_byte(uint32_t byte, uint32_t threshold) { return byte >= threshold; }

FLASHGPT_HOST_DEVICE bool dropout_keep(DropoutRng rng, int64_t batch_head, int64_t row, int64_t col,
                                       uint32_t threshold) {
  const Philox4x32 words = dropout_random_words(rng, batch_head, row, col / kDropoutColsPerCall);
  return dropout_keep_byte(dropout_byte(words, static_cast<int>(col % kDropoutColsPerCall)), threshold);
}

}  // namespace flashgpt

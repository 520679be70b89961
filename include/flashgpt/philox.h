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

// The attention dropout stream. Element (row, col) of head `head` of batch entry `batch`
// takes word (col % 4) of
//   philox4x32_10({col / 4, row, batch * heads_q + head, offset_lo}, seed_lo, seed_hi ^ offset_hi)
// Rows and columns are positions within the sequence (varlen: within that sequence), so
// one call yields four neighbouring columns and any tiling can regenerate any element.
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

// An element is dropped when its 32-bit word is below this threshold: P(drop) = threshold / 2^32.
FLASHGPT_HOST_DEVICE uint32_t dropout_threshold(float dropout_p) {
  const double scaled = static_cast<double>(dropout_p) * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

FLASHGPT_HOST_DEVICE bool dropout_keep(DropoutRng rng, int64_t batch_head, int64_t row, int64_t col,
                                       uint32_t threshold) {
  const Philox4x32 words = dropout_random_words(rng, batch_head, row, col >> 2);
  const uint32_t lane = static_cast<uint32_t>(col & 3);
  const uint32_t word = lane == 0 ? words.x : lane == 1 ? words.y : lane == 2 ? words.z : words.w;
  return word >= threshold;
}

}  // namespace flashgpt

// The vector building blocks of the tiled CPU attention: one register type per ISA of
// cpu_isa.h (GCC/Clang vector extensions, so each body is written once), a vectorized exp,
// and the register-blocked tile product every matrix product of the algorithm is an instance of.
// Internal to src/attention and its tests.
//
// The vector code itself is attention_cpu_simd.inc, compiled once per ISA (see
// attention_cpu_flash_isa.inc). Sums run in a fixed order that depends on the shapes and the ISA
// only, so a result never depends on the thread count.
#pragma once

#include <flashgpt/cpu_isa.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#define FLASHGPT_SIMD_INLINE [[gnu::always_inline]] inline

namespace flashgpt::attention_cpu {

// An ISA's register: kWidth floats. A tile product keeps kRows x kVecs registers of sums live
// (plus kVecs loaded and one broadcast), which must fit the register file: 32 zmm, 16 ymm/xmm.
struct SimdBaseline {
  static constexpr int kWidth = 4, kRows = 6, kVecs = 2;  // 12 sums + 3 of 16 xmm
  typedef float Vec __attribute__((vector_size(16)));
  typedef int32_t Int __attribute__((vector_size(16)));
};
struct SimdAvx2 {
  static constexpr int kWidth = 8, kRows = 6, kVecs = 2;  // 12 sums + 3 of 16 ymm
  typedef float Vec __attribute__((vector_size(32)));
  typedef int32_t Int __attribute__((vector_size(32)));
};
struct SimdAvx512 {
  static constexpr int kWidth = 16, kRows = 6, kVecs = 4;  // 24 sums + 5 of 32 zmm
  typedef float Vec __attribute__((vector_size(64)));
  typedef int32_t Int __attribute__((vector_size(64)));
};
// Tile rows padded to this many floats hold whole registers of every ISA.
inline constexpr int kSimdMaxWidth = 16;

// The lane indices 0, 1, ..., for masks.
inline constexpr int32_t kSimdLanes[kSimdMaxWidth] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// One tile product, out (+)= A B over `count` terms:
//   out[k * ldo + v] (+)= sum_{t < count} a[k * a_row + t * a_step] * b[t * ldb + v]
// for k < rows and v < cols (a multiple of the ISA's width). With a_step = 1 the rows of A are
// contiguous (S = Q K^T from K^T, O += P V, dQ += dS K); with a_row = 1 it reads A transposed
// (dV += P^T dO, dK += dS^T Q) without copying it.
struct TileProduct {
  const float* a = nullptr;
  int64_t a_row = 0, a_step = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  int rows = 0, cols = 0, count = 0;
  bool accumulate = false;  // false: out = A B
};

// simd_exp over n floats with the ISA `isa` (the tail lanes through a padded copy): the
// test's handle on the function the kernels inline.
void attention_cpu_exp(CpuIsa isa, const float* x, float* y, int64_t n);

}  // namespace flashgpt::attention_cpu

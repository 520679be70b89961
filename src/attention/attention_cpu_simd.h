// The vector building blocks of the tiled CPU attention: one register type per ISA of
// cpu_isa.h (GCC/Clang vector extensions, so each body is written once), a vectorized exp,
// and the register-blocked tile product every matrix product of the algorithm is an instance of.
// Internal to src/attention and its tests.
//
// Everything here is [[gnu::always_inline]]: it takes the ISA of the FLASHGPT_TARGET_* function
// it is inlined into. Sums run in a fixed order that depends on the shapes and the ISA only, so a
// result never depends on the thread count.
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

template <class S>
FLASHGPT_SIMD_INLINE typename S::Vec simd_load(const float* p) {
  typename S::Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class S>
FLASHGPT_SIMD_INLINE void simd_store(float* p, typename S::Vec v) {
  std::memcpy(p, &v, sizeof v);
}
// x in every lane. (GCC 12 expands a vector of equal elements made in a function without the
// ISA's target as sixteen masked inserts once inlined; 0 + x is one add and one broadcast.)
template <class S>
FLASHGPT_SIMD_INLINE typename S::Vec simd_splat(float x) {
  return typename S::Vec{} + x;
}
// *p in every lane: on AVX2 and AVX-512 one vbroadcastss from memory, a load-port instruction
// (written out because of the expansion above), the operand of every tile product's
// multiply-add.
template <class S>
FLASHGPT_SIMD_INLINE typename S::Vec simd_broadcast(const float* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (S::kWidth >= 8) {
    typename S::Vec v;
    asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
    return v;
  }
#endif
  return simd_splat<S>(*p);
}

// Lanes c0 + lane < end: all ones, else 0.
inline constexpr int32_t kSimdLanes[kSimdMaxWidth] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
template <class S>
FLASHGPT_SIMD_INLINE typename S::Int simd_lanes_below(int c0, int end) {
  typename S::Int lane;
  std::memcpy(&lane, kSimdLanes, sizeof lane);
  return lane < end - c0;
}
template <class S>
FLASHGPT_SIMD_INLINE float simd_sum(typename S::Vec v) {
  float s = 0.0f;
#pragma GCC unroll 16
  for (int i = 0; i < S::kWidth; ++i) s += v[i];
  return s;
}
template <class S>
FLASHGPT_SIMD_INLINE float simd_max(typename S::Vec v) {
  float m = v[0];
#pragma GCC unroll 16
  for (int i = 1; i < S::kWidth; ++i) m = m > v[i] ? m : v[i];
  return m;
}

// e^x, lane by lane, within 2 ulp of the true value for x in [-87.33, 88.37] (the normal
// results; tests/attention check it against double exp). Below that it gives 0 (also for
// -inf), where the true value is subnormal; above it, the value at 88.37. The softmax only
// takes exp of x <= 0 and of values a rounding above it.
//   x = n ln2 + r, |r| <= ln2 / 2:  e^x = 2^n e^r, e^r by its Taylor polynomial of degree 7
//   (truncation below 1e-8 relative), n rounded with the 1.5 * 2^23 trick (SSE2 has no
//   rounding instruction), ln2 split in two so that n ln2 is exact.
template <class S>
FLASHGPT_SIMD_INLINE typename S::Vec simd_exp(typename S::Vec x) {
  using V = typename S::Vec;
  using I = typename S::Int;
  const I underflow = x < -87.33654f;
  x = x > 88.37626f ? simd_splat<S>(88.37626f) : x;
  x = x < -87.33654f ? simd_splat<S>(-87.33654f) : x;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: t's low mantissa bits are round(x / ln2)
  const V t = x * 1.44269504088896341f + kShifter;
  const V n = t - kShifter;
  V r = x - n * 0.693145751953125f;  // ln2 high part: 15 bits, so n * it is exact for |n| < 2^9
  r = r - n * 1.42860682030941723e-6f;
  V p = simd_splat<S>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  std::memcpy(&bits, &t, sizeof bits);
  const I exponent = (bits - 0x4B400000 + 127) << 23;  // 2^n as a float's bits
  V two_n;
  std::memcpy(&two_n, &exponent, sizeof two_n);
  return underflow ? V{} : p * two_n;
}

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

// R rows x NV registers of out, kept in registers over the whole sum.
template <class S, int R, int NV>
FLASHGPT_SIMD_INLINE void tile_product_block(const TileProduct& p, int k0, int v0) {
  using V = typename S::Vec;
  V acc[R][NV];
  float* out = p.out + k0 * p.ldo + v0;
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[k][v] = p.accumulate ? simd_load<S>(out + k * p.ldo + v * S::kWidth) : V{};
  }
  const float* a = p.a + k0 * p.a_row;
  const float* b = p.b + v0;
  for (int t = 0; t < p.count; ++t) {
    V bt[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bt[v] = simd_load<S>(b + t * p.ldb + v * S::kWidth);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      const V ak = simd_broadcast<S>(a + k * p.a_row + t * p.a_step);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[k][v] += ak * bt[v];
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) simd_store<S>(out + k * p.ldo + v * S::kWidth, acc[k][v]);
  }
}

template <class S, int R, int NV = S::kVecs>
FLASHGPT_SIMD_INLINE void tile_product_pick_vecs(const TileProduct& p, int k0, int v0, int vecs) {
  if constexpr (NV > 1) {
    if (vecs < NV) return tile_product_pick_vecs<S, R, NV - 1>(p, k0, v0, vecs);
  }
  tile_product_block<S, R, NV>(p, k0, v0);
}

template <class S, int R = S::kRows>
FLASHGPT_SIMD_INLINE void tile_product_pick(const TileProduct& p, int k0, int v0, int rows, int vecs) {
  if constexpr (R > 1) {
    if (rows < R) return tile_product_pick<S, R - 1>(p, k0, v0, rows, vecs);
  }
  tile_product_pick_vecs<S, R>(p, k0, v0, vecs);
}

template <class S>
FLASHGPT_SIMD_INLINE void tile_product(const TileProduct& p) {
  constexpr int kChunk = S::kVecs * S::kWidth;
  for (int k0 = 0; k0 < p.rows; k0 += S::kRows) {
    const int rows = p.rows - k0 < S::kRows ? p.rows - k0 : S::kRows;
    for (int v0 = 0; v0 < p.cols; v0 += kChunk) {
      const int vecs = (p.cols - v0 < kChunk ? p.cols - v0 : kChunk) / S::kWidth;
      tile_product_pick<S>(p, k0, v0, rows, vecs);
    }
  }
}

// simd_exp over n floats with the ISA `isa` (the tail lanes through a padded copy): the
// test's handle on the function the kernels inline.
void attention_cpu_exp(CpuIsa isa, const float* x, float* y, int64_t n);

}  // namespace flashgpt::attention_cpu

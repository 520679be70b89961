// Row and elementwise loops, one body per ISA (rows_cpu.h, cpu_isa.h).
#include "rows_cpu.h"

#include "parallel.h"

#include <flashgpt/cpu_isa.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace flashgpt::model {

namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

[[gnu::always_inline]] inline float exp_neg_body(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2Hi = 0.693359375f;      // ln 2's first 9 bits: n kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;   // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;       // 1.5 2^23: adding it rounds to an integer
  constexpr float kMin = -87.0f;
  const float xc = x < kMin ? kMin : x;
  const float t = xc * kLog2e + kRound;  // n in t's low mantissa bits
  const float n = t - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // e^r, |r| <= ln2 / 2: Taylor to degree 7 (remainder below 6e-9 relative).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t i = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);  // n
  const float scale = std::bit_cast<float>((i + 127) << 23);                       // 2^n, n >= -126
  return x < kMin ? 0.0f : p * scale;
}

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|) in (0, 1].
[[gnu::always_inline]] inline float tanh_body(float u) {
  const float a = u < 0.0f ? -u : u;
  const float e = exp_neg_body(-2.0f * a);
  const float t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}

// x = exp(x - max) over n values; returns the sum (fp32 lanes: n is one vocabulary slab).
[[gnu::always_inline]] inline float exp_slab_body(float* x, int64_t n, float* max_out) {
  float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < n; ++i) max = x[i] > max ? x[i] : max;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_neg_body(x[i] - max);
    x[i] = e;
    sum += e;
  }
  *max_out = max;
  return sum;
}

[[gnu::always_inline]] inline void scale_body(float* x, int64_t n, float s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

[[gnu::always_inline]] inline void gelu_forward_body(float* out, const float* inp, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanh_body(kGeluScale * (x + kGeluCubic * x * x * x)));
  }
}

[[gnu::always_inline]] inline void gelu_backward_body(float* dinp, const float* inp, const float* dout, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = inp[i];
    const float th = tanh_body(kGeluScale * (x + kGeluCubic * x * x * x));
    const float sech2 = 1.0f - th * th;
    const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
    dinp[i] = grad * dout[i];
  }
}

[[gnu::always_inline]] inline void adamw_body(float* p, const float* g, float* m, float* v, int64_t n,
                                              const AdamWRow& a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * a.grad_scale;
    const float mi = a.b1 * m[i] + (1.0f - a.b1) * gi;
    const float vi = a.b2 * v[i] + (1.0f - a.b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * a.decay - a.step_size * mi / (std::sqrt(vi) * a.inv_sqrt_bc2 + a.eps);
  }
}

// One copy of each loop per ISA. The OpenMP regions stay outside them, in the entry points:
// GCC outlines a parallel region before inlining, so a region inside a body would be
// compiled for the baseline ISA whatever function it is inlined into.
struct RowKernels {
  float (*exp_neg)(float x);
  float (*exp_slab)(float* x, int64_t n, float* max_out);
  void (*scale)(float* x, int64_t n, float s);
  void (*gelu_forward)(float* out, const float* inp, int64_t n);
  void (*gelu_backward)(float* dinp, const float* inp, const float* dout, int64_t n);
  void (*adamw)(float* p, const float* g, float* m, float* v, int64_t n, const AdamWRow& a);
};

#define FLASHGPT_ROW_KERNELS(ATTR, isa)                                                                          \
  ATTR float exp_neg_##isa(float x) { return exp_neg_body(x); }                                                \
  ATTR float exp_slab_##isa(float* x, int64_t n, float* max_out) { return exp_slab_body(x, n, max_out); }      \
  ATTR void scale_##isa(float* x, int64_t n, float s) { scale_body(x, n, s); }                                 \
  ATTR void gelu_forward_##isa(float* out, const float* inp, int64_t n) { gelu_forward_body(out, inp, n); }    \
  ATTR void gelu_backward_##isa(float* dinp, const float* inp, const float* dout, int64_t n) {                 \
    gelu_backward_body(dinp, inp, dout, n);                                                                    \
  }                                                                                                            \
  ATTR void adamw_##isa(float* p, const float* g, float* m, float* v, int64_t n, const AdamWRow& a) {          \
    adamw_body(p, g, m, v, n, a);                                                                              \
  }                                                                                                            \
  constexpr RowKernels kRowKernels_##isa = {exp_neg_##isa,      exp_slab_##isa,      scale_##isa,             \
                                            gelu_forward_##isa, gelu_backward_##isa, adamw_##isa};

FLASHGPT_ROW_KERNELS(, baseline)
#if FLASHGPT_CPU_DISPATCH
FLASHGPT_ROW_KERNELS(FLASHGPT_TARGET_AVX2, avx2)
FLASHGPT_ROW_KERNELS(FLASHGPT_TARGET_AVX512, avx512)
#endif
#undef FLASHGPT_ROW_KERNELS

const RowKernels& row_kernels() {
#if FLASHGPT_CPU_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::avx512: return kRowKernels_avx512;
    case CpuIsa::avx2: return kRowKernels_avx2;
    case CpuIsa::baseline: break;
  }
#endif
  return kRowKernels_baseline;
}

// Elementwise loops run in blocks of this many elements, one call per block.
constexpr int64_t kElementBlock = 4096;

}  // namespace

float exp_neg_cpu(float x) { return row_kernels().exp_neg(x); }

SlabKernels slab_kernels() {
  const RowKernels& k = row_kernels();
  return SlabKernels{k.exp_slab, k.scale};
}

void gelu_forward_cpu(float* out, const float* inp, int64_t n) {
  const auto fn = row_kernels().gelu_forward;
  const int64_t blocks = (n + kElementBlock - 1) / kElementBlock;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(n))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i = blk * kElementBlock;
    fn(out + i, inp + i, std::min(kElementBlock, n - i));
  }
}

void gelu_backward_cpu(float* dinp, const float* inp, const float* dout, int64_t n) {
  const auto fn = row_kernels().gelu_backward;
  const int64_t blocks = (n + kElementBlock - 1) / kElementBlock;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(n))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i = blk * kElementBlock;
    fn(dinp + i, inp + i, dout + i, std::min(kElementBlock, n - i));
  }
}

void adamw_cpu(float* p, const float* g, float* m, float* v, int64_t n, const AdamWRow& a) {
  const auto fn = row_kernels().adamw;
  const int64_t blocks = (n + kElementBlock - 1) / kElementBlock;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(n))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i = blk * kElementBlock;
    fn(p + i, g + i, m + i, v + i, std::min(kElementBlock, n - i), a);
  }
}

}  // namespace flashgpt::model

// Which x86-64 vector extensions the CPU kernels' hot loops run with, chosen at run time.
//
// The library is built for the baseline ISA (x86-64: SSE2, no FMA) so that one binary runs on
// every machine it is copied to (FLASHGPT_NATIVE=ON builds for the build machine instead). A
// kernel with wider variants compiles its loop body once per ISA, each copy inside a function
// marked FLASHGPT_TARGET_AVX2 or FLASHGPT_TARGET_AVX512, and calls the copy cpu_isa() names:
//
//   template <...> [[gnu::always_inline]] inline void body(...) { ... }   // the loops
//   FLASHGPT_TARGET_AVX512 void kernel_avx512(...) { body(...); }         // zmm, FMA
//   FLASHGPT_TARGET_AVX2 void kernel_avx2(...) { body(...); }             // ymm, FMA
//   void kernel_baseline(...) { body(...); }                              // xmm
//
// A body inlined into a target function is compiled with that function's ISA. Where the
// extensions do not exist (another architecture or compiler) only the baseline is built.
#pragma once

namespace flashgpt {

enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };

// "baseline", "avx2" or "avx512".
const char* cpu_isa_name(CpuIsa isa);

// Whether this CPU (and this build) can run code compiled for `isa`.
bool cpu_isa_supported(CpuIsa isa);

// The ISA the kernels use: the widest supported, or what FLASHGPT_CPU_ISA names
// (baseline, avx2 or avx512; for tests and A/B runs). An unknown name, or an ISA this CPU or
// build lacks, throws flashgpt::Error naming the variable. Reads the environment on every
// call: call it once per operation, not inside a loop.
CpuIsa cpu_isa();

}  // namespace flashgpt

// The same targets as pragmas, for a whole region of code (templates included, which take the
// target of the region that defines them):
//   FLASHGPT_CPU_TARGET_BEGIN_AVX512  namespace avx512 { ... }  FLASHGPT_CPU_TARGET_END
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASHGPT_CPU_DISPATCH 1
#define FLASHGPT_CPU_TARGET_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define FLASHGPT_CPU_TARGET_BEGIN_AVX512 \
  _Pragma("GCC push_options")            \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512\")")
#define FLASHGPT_CPU_TARGET_END _Pragma("GCC pop_options")
#define FLASHGPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
// GCC splits 512-bit loops in two 256-bit halves unless told to prefer the full width.
#define FLASHGPT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#elif defined(__x86_64__) && defined(__clang__)
#define FLASHGPT_CPU_DISPATCH 1
#define FLASHGPT_CPU_TARGET_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define FLASHGPT_CPU_TARGET_BEGIN_AVX512 \
  _Pragma(                               \
      "clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma\"))), apply_to = function)")
#define FLASHGPT_CPU_TARGET_END _Pragma("clang attribute pop")
#define FLASHGPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FLASHGPT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define FLASHGPT_CPU_DISPATCH 0
#define FLASHGPT_CPU_TARGET_BEGIN_AVX2
#define FLASHGPT_CPU_TARGET_BEGIN_AVX512
#define FLASHGPT_CPU_TARGET_END
#define FLASHGPT_TARGET_AVX2
#define FLASHGPT_TARGET_AVX512
#endif

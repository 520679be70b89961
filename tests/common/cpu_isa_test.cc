#include <flashgpt/cpu_isa.h>
#include <flashgpt/error.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

// Sets FLASHGPT_CPU_ISA for one scope and restores what was there.
class ScopedIsa {
 public:
  explicit ScopedIsa(const char* value) {
    if (const char* old = std::getenv("FLASHGPT_CPU_ISA")) old_ = old, had_ = true;
    setenv("FLASHGPT_CPU_ISA", value, 1);
  }
  ~ScopedIsa() { had_ ? setenv("FLASHGPT_CPU_ISA", old_.c_str(), 1) : unsetenv("FLASHGPT_CPU_ISA"); }

 private:
  std::string old_;
  bool had_ = false;
};

TEST(CpuIsa, Names) {
  EXPECT_STREQ(cpu_isa_name(CpuIsa::baseline), "baseline");
  EXPECT_STREQ(cpu_isa_name(CpuIsa::avx2), "avx2");
  EXPECT_STREQ(cpu_isa_name(CpuIsa::avx512), "avx512");
}

TEST(CpuIsa, DefaultIsTheWidestSupported) {
  ScopedIsa unset("");
  EXPECT_TRUE(cpu_isa_supported(CpuIsa::baseline));
  if (cpu_isa_supported(CpuIsa::avx512)) {
    EXPECT_TRUE(cpu_isa_supported(CpuIsa::avx2));
  }
  const CpuIsa isa = cpu_isa();
  EXPECT_TRUE(cpu_isa_supported(isa));
  for (CpuIsa wider : {CpuIsa::avx2, CpuIsa::avx512}) {
    if (static_cast<int>(wider) > static_cast<int>(isa)) {
      EXPECT_FALSE(cpu_isa_supported(wider)) << cpu_isa_name(wider);
    }
  }
}

TEST(CpuIsa, EnvironmentChoosesOrIsRefused) {
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    ScopedIsa set(cpu_isa_name(isa));
    if (cpu_isa_supported(isa)) {
      EXPECT_EQ(cpu_isa(), isa);
    } else {
      try {
        cpu_isa();
        ADD_FAILURE() << cpu_isa_name(isa) << " is not supported here but was accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("cannot run"), std::string::npos) << e.what();
      }
    }
  }
  ScopedIsa bogus("avx1024");
  try {
    cpu_isa();
    ADD_FAILURE() << "an unknown ISA name was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FLASHGPT_CPU_ISA is 'avx1024'"), std::string::npos) << e.what();
  }
}

// The header's pattern: one loop body, compiled once per ISA.
[[gnu::always_inline]] inline float dot_body(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
FLASHGPT_TARGET_AVX512 float dot_avx512(const float* a, const float* b, int n) { return dot_body(a, b, n); }
FLASHGPT_TARGET_AVX2 float dot_avx2(const float* a, const float* b, int n) { return dot_body(a, b, n); }
float dot_baseline(const float* a, const float* b, int n) { return dot_body(a, b, n); }

TEST(CpuIsa, EachSupportedVariantRunsAndAgrees) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int n : {1, 7, 16, 33, 1000}) {
    std::vector<float> a(n), b(n);
    double exact = 0.0;
    for (int i = 0; i < n; ++i) a[i] = u(rng), b[i] = u(rng), exact += double(a[i]) * b[i];
    const double tolerance = 1e-5 * n;
    EXPECT_NEAR(dot_baseline(a.data(), b.data(), n), exact, tolerance) << n;
    if (cpu_isa_supported(CpuIsa::avx2)) {
      EXPECT_NEAR(dot_avx2(a.data(), b.data(), n), exact, tolerance) << n;
    }
    if (cpu_isa_supported(CpuIsa::avx512)) {
      EXPECT_NEAR(dot_avx512(a.data(), b.data(), n), exact, tolerance) << n;
    }
  }
}

}  // namespace
}  // namespace flashgpt

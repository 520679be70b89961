#include <flashgpt/cpu_isa.h>
#include <flashgpt/error.h>

#include <cstdlib>
#include <cstring>

namespace flashgpt {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::baseline:
      return "baseline";
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
  }
  return "?";
}

bool cpu_isa_supported(CpuIsa isa) {
  if (isa == CpuIsa::baseline) return true;
#if FLASHGPT_CPU_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == CpuIsa::avx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

CpuIsa cpu_isa() {
  const char* value = std::getenv("FLASHGPT_CPU_ISA");
  if (value == nullptr || *value == '\0') {
    for (CpuIsa isa : {CpuIsa::avx512, CpuIsa::avx2})
      if (cpu_isa_supported(isa)) return isa;
    return CpuIsa::baseline;
  }
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    if (std::strcmp(value, cpu_isa_name(isa)) != 0) continue;
    FLASHGPT_CHECK(cpu_isa_supported(isa), "FLASHGPT_CPU_ISA is '{}', which this CPU (or this build) cannot run", value);
    return isa;
  }
  FLASHGPT_FAIL("FLASHGPT_CPU_ISA is '{}': expected baseline, avx2 or avx512", value);
}

}  // namespace flashgpt

// bfloat16 on the host, as raw 16-bit words: float -> bf16 rounds to nearest even and keeps
// NaNs NaN (0x7fc0); bf16 -> float is exact. For filling and reading device buffers where
// the CUDA headers' __nv_bfloat16 host conversions are not at hand (plain C++ sources).
#pragma once

#include <cstdint>
#include <cstring>

namespace flashgpt {

inline uint16_t bf16_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace flashgpt

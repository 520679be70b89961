// Switches of the CUDA backend read from the environment: "0" or "1", unset or empty takes
// the fallback, anything else is refused with the variable's name.
#pragma once

#include <flashgpt/error.h>

#include <cstdlib>
#include <cstring>

namespace flashgpt::model_cuda {

inline bool env_switch(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  FLASHGPT_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0, "{} must be 0 or 1, got '{}'", name,
                 value);
  return value[0] == '1';
}

}  // namespace flashgpt::model_cuda

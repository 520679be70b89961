// Switches of the CUDA backend read from the environment: env_switch takes "0" or "1",
// env_int a whole number in [lowest, highest]; unset or empty takes the fallback, anything
// else is refused with the variable's name.
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

// `what` names the values in the error message ("a number of multiprocessors", say).
inline int env_int(const char* name, int lowest, int highest, int fallback, const char* what) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long number = std::strtol(value, &end, 10);
  FLASHGPT_CHECK(end != value && *end == '\0' && number >= lowest && number <= highest,
                 "{} must be {} in [{}, {}], got '{}'", name, what, lowest, highest, value);
  return static_cast<int>(number);
}

}  // namespace flashgpt::model_cuda

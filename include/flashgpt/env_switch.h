// Switches read from the environment (the CUDA paths' A/B knobs): env_switch takes "0" or "1",
// env_int a whole number in [lowest, highest]; unset or empty takes the fallback, anything
// else is refused with the variable's name, so that a typo never times the wrong path.
#pragma once

#include <flashgpt/error.h>

#include <cstdlib>
#include <cstring>

namespace flashgpt {

// `off` and `on` name what 0 and 1 select, for the error message.
inline bool env_switch(const char* name, bool fallback, const char* off = "off", const char* on = "on") {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  FLASHGPT_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0, "{} is '{}': expected 0 ({}) or 1 ({})",
                 name, value, off, on);
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

}  // namespace flashgpt

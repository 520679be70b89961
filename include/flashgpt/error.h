// One error type and one checking macro family for the whole library. Every check
// reports what failed in words a user can act on, plus the file and line for us.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace flashgpt {

// Thrown for bad input (shapes, files, options) and for failed library calls.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void error_throw(const char* file, int line, const std::string& message);

}  // namespace flashgpt

// FLASHGPT_CHECK(cond, "format {}", args...): throws flashgpt::Error naming the problem.
#define FLASHGPT_CHECK(cond, ...)                                                   \
  do {                                                                              \
    if (!(cond)) ::flashgpt::error_throw(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)

#define FLASHGPT_FAIL(...) ::flashgpt::error_throw(__FILE__, __LINE__, fmt::format(__VA_ARGS__))

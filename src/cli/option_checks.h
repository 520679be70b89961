// Validators shared by the option tables: numbers are checked as the user typed them,
// before CLI11 converts them (it would turn "-1" into 2^64 - 1 for an unsigned option).
#pragma once

#include <CLI/CLI.hpp>

#include <string>

namespace flashgpt {

// A whole number >= 0 (digits only), for unsigned options: seeds, sizes, limits.
inline CLI::Validator cli_unsigned_integer() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos) {
          return "expected a whole number >= 0, got '" + value + "'";
        }
        return "";
      },
      "UINT");
}

// A thread count: 0 means all cores; more than kMaxThreads is refused, not attempted.
inline constexpr int kCliMaxThreads = 1024;
inline CLI::Validator cli_thread_count() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos || value.size() > 5 ||
            std::stoi(value) > kCliMaxThreads) {
          return "expected a thread count from 0 (all cores) to " + std::to_string(kCliMaxThreads) + ", got '" +
                 value + "'";
        }
        return "";
      },
      "THREADS");
}

}  // namespace flashgpt

// SHA-256 (FIPS 180-4), small and dependency-free: verifies the rank files' published hashes.
#pragma once

#include <string>
#include <string_view>

namespace flashgpt {

// Lower-case hex digest of `data`.
std::string sha256_hex(std::string_view data);

}  // namespace flashgpt

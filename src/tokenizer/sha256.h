// SHA-256 and SHA-1 (FIPS 180-4), small and dependency-free: SHA-256 verifies the rank
// files' published hashes; SHA-1 names files in tiktoken's download cache (sha1 of the URL).
#pragma once

#include <string>
#include <string_view>

namespace flashgpt {

// Lower-case hex digest of `data`.
std::string sha256_hex(std::string_view data);
std::string sha1_hex(std::string_view data);

}  // namespace flashgpt

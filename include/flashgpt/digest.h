// Message digests, small and dependency-free, once for the whole project (src/common):
// SHA-256 verifies the tokenizer's rank files and the downloaded corpora, SHA-1 names files
// in tiktoken's download cache (sha1 of the URL), and MD5 exists only because the published
// WMT checksums are MD5 (it guards against corruption, not tampering).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

namespace flashgpt {

// Lower-case hex digests of a string...
std::string sha256_hex(std::string_view bytes);
std::string sha1_hex(std::string_view bytes);
std::string md5_hex(std::string_view bytes);
// ...and of a file's contents, streamed in 1 MiB chunks. A file that cannot be read is an
// error naming it.
std::string sha256_hex_file(const std::filesystem::path& path);
std::string md5_hex_file(const std::filesystem::path& path);

}  // namespace flashgpt

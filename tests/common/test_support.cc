#include "common/test_support.h"

#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include "tokenizer/vocab_files.h"

#include <cstdlib>
#include <string_view>

namespace flashgpt::testing {

std::filesystem::path source_dir() {
  const char* dir = std::getenv("FLASHGPT_SOURCE_DIR");
  return dir ? std::filesystem::path(dir) : std::filesystem::current_path();
}

std::optional<std::filesystem::path> shared_data_dir() {
  if (const char* dir = std::getenv("FLASHGPT_DATA_DIR"); dir && std::filesystem::is_directory(dir)) return dir;
  auto beside = source_dir().parent_path() / "shared" / "data";
  if (std::filesystem::is_directory(beside)) return beside;
  return std::nullopt;
}

namespace {

constexpr std::string_view kEncodings[] = {"r50k_base", "cl100k_base", "o200k_base"};

bool holds_rank_files(const std::filesystem::path& dir) {
  for (auto name : kEncodings) {
    if (!std::filesystem::is_regular_file(dir / (std::string(name) + ".tiktoken"))) return false;
  }
  return true;
}

// The download cache, filled once per process where it can be (a network, libcurl, no
// FLASHGPT_OFFLINE): Tokenizer::load downloads a missing official file into it.
std::optional<std::filesystem::path> cached_rank_files() {
  static const std::optional<std::filesystem::path> cached = []() -> std::optional<std::filesystem::path> {
    const auto cache = vocab_cache_dir();
    if (!holds_rank_files(cache)) {
      const char* offline = std::getenv("FLASHGPT_OFFLINE");
      if (offline && *offline && std::string_view(offline) != "0") return std::nullopt;
      for (auto name : kEncodings) {
        try {
          Tokenizer::load(name, cache);
        } catch (const Error&) {
          return std::nullopt;  // no network, or a build without libcurl
        }
      }
    }
    return holds_rank_files(cache) ? std::optional(cache) : std::nullopt;
  }();
  return cached;
}

}  // namespace

std::optional<std::filesystem::path> tokenizer_dir() {
  if (const char* dir = std::getenv("FLASHGPT_TOKENIZER_DIR"); dir && std::filesystem::is_directory(dir)) return dir;
  if (auto data = shared_data_dir(); data && std::filesystem::is_directory(*data / "tokenizers"))
    return *data / "tokenizers";
  return cached_rank_files();
}

bool data_required() {
  const char* value = std::getenv("FLASHGPT_REQUIRE_DATA");
  return value && std::string_view(value) == "1";
}

}  // namespace flashgpt::testing

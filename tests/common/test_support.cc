#include "common/test_support.h"

#include <cstdlib>

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

std::optional<std::filesystem::path> tokenizer_dir() {
  if (const char* dir = std::getenv("FLASHGPT_TOKENIZER_DIR"); dir && std::filesystem::is_directory(dir)) return dir;
  if (auto data = shared_data_dir(); data && std::filesystem::is_directory(*data / "tokenizers"))
    return *data / "tokenizers";
  return std::nullopt;
}

}  // namespace flashgpt::testing

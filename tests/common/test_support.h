// Helpers shared by the tests: paths to the source tree and to ../shared/data.
#pragma once

#include <filesystem>
#include <optional>

namespace flashgpt::testing {

// The repository root (from FLASHGPT_SOURCE_DIR, set by ctest).
std::filesystem::path source_dir();
// ../shared/data beside the checkout, or FLASHGPT_DATA_DIR; nullopt if neither exists.
std::optional<std::filesystem::path> shared_data_dir();
// FLASHGPT_TOKENIZER_DIR, or ../shared/data/tokenizers; nullopt if neither exists.
std::optional<std::filesystem::path> tokenizer_dir();

}  // namespace flashgpt::testing

// Helpers shared by the tests: paths to the source tree, to the shared corpora and to the
// tokenizer's rank files, and the one way a test skips when those are missing.
#pragma once

#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <optional>
#include <string>

namespace flashgpt::testing {

// The repository root (from FLASHGPT_SOURCE_DIR, set by ctest).
std::filesystem::path source_dir();
// FLASHGPT_DATA_DIR, or ../shared/data beside the checkout; nullopt if neither exists.
std::optional<std::filesystem::path> shared_data_dir();
// A folder holding the three official rank files (r50k, cl100k, o200k): FLASHGPT_TOKENIZER_DIR,
// or ../shared/data/tokenizers, or the tokenizer's download cache once it holds all three
// (filled, where there is a network and FLASHGPT_OFFLINE is unset, by loading them the
// first time this is asked, as tiktoken does); nullopt otherwise.
std::optional<std::filesystem::path> tokenizer_dir();

// The message of the flashgpt::Error that `f()` throws, or "" when it returns: the
// one helper every test uses to check that bad input gets a message naming the problem.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Whether FLASHGPT_REQUIRE_DATA=1 (CI sets it): then a missing corpus or rank file fails the
// test instead of skipping it, so that CI still runs everything.
bool data_required();

// What to tell a user whose checkout lacks them.
inline constexpr const char* kTokenizerMissing =
    "no tokenizer rank files (r50k_base, cl100k_base, o200k_base .tiktoken, with their .meta.json): set "
    "FLASHGPT_TOKENIZER_DIR to their folder or put them in ../shared/data/tokenizers; with a network, a "
    "libcurl build downloads the official ones into ~/.cache/flashgpt/tokenizers";
inline constexpr const char* kSharedDataMissing =
    "no shared corpora (wmt14/ and extra/, see wmt14/SOURCES.md there): set FLASHGPT_DATA_DIR to the "
    "folder that holds them or put it at ../shared/data beside the checkout";

}  // namespace flashgpt::testing

// Skips the current test with a message that names what is missing and how to get it; under
// FLASHGPT_REQUIRE_DATA=1 the test fails with that message instead.
#define FLASHGPT_SKIP_MISSING(what)                                                  \
  do {                                                                               \
    if (::flashgpt::testing::data_required()) {                                      \
      FAIL() << (what) << " (FLASHGPT_REQUIRE_DATA=1: required)";                    \
    } else {                                                                         \
      GTEST_SKIP() << (what);                                                        \
    }                                                                                \
  } while (0)

#define FLASHGPT_REQUIRE_TOKENIZER_DIR()                                                           \
  do {                                                                                             \
    if (!::flashgpt::testing::tokenizer_dir()) FLASHGPT_SKIP_MISSING(::flashgpt::testing::kTokenizerMissing); \
  } while (0)

#define FLASHGPT_REQUIRE_SHARED_DATA()                                                             \
  do {                                                                                             \
    if (!::flashgpt::testing::shared_data_dir()) FLASHGPT_SKIP_MISSING(::flashgpt::testing::kSharedDataMissing); \
  } while (0)

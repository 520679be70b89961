// analyze: whole-word French keyword counts over the corpora.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flashgpt {

inline constexpr std::array<std::string_view, 19> kDefaultFrenchKeywords = {
    "le", "la", "les", "et", "de", "du", "des", "que", "qui", "à",
    "est", "un", "une", "pour", "pas", "bonjour", "merci", "oui", "non"};

enum class CaseMode { sensitive, ignore };

// Counts occurrences of keywords as whole words: a word is a maximal run of Unicode
// letters and decimal digits (unicode_is_word_char), so "de," counts "de", "l'été" is
// "l" + "été", and "de de" counts twice. With CaseMode::ignore, words and keywords are
// compared after unicode_simple_lower.
class KeywordCounter {
 public:
  KeywordCounter(std::vector<std::string> keywords, CaseMode mode);
  void add_text(std::string_view text);  // invalid UTF-8 bytes separate words
  uint64_t texts() const { return texts_; }
  uint64_t total() const;
  // keyword -> count, in the order the keywords were given
  std::vector<std::pair<std::string, uint64_t>> counts() const;

 private:
  std::vector<std::string> keywords_;
  std::vector<uint64_t> counts_;
  std::vector<std::pair<std::string, size_t>> index_;  // folded keyword -> slot, sorted
  CaseMode mode_;
  uint64_t texts_ = 0;
  std::string scratch_;
};

}  // namespace flashgpt

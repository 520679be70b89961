// The French-keyword analysis: whole-word counting over Unicode word characters.
#include <flashgpt/data_analyze.h>
#include <flashgpt/error.h>
#include <flashgpt/unicode.h>

#include <algorithm>

namespace flashgpt {
namespace {

// Decodes one code point at `pos`, or returns U+FFFD (not a word character) and advances
// one byte on invalid UTF-8, so any input is safe.
char32_t utf8_decode_lenient(std::string_view text, size_t& pos) {
  const auto b = static_cast<unsigned char>(text[pos]);
  if (b < 0x80) {
    ++pos;
    return b;
  }
  const size_t len = (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
  if (len == 0 || pos + len > text.size() || utf8_first_invalid(text.substr(pos, len))) {
    ++pos;
    return 0xFFFD;
  }
  return utf8_decode(text, pos);
}

std::string fold(std::string_view word, CaseMode mode) {
  if (mode == CaseMode::sensitive) return std::string(word);
  std::string out;
  size_t pos = 0;
  while (pos < word.size()) utf8_append(out, unicode_simple_lower(utf8_decode_lenient(word, pos)));
  return out;
}

}  // namespace

KeywordCounter::KeywordCounter(std::vector<std::string> keywords, CaseMode mode)
    : keywords_(std::move(keywords)), counts_(keywords_.size(), 0), mode_(mode) {
  FLASHGPT_CHECK(!keywords_.empty(), "the keyword list is empty");
  for (size_t i = 0; i < keywords_.size(); ++i) {
    const auto& k = keywords_[i];
    FLASHGPT_CHECK(!k.empty() && !utf8_first_invalid(k), "keyword {} is empty or not valid UTF-8", i + 1);
    size_t pos = 0;
    while (pos < k.size()) {
      FLASHGPT_CHECK(unicode_is_word_char(utf8_decode(k, pos)),
                     "keyword '{}' contains a character that is not a letter or digit, so it can never match a word",
                     k);
    }
    index_.emplace_back(fold(k, mode_), i);
  }
  std::sort(index_.begin(), index_.end());
  for (size_t i = 1; i < index_.size(); ++i) {
    FLASHGPT_CHECK(index_[i].first != index_[i - 1].first, "keyword '{}' is listed twice{}",
                   keywords_[index_[i].second], mode_ == CaseMode::ignore ? " (ignoring case)" : "");
  }
}

void KeywordCounter::add_text(std::string_view text) {
  ++texts_;
  auto finish_word = [&] {
    if (scratch_.empty()) return;
    const auto it = std::lower_bound(index_.begin(), index_.end(), scratch_,
                                     [](const auto& entry, const std::string& w) { return entry.first < w; });
    if (it != index_.end() && it->first == scratch_) ++counts_[it->second];
    scratch_.clear();
  };
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    const char32_t c = utf8_decode_lenient(text, pos);
    if (!unicode_is_word_char(c)) {
      finish_word();
      continue;
    }
    if (mode_ == CaseMode::ignore) {
      utf8_append(scratch_, unicode_simple_lower(c));
    } else {
      scratch_.append(text.substr(start, pos - start));
    }
  }
  finish_word();
}

uint64_t KeywordCounter::total() const {
  uint64_t sum = 0;
  for (uint64_t c : counts_) sum += c;
  return sum;
}

std::vector<std::pair<std::string, uint64_t>> KeywordCounter::counts() const {
  std::vector<std::pair<std::string, uint64_t>> out;
  for (size_t i = 0; i < keywords_.size(); ++i) out.emplace_back(keywords_[i], counts_[i]);
  return out;
}

}  // namespace flashgpt

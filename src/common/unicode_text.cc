// UTF-8 validation and decoding, whitespace normalisation, and the Unicode classification
// the keyword analysis needs: letters and UTF-8 validity from the tokenizer's tables,
// decimal digits and lowercase mappings from scripts/gen_unicode_word_tables.py.
#include <flashgpt/unicode.h>

#include <algorithm>

namespace flashgpt {
namespace {

struct CodeRange {
  char32_t first, last;
};
struct CodeMap {
  char32_t from, to;
};

#include "unicode_word_tables.inc"

// Python's str.isspace() (what `\s` matches in a str pattern).
bool is_python_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace

std::optional<size_t> utf8_first_invalid(std::string_view text) {
  const size_t bad = unicode::utf8_find_invalid(text);
  return bad == text.size() ? std::nullopt : std::optional<size_t>(bad);
}

char32_t utf8_decode(std::string_view text, size_t& pos) {
  const auto b = static_cast<unsigned char>(text[pos]);
  if (b < 0x80) {
    ++pos;
    return b;
  }
  const size_t len = (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : 4;
  char32_t c = b & (0x7F >> len);
  for (size_t k = 1; k < len && pos + k < text.size(); ++k) c = (c << 6) | (static_cast<unsigned char>(text[pos + k]) & 0x3F);
  pos += len;
  return c;
}

void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string text_normalize_whitespace(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    const char32_t c = utf8_decode(text, pos);
    if (is_python_space(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(' ');
    pending_space = false;
    out.append(text.substr(start, pos - start));
  }
  return out;
}

bool text_is_whitespace_normalized(std::string_view text) {
  // The non-ASCII whitespace of is_python_space in UTF-8: C2 85, C2 A0, E1 9A 80,
  // E2 80 80..8A, E2 80 A8, E2 80 A9, E2 80 AF, E2 81 9F, E3 80 80.
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  if (n == 0) return true;
  if (s[0] == ' ' || s[n - 1] == ' ') return false;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      if (c == ' ') {
        if (s[i + 1] == ' ') return false;  // i + 1 < n: the last byte is not a space
      } else if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) {
        return false;
      }
      continue;
    }
    const unsigned char c1 = i + 1 < n ? s[i + 1] : 0, c2 = i + 2 < n ? s[i + 2] : 0;
    if (c == 0xC2 && (c1 == 0x85 || c1 == 0xA0)) return false;
    if (c == 0xE1 && c1 == 0x9A && c2 == 0x80) return false;
    if (c == 0xE2 && c1 == 0x80 && ((c2 >= 0x80 && c2 <= 0x8A) || c2 == 0xA8 || c2 == 0xA9 || c2 == 0xAF)) return false;
    if (c == 0xE2 && c1 == 0x81 && c2 == 0x9F) return false;
    if (c == 0xE3 && c1 == 0x80 && c2 == 0x80) return false;
  }
  return true;
}

bool unicode_is_word_char(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
  if (c > 0x10FFFF) return false;
  if (unicode::unicode_flag_table()[c] & unicode::kLetter) return true;
  const auto* it = std::upper_bound(std::begin(kDigitRanges), std::end(kDigitRanges), c,
                                    [](char32_t value, const CodeRange& r) { return value < r.first; });
  return it != std::begin(kDigitRanges) && c <= (it - 1)->last;
}

char32_t unicode_simple_lower(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  const auto* end = std::end(kLowerMap);
  const auto* it = std::lower_bound(std::begin(kLowerMap), end, c,
                                    [](const CodeMap& m, char32_t value) { return m.from < value; });
  return (it != end && it->from == c) ? it->to : c;
}

}  // namespace flashgpt

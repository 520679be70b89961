// Lookups in the generated tables of eval_unicode_tables.cc, and Python's str.lower().
#include "eval_unicode.h"

#include <flashgpt/error.h>
#include <flashgpt/eval.h>

#include <algorithm>
#include <memory>

#include "eval_text.h"

namespace flashgpt::eval_unicode {
namespace {

constexpr char32_t kCapitalSigma = 0x3A3, kSmallSigma = 0x3C3, kFinalSigma = 0x3C2;

std::unique_ptr<uint8_t[]> build_flag_table() {
  auto table = std::make_unique<uint8_t[]>(0x110000);
  for (size_t i = 0; i < kEvalUnicodeRangeCount; ++i) {
    const uint32_t end = i + 1 < kEvalUnicodeRangeCount ? kEvalUnicodeRanges[i + 1].first : 0x110000;
    std::fill(table.get() + kEvalUnicodeRanges[i].first, table.get() + end, kEvalUnicodeRanges[i].flags);
  }
  return table;
}

// Python's Final_Sigma test (unicodeobject.c, handle_capital_sigma) at text[i]: a cased
// letter before it and none after it, skipping case-ignorable characters both ways.
bool is_final_sigma(std::u32string_view text, size_t i) {
  size_t j = i;
  while (j > 0 && (eval_flags(text[j - 1]) & kCaseIgnorable)) --j;
  if (j == 0 || !(eval_flags(text[j - 1]) & kCased)) return false;
  j = i + 1;
  while (j < text.size() && (eval_flags(text[j]) & kCaseIgnorable)) ++j;
  return j == text.size() || !(eval_flags(text[j]) & kCased);
}

}  // namespace

const uint8_t* eval_flag_table() {
  static const std::unique_ptr<uint8_t[]> table = build_flag_table();
  return table.get();
}

uint8_t eval_flags_slow(char32_t c) {
  if (c >= 0x110000) return 0;
  const FlagRange* end = kEvalUnicodeRanges + kEvalUnicodeRangeCount;
  const FlagRange* next = std::upper_bound(kEvalUnicodeRanges, end, static_cast<uint32_t>(c),
                                           [](uint32_t v, const FlagRange& r) { return v < r.first; });
  return next[-1].flags;
}

void eval_lower_append(std::u32string_view text, std::u32string& out) {
  const LowerMapping* map_end = kEvalLowerMap + kEvalLowerMapCount;
  for (size_t i = 0; i < text.size(); ++i) {
    const char32_t c = text[i];
    if (c < 0x80) {
      out.push_back(c >= U'A' && c <= U'Z' ? c + 32 : c);
    } else if (c == kCapitalSigma) {
      out.push_back(is_final_sigma(text, i) ? kFinalSigma : kSmallSigma);
    } else {
      const LowerMapping* m = std::lower_bound(kEvalLowerMap, map_end, static_cast<uint32_t>(c),
                                               [](const LowerMapping& r, uint32_t v) { return r.code_point < v; });
      if (m == map_end || m->code_point != c) {
        out.push_back(c);
      } else {
        out.push_back(m->lower0);
        if (m->lower1) out.push_back(m->lower1);
      }
    }
  }
}

}  // namespace flashgpt::eval_unicode

namespace flashgpt {

std::string eval_lowercase(std::string_view text) {
  FLASHGPT_CHECK(!utf8_first_invalid(text), "eval_lowercase: text is not valid UTF-8");
  std::u32string lower;
  eval_unicode::eval_lower_append(eval_text::to_u32(text), lower);
  std::string out;
  out.reserve(text.size());
  for (const char32_t c : lower) utf8_append(out, c);
  return out;
}

}  // namespace flashgpt

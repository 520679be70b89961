// The pretokenizer: splits valid UTF-8 text into pieces exactly as tiktoken's regex for each
// encoding does, with a hand-written matcher per pattern instead of a regex engine.
//
// Every pattern is an ordered alternation, matched leftmost-first with backtracking; each
// function below takes the alternatives in the pattern's order and returns where the first
// one that matches at `i` ends. Pieces tile the text (some alternative always matches), so a
// piece ends exactly where the next one starts. The comments quote the alternative handled.
#pragma once

#include "tokenizer/unicode.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace flashgpt {

enum class PatternKind { r50k, cl100k, o200k };

struct PatternSpec {
  PatternKind kind = PatternKind::cl100k;
  // tiktoken's own patterns write contractions as '(?i:[sdmt]|...), whose Unicode case
  // folding also matches U+017F (long s) for 's'; the spelled-out 's|'S|... form does not.
  bool contraction_long_s = false;
  // tiktoken's own cl100k pattern starts the whitespace rules with \s++$: a whitespace run
  // that reaches the end of the text is one piece, even when it holds a newline.
  bool trailing_space_whole = false;
};

// The spec of a known pattern string (the meta.json spellings and tiktoken's own), or nullopt.
std::optional<PatternSpec> pattern_spec_from_string(std::string_view pat_str);
// tiktoken's own pattern for a known encoding, used when no meta.json is present.
std::optional<std::string_view> pattern_builtin(std::string_view encoding_name);

class Pretokenizer {
 public:
  Pretokenizer(const PatternSpec& spec, std::string_view text)
      : spec_(spec),
        s_(reinterpret_cast<const uint8_t*>(text.data())),
        n_(text.size()),
        table_(unicode::unicode_flag_table()) {}

  // Where the piece starting at byte `i` (< size) ends.
  size_t piece_end(size_t i) const {
    switch (spec_.kind) {
      case PatternKind::r50k: return r50k_piece_end(i);
      case PatternKind::cl100k: return cl100k_piece_end(i);
      case PatternKind::o200k: return o200k_piece_end(i);
    }
    return n_;
  }

  // Calls emit(begin, end) for every piece in order.
  template <class Emit>
  void for_each_piece(Emit&& emit) const {
    size_t i = 0;
    switch (spec_.kind) {
      case PatternKind::r50k:
        while (i < n_) { size_t e = r50k_piece_end(i); emit(i, e); i = e; }
        break;
      case PatternKind::cl100k:
        while (i < n_) { size_t e = cl100k_piece_end(i); emit(i, e); i = e; }
        break;
      case PatternKind::o200k:
        while (i < n_) { size_t e = o200k_piece_end(i); emit(i, e); i = e; }
        break;
    }
  }

 private:
  struct Char {
    uint8_t flags;
    uint8_t length;
  };
  static constexpr uint8_t kLetterNumberSpace = unicode::kLetter | unicode::kNumber | unicode::kSpace;

  [[gnu::always_inline]] Char at(size_t i) const {
    uint8_t b = s_[i];
    if (b < 0x80) return {table_[b], 1};
    uint32_t cp;
    uint8_t length;
    if (b < 0xE0) {
      cp = (b & 0x1Fu) << 6 | (s_[i + 1] & 0x3Fu), length = 2;
    } else if (b < 0xF0) {
      cp = (b & 0x0Fu) << 12 | (s_[i + 1] & 0x3Fu) << 6 | (s_[i + 2] & 0x3Fu), length = 3;
    } else {
      cp = (b & 0x07u) << 18 | (s_[i + 1] & 0x3Fu) << 12 | (s_[i + 2] & 0x3Fu) << 6 | (s_[i + 3] & 0x3Fu), length = 4;
    }
    return {table_[cp], length};
  }
  static bool is_other(Char c) { return !(c.flags & kLetterNumberSpace); }  // [^\s\p{L}\p{N}]
  bool is_newline(size_t i) const { return s_[i] == '\r' || s_[i] == '\n'; }

  // End of the run of characters having any of `mask`, from i.
  [[gnu::always_inline]] size_t run(size_t i, uint8_t mask) const {
    if (mask & unicode::kLetter) i = run_ascii_letters(i);
    while (i < n_) {
      if (s_[i] < 0x80) {
        if (!(table_[s_[i]] & mask)) break;
        ++i;
        continue;
      }
      Char c = at(i);
      if (!(c.flags & mask)) break;
      i += c.length;
    }
    return i;
  }
  // Skips ASCII letters eight at a time (SWAR): with the case bit set, a byte is a letter
  // when it is in 'a'..'z', i.e. adding 0x1F sets its high bit and adding 0x05 does not.
  // No byte carries into the next because all are below 0x80.
  [[gnu::always_inline]] size_t run_ascii_letters(size_t i) const {
    constexpr uint64_t kHigh = 0x8080808080808080ull, kCase = 0x2020202020202020ull;
    constexpr uint64_t kFromA = 0x1F1F1F1F1F1F1F1Full, kPastZ = 0x0505050505050505ull;
    while (i + 8 <= n_) {
      uint64_t w;
      std::memcpy(&w, s_ + i, 8);
      if (w & kHigh) return i;
      uint64_t x = w | kCase;
      uint64_t letters = (x + kFromA) & ~(x + kPastZ) & kHigh;
      if (letters != kHigh) return i + size_t(__builtin_ctzll(~letters & kHigh)) / 8;
      i += 8;
    }
    return i;
  }
  size_t run_other(size_t i) const {
    while (i < n_) {
      Char c = at(i);
      if (!is_other(c)) break;
      i += c.length;
    }
    return i;
  }
  size_t run_digits_max3(size_t i) const {  // \p{N}{1,3}
    for (int k = 0; k < 3 && i < n_; ++k) {
      Char c = at(i);
      if (!(c.flags & unicode::kNumber)) break;
      i += c.length;
    }
    return i;
  }
  size_t run_newlines(size_t i, bool with_slash) const {  // [\r\n]* or [\r\n/]*
    while (i < n_ && (is_newline(i) || (with_slash && s_[i] == '/'))) ++i;
    return i;
  }

  // 's|'t|'re|'ve|'m|'ll|'d at i (s_[i] is '\''), case-insensitive for cl100k and o200k;
  // 0 when none matches.
  size_t contraction_end(size_t i, bool case_insensitive) const {
    if (i + 1 >= n_) return 0;
    auto lower = [&](uint8_t b) -> uint8_t { return case_insensitive && b >= 'A' && b <= 'Z' ? b + 32 : b; };
    uint8_t c1 = lower(s_[i + 1]);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 >= n_) return 0;
    if (spec_.contraction_long_s && c1 == 0xC5 && s_[i + 2] == 0xBF) return i + 3;  // U+017F
    uint8_t c2 = lower(s_[i + 2]);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
    return 0;
  }

  // The whitespace rules at a whitespace character i:
  //   [\s++$]  \s*[\r\n]+ (when `newline_rule`)  |\s+(?!\S)  |\s+
  // \s*[\r\n]+ backtracks to the last newline of the run; \s+(?!\S) leaves the run's last
  // character for the next piece when a non-space follows.
  size_t whitespace_end(size_t i, bool newline_rule) const {
    size_t j = i, last_start = i, last_newline = SIZE_MAX;
    while (j < n_) {
      Char c = at(j);
      if (!(c.flags & unicode::kSpace)) break;
      if (is_newline(j)) last_newline = j;
      last_start = j;
      j += c.length;
    }
    if (spec_.trailing_space_whole && j == n_) return j;
    if (newline_rule && last_newline != SIZE_MAX) return last_newline + 1;
    if (j == n_) return j;
    return last_start > i ? last_start : j;
  }

  // r50k: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  size_t r50k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    if (b == '\'') {
      if (size_t e = contraction_end(i, /*case_insensitive=*/false)) return e;
    }
    if (b == ' ' && i + 1 < n_) {
      Char next = at(i + 1);
      if (next.flags & unicode::kLetter) return run(i + 1, unicode::kLetter);
      if (next.flags & unicode::kNumber) return run(i + 1, unicode::kNumber);
      if (is_other(next)) return run_other(i + 1);
    }
    Char c = at(i);
    if (c.flags & unicode::kLetter) return run(i, unicode::kLetter);
    if (c.flags & unicode::kNumber) return run(i, unicode::kNumber);
    if (is_other(c)) return run_other(i);
    return whitespace_end(i, /*newline_rule=*/false);
  }

  // cl100k: '(?i:s|t|re|ve|m|ll|d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
  //         |\s*[\r\n]+|\s+(?!\S)|\s+
  size_t cl100k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    if (b == '\'') {
      if (size_t e = contraction_end(i, /*case_insensitive=*/true)) return e;
    }
    Char c = at(i);
    if (!(c.flags & (unicode::kLetter | unicode::kNumber)) && !is_newline(i)) {
      size_t k = i + c.length;
      if (k < n_ && (at(k).flags & unicode::kLetter)) return run(k, unicode::kLetter);
    }
    if (c.flags & unicode::kLetter) return run(i, unicode::kLetter);
    if (c.flags & unicode::kNumber) return run_digits_max3(i);
    if (b == ' ' && i + 1 < n_ && is_other(at(i + 1))) return run_newlines(run_other(i + 1), false);
    if (is_other(c)) return run_newlines(run_other(i), false);
    return whitespace_end(i, /*newline_rule=*/true);
  }

  // o200k's first alternative from p: [Upper]*[Lower]+ where the classes overlap (Lm, Lo, M),
  // so when no lower character follows the upper run, [Upper]* gives back its last
  // character that is also lower. 0 when it does not match.
  size_t o200k_upper_then_lower(size_t p) const {
    size_t j = p, after_last_lower = 0;
    while (j < n_) {
      Char c = at(j);
      if (!(c.flags & unicode::kUpper)) break;
      j += c.length;
      if (c.flags & unicode::kLower) after_last_lower = j;
    }
    size_t e = run(j, unicode::kLower);
    return e > j ? e : after_last_lower;
  }
  // o200k's second alternative from p: [Upper]+[Lower]*; 0 when it does not match.
  size_t o200k_upper_run(size_t p) const {
    size_t j = run(p, unicode::kUpper);
    return j == p ? 0 : run(j, unicode::kLower);
  }
  size_t o200k_with_contraction(size_t e) const {
    if (e < n_ && s_[e] == '\'') {
      if (size_t c = contraction_end(e, /*case_insensitive=*/true)) return c;
    }
    return e;
  }

  // o200k: [^\r\n\p{L}\p{N}]?[Upper]*[Lower]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //       |[^\r\n\p{L}\p{N}]?[Upper]+[Lower]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //       |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
  // with Upper = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and Lower = [\p{Ll}\p{Lm}\p{Lo}\p{M}].
  size_t o200k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    Char c = at(i);
    size_t k = i + c.length;
    bool prefix = !(c.flags & (unicode::kLetter | unicode::kNumber)) && !is_newline(i) && k < n_;
    if (prefix) {
      if (size_t e = o200k_upper_then_lower(k)) return o200k_with_contraction(e);
    }
    if (c.flags & (unicode::kUpper | unicode::kLower)) {
      if (size_t e = o200k_upper_then_lower(i)) return o200k_with_contraction(e);
    }
    if (prefix) {
      if (size_t e = o200k_upper_run(k)) return o200k_with_contraction(e);
    }
    if (c.flags & unicode::kUpper) {
      if (size_t e = o200k_upper_run(i)) return o200k_with_contraction(e);
    }
    if (c.flags & unicode::kNumber) return run_digits_max3(i);
    if (b == ' ' && i + 1 < n_ && is_other(at(i + 1))) return run_newlines(run_other(i + 1), true);
    if (is_other(c)) return run_newlines(run_other(i), true);
    return whitespace_end(i, /*newline_rule=*/true);
  }

  PatternSpec spec_;
  const uint8_t* s_;
  size_t n_;
  const uint8_t* table_;
};

}  // namespace flashgpt

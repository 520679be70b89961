// UTF-8 <-> code points and Python's str.split() for the metrics (private to eval).
#pragma once

#include <flashgpt/unicode.h>

#include <span>
#include <string>
#include <string_view>

#include "eval_unicode.h"

namespace flashgpt::eval_text {

// `text` must be valid UTF-8 (the public entry points check it).
inline std::u32string to_u32(std::string_view text) {
  std::u32string out;
  out.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) out.push_back(utf8_decode(text, pos));
  return out;
}

// Python's ' '.join(text.split()) in UTF-8: runs of str.isspace() characters become one
// space, none at either end.
inline std::string join_split_utf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size() + text.size() / 4);
  bool pending_space = false;
  for (const char32_t c : text) {
    if (eval_unicode::eval_is_space(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(' ');
    pending_space = false;
    utf8_append(out, c);
  }
  return out;
}

// Throws, naming the side and the segment, when a segment is not valid UTF-8.
void check_segments(std::span<const std::string> hyps, std::span<const std::string> refs);

}  // namespace flashgpt::eval_text

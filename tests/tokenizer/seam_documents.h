// Random documents for the parallel-versus-serial tests: prose built from the things that
// decide where the three encodings' pieces end (blank lines, CRLF, runs of spaces and tabs,
// digits, ASCII and accented letters, punctuation, contractions, a long line), so that
// chunks cut anywhere meet every kind of seam.
#pragma once

#include <random>
#include <string>

namespace flashgpt::testing {

inline std::string seam_document(std::mt19937_64& rng, size_t max_bytes) {
  static const char* const kParts[] = {
      "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", " ", "  ", "   ", "\t", "\t\t", " \t ", " \n", "  \n\n",
      "\t\r\n", "0", "7", "42", "123", "2014", "1234567", "a", "x", "the", "Word", "HTTP", "camelCase", "\xC3\xA9t\xC3\xA9",
      "\xC3\x87" "a", "na\xC3\xAFve", "\xC5\x93uvre", "\xC3\x89" "COLE", "d\xC3\xA9j\xC3\xA0", "\xC3\xA0", ".", ",", "!",
      "?", "...", "--", "(", ")", "\"", "'", "'s", "'ll", "'RE", "\xE2\x80\x99", "\xC2\xAB", "\xC2\xBB", "/", "//",
      "\xC2\xA0", "\xE2\x80\x83", "\xE4\xB8\xAD", "\xF0\x9F\x99\x82"};
  constexpr size_t kCount = sizeof(kParts) / sizeof(kParts[0]);
  std::string text;
  size_t target = rng() % (max_bytes + 1);
  while (text.size() < target) {
    if (rng() % 40 == 0) {  // a long line: words and spaces, then a line break
      size_t words = 20 + rng() % 60;
      for (size_t w = 0; w < words; ++w) {
        if (w) text += ' ';
        text += kParts[21 + rng() % 14];  // a word or "."
      }
      text += rng() % 2 ? "\n\n" : "\n";
      continue;
    }
    text += kParts[rng() % kCount];
  }
  return text;
}

}  // namespace flashgpt::testing

// UTF-8 validation, decoding and replacement, the Unicode class tables, whitespace
// normalisation, word characters and lowercase mapping (src/common/unicode*.cc).
#include <flashgpt/unicode.h>

#include <algorithm>
#include <random>
#include <string>

#include <gtest/gtest.h>

namespace flashgpt {
namespace {

TEST(Utf8, FirstInvalidIsNulloptOrTheOffset) {
  EXPECT_EQ(utf8_first_invalid("plain ascii"), std::nullopt);
  EXPECT_EQ(utf8_first_invalid("l'été à Noël 😀"), std::nullopt);
  EXPECT_EQ(utf8_first_invalid("ab\xFFz"), 2u);                 // never valid
  EXPECT_EQ(utf8_first_invalid("ab\xC3"), 2u);                  // truncated sequence
  EXPECT_EQ(utf8_first_invalid("\xC0\xAF"), 0u);                // overlong '/'
  EXPECT_EQ(utf8_first_invalid("x\xED\xA0\x80"), 1u);           // surrogate U+D800
  EXPECT_EQ(utf8_first_invalid("\xF4\x90\x80\x80"), 0u);        // above U+10FFFF
  EXPECT_EQ(utf8_first_invalid("é\xE2\x82"), 2u);               // truncated euro sign
}

TEST(Utf8, EncodesAndDecodesEveryLength) {
  for (char32_t c : {U'a', U'é', U'€', U'😀', U'\U0010FFFF'}) {
    std::string s;
    utf8_append(s, c);
    EXPECT_EQ(utf8_first_invalid(s), std::nullopt);
    size_t pos = 0;
    EXPECT_EQ(utf8_decode(s, pos), c);
    EXPECT_EQ(pos, s.size());
  }
}

TEST(Text, NormalizesWhitespaceLikePythonSplit) {
  EXPECT_EQ(text_normalize_whitespace("  a \t b\u00A0\u00A0c\u202F d  "), "a b c d");
  EXPECT_EQ(text_normalize_whitespace("\u3000"), "");
  EXPECT_EQ(text_normalize_whitespace("no-change"), "no-change");
}

// The allocation-free check agrees with the reference normaliser on random mixes of
// letters, ASCII spaces and every kind of Unicode whitespace (and near misses).
TEST(Text, WhitespaceNormalizedCheckAgreesWithTheNormalizer) {
  const std::vector<std::string> pieces = {"a", "é", " ", "  ", "\t", "\u00A0", "\u0085", "\u1680", "\u2000",
                                           "\u200A", "\u200B", "\u2028", "\u202F", "\u205F", "\u3000", "\u3001",
                                           "’", "\u2030", "\x1C", "\u00A1"};
  uint64_t state = 12345;
  for (int trial = 0; trial < 20000; ++trial) {
    std::string text;
    const int length = trial % 7;
    for (int k = 0; k < length; ++k) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      text += pieces[(state >> 33) % pieces.size()];
    }
    ASSERT_EQ(text_is_whitespace_normalized(text), text_normalize_whitespace(text) == text) << "'" << text << "'";
  }
}

TEST(Unicode, ClassifiesWordCharacters) {
  for (char32_t c : {U'a', U'Z', U'0', U'9', U'é', U'À', U'œ', U'ß', U'Ω', U'я', U'中', U'٣' /* Arabic-Indic 3 */}) {
    EXPECT_TRUE(unicode_is_word_char(c)) << static_cast<uint32_t>(c);
  }
  for (char32_t c : {U' ', U'\'', U'’', U'-', U'_', U',', U'.', U'«', U'\u00A0', U'²' /* No, not Nd */, U'😀'}) {
    EXPECT_FALSE(unicode_is_word_char(c)) << static_cast<uint32_t>(c);
  }
}

TEST(Unicode, LowercasesFrenchCapitalsAndMore) {
  EXPECT_EQ(unicode_simple_lower(U'É'), U'é');
  EXPECT_EQ(unicode_simple_lower(U'À'), U'à');
  EXPECT_EQ(unicode_simple_lower(U'Ç'), U'ç');
  EXPECT_EQ(unicode_simple_lower(U'Œ'), U'œ');
  EXPECT_EQ(unicode_simple_lower(U'Ÿ'), U'ÿ');
  EXPECT_EQ(unicode_simple_lower(U'Σ'), U'σ');
  EXPECT_EQ(unicode_simple_lower(U'Ж'), U'ж');
  EXPECT_EQ(unicode_simple_lower(U'é'), U'é');
  EXPECT_EQ(unicode_simple_lower(U'İ'), U'İ');  // lowercase is two code points: left as is
  EXPECT_EQ(unicode_simple_lower(U'1'), U'1');
}

TEST(Utf8, FindsTheFirstInvalidByte) {
  EXPECT_EQ(unicode::utf8_find_invalid("plain ascii text, long enough for the fast path"), 47u);
  EXPECT_EQ(unicode::utf8_find_invalid("h\xC3\xA9llo \xF0\x9F\x99\x82"), 11u);  // valid: size
  EXPECT_EQ(unicode::utf8_find_invalid("abc\x80"), 3u);
  EXPECT_EQ(unicode::utf8_find_invalid("ab\xED\xA0\x80"), 2u);   // surrogate
  EXPECT_EQ(unicode::utf8_find_invalid("\xC0\xAF"), 0u);         // overlong
  EXPECT_EQ(unicode::utf8_find_invalid("x\xF0\x9F\x99"), 1u);    // truncated at the end
  EXPECT_EQ(unicode::utf8_find_invalid("x\xF4\x90\x80\x80"), 1u);  // above U+10FFFF
}

// Where the first invalid sequence of text begins (its size if none), one
// utf8_sequence_length call a character: the reference of utf8_find_invalid's fast paths.
size_t utf8_find_invalid_reference(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    bool truncated;
    size_t length = unicode::utf8_sequence_length(text, pos, &truncated);
    if (length == 0) return pos;
    pos += length;
  }
  return text.size();
}

// The fast paths of utf8_find_invalid (16 and 8 ASCII bytes at a time, inline two- and
// three-byte sequences) against a loop over utf8_sequence_length alone: random strings of
// valid and invalid fragments, with the fragments at every offset from a 16-byte boundary.
TEST(Utf8, FindInvalidMatchesTheCharacterLoop) {
  const std::string fragments[] = {"a", "0123456789abcdef", " ", "\xC3\xA9", "\xD0\x96", "\xE0\xA4\xB9", "\xE4\xB8\x96",
                                   "\xED\x9F\xBF", "\xEF\xBF\xBD", "\xF0\x9F\x99\x82", "\xF4\x8F\xBF\xBF",
                                   // invalid: stray continuation, overlong, surrogate, above U+10FFFF, bad lead
                                   "\x80", "\xC1\xBF", "\xE0\x9F\xBF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xF5",
                                   "\xFF", "\xC3", "\xE4\xB8", "\xF0\x9F\x99", "\xC3\x41", "\xE4\x41\x96"};
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200000; ++trial) {
    std::string text(rng() % 24, 'x');
    size_t count = rng() % 6;
    for (size_t k = 0; k < count; ++k) {
      // mostly valid fragments, so that most texts reach their end or fail late
      size_t pick = rng() % 8 == 0 ? rng() % std::size(fragments) : rng() % 11;
      text += fragments[pick];
      if (rng() % 2) text += std::string(rng() % 20, 'y');
    }
    ASSERT_EQ(unicode::utf8_find_invalid(text), utf8_find_invalid_reference(text)) << "trial " << trial;
  }
}

// The same on longer texts of ASCII and two-byte sequences (the 64-byte blocks), with now
// and then an invalid or a longer sequence, a lead at a block's last byte, or a text that
// ends inside a sequence.
TEST(Utf8, FindInvalidMatchesTheCharacterLoopInTwoByteText) {
  const std::string valid[] = {"a", " ", "\xC3\xA9", "\xD0\x96", "\xC2\x80", "\xDF\xBF"};
  const std::string rare[] = {"\xE4\xB8\x96", "\xF0\x9F\x99\x82", "\x80", "\xBF", "\xC0\x80", "\xC1\xBF",
                              "\xC3", "\xC3\x41", "\xC3\xC3\xA9", "\xE0\x80\x80", "\xF8"};
  std::mt19937 rng(4);
  for (int trial = 0; trial < 100000; ++trial) {
    size_t length = rng() % 300;
    std::string text;
    while (text.size() < length) text += rng() % 64 == 0 ? rare[rng() % std::size(rare)] : valid[rng() % std::size(valid)];
    if (rng() % 8 == 0 && !text.empty()) text.pop_back();  // may end inside a sequence
    ASSERT_EQ(unicode::utf8_find_invalid(text), utf8_find_invalid_reference(text)) << "trial " << trial;
  }
}

TEST(Utf8, ReplacesMaximalSubparts) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(unicode::utf8_replace_invalid("a\x80z"), "a" + r + "z");
  EXPECT_EQ(unicode::utf8_replace_invalid("a\xE2\x82z"), "a" + r + "z");           // one per truncated sequence
  EXPECT_EQ(unicode::utf8_replace_invalid("\xED\xA0\x80"), r + r + r);              // surrogates: one per byte
  EXPECT_EQ(unicode::utf8_replace_invalid("\xF0\x9F\x98"), r);
  EXPECT_EQ(unicode::utf8_replace_invalid("\xC0\xAF"), r + r);
}

TEST(UnicodeTables, FlatTableMatchesRanges) {
  const uint8_t* table = unicode::unicode_flag_table();
  for (uint32_t cp = 0; cp < 0x110000; ++cp) ASSERT_EQ(table[cp], unicode::unicode_flags_slow(cp)) << cp;
  EXPECT_EQ(table['a'], unicode::kLetter | unicode::kLower);
  EXPECT_EQ(table['A'], unicode::kLetter | unicode::kUpper);
  EXPECT_EQ(table['7'], unicode::kNumber);
  EXPECT_EQ(table[' '], unicode::kSpace);
  EXPECT_EQ(table[0x1C], 0) << "U+001C is not White_Space (Rust's \\s), unlike Python's str.isspace";
  EXPECT_EQ(table[0x0301], unicode::kMark | unicode::kUpper | unicode::kLower);
  EXPECT_EQ(table[0x3000], unicode::kSpace);
}

}  // namespace
}  // namespace flashgpt

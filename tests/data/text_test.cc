#include <flashgpt/data.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

namespace flashgpt {
namespace {

TEST(Utf8, FindsTheFirstInvalidByte) {
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

uint64_t count_of(const KeywordCounter& counter, const std::string& word) {
  for (const auto& [k, n] : counter.counts()) {
    if (k == word) return n;
  }
  ADD_FAILURE() << "no keyword " << word;
  return 0;
}

TEST(KeywordCounter, CountsWholeWordsOnly) {
  KeywordCounter counter({"de", "la", "été", "l", "à"}, CaseMode::sensitive);
  counter.add_text("de, de de. Demande de la délégation");  // "Demande", "délégation" are not keywords
  counter.add_text("l'été à la plage; laisse-la");
  counter.add_text("LA De À");  // case-sensitive: nothing
  EXPECT_EQ(counter.texts(), 3u);
  EXPECT_EQ(count_of(counter, "de"), 4u);
  EXPECT_EQ(count_of(counter, "la"), 3u);
  EXPECT_EQ(count_of(counter, "été"), 1u);
  EXPECT_EQ(count_of(counter, "l"), 1u);
  EXPECT_EQ(count_of(counter, "à"), 1u);
  EXPECT_EQ(counter.total(), 10u);
}

TEST(KeywordCounter, DigitsAndLettersJoinIntoOneWord) {
  KeywordCounter counter({"de", "2014"}, CaseMode::sensitive);
  counter.add_text("de2014 2014 de_2014 de’s");  // "_" and "’" separate, digits join letters
  EXPECT_EQ(count_of(counter, "de"), 2u);
  EXPECT_EQ(count_of(counter, "2014"), 2u);
}

TEST(KeywordCounter, IgnoreCaseFoldsAccentedCapitals) {
  KeywordCounter counter({"à", "été", "de"}, CaseMode::ignore);
  counter.add_text("À Paris, l'ÉTÉ De DE dé");
  EXPECT_EQ(count_of(counter, "à"), 1u);
  EXPECT_EQ(count_of(counter, "été"), 1u);
  EXPECT_EQ(count_of(counter, "de"), 2u);
}

TEST(KeywordCounter, SurvivesInvalidUtf8AndRejectsBadKeywords) {
  KeywordCounter counter({"de"}, CaseMode::sensitive);
  counter.add_text("de\xFF" "de \xC3");
  EXPECT_EQ(count_of(counter, "de"), 2u);
  EXPECT_THROW(KeywordCounter({"l'été"}, CaseMode::sensitive), Error);
  EXPECT_THROW(KeywordCounter({"De", "de"}, CaseMode::ignore), Error);
  EXPECT_THROW(KeywordCounter({}, CaseMode::sensitive), Error);
}

TEST(KeywordCounter, DefaultListIsTheSeedsNineteenWords) {
  std::vector<std::string> words(kDefaultFrenchKeywords.begin(), kDefaultFrenchKeywords.end());
  KeywordCounter counter(words, CaseMode::sensitive);
  counter.add_text("Bonjour, oui, merci : à la fin, le chat et les chiens de la maison ne sont pas là.");
  EXPECT_EQ(counter.counts().size(), 19u);
  EXPECT_EQ(count_of(counter, "bonjour"), 0u);  // case-sensitive
  EXPECT_EQ(count_of(counter, "la"), 2u);
  EXPECT_EQ(counter.total(), 10u);  // oui merci à la le et les de la pas
}

}  // namespace
}  // namespace flashgpt

// KeywordCounter: whole-word counts, case folding, invalid UTF-8 and bad keywords.
#include <flashgpt/data_analyze.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

namespace flashgpt {
namespace {

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

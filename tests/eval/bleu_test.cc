// The pieces of corpus BLEU and chrF: the tokenizers on tricky strings (expected strings
// are sacreBLEU 2.6.0's output for the same input), the Unicode tables, n-gram counting
// against a plain map-based reference on random inputs, and the scoring edge cases.
// The whole against the real sacreBLEU: sacrebleu_compare_test.py.
#include <flashgpt/error.h>
#include <flashgpt/eval.h>
#include <flashgpt/unicode.h>

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "eval/eval_unicode.h"

namespace flashgpt {
namespace {

using namespace eval_unicode;

TEST(EvalUnicode, FlatTableAgreesWithTheRanges) {
  const uint8_t* table = eval_flag_table();
  for (uint32_t c = 0; c < 0x110000; ++c) ASSERT_EQ(table[c], eval_flags_slow(c)) << std::hex << c;
  for (char32_t c = 0; c < 0x80; ++c) ASSERT_EQ(eval_is_space(c), (eval_flags_slow(c) & kSpace) != 0) << static_cast<uint32_t>(c);
}

TEST(EvalUnicode, KnowsTheClassesTheTokenizersUse) {
  EXPECT_TRUE(eval_flags(U'.') & kPunct);
  EXPECT_TRUE(eval_flags(U'«') & kPunct);
  EXPECT_TRUE(eval_flags(U'。') & kPunct);
  EXPECT_TRUE(eval_flags(U'$') & kSymbol);  // Sc, not punctuation
  EXPECT_TRUE(eval_flags(U'+') & kSymbol);
  EXPECT_TRUE(eval_flags(U'€') & kSymbol);
  EXPECT_TRUE(eval_flags(U'😀') & kSymbol);
  EXPECT_FALSE(eval_flags(U'a') & (kPunct | kSymbol | kNumber));
  EXPECT_TRUE(eval_flags(U'7') & kNumber);
  EXPECT_TRUE(eval_flags(U'٣') & kNumber);  // Arabic-Indic digit
  EXPECT_TRUE(eval_flags(U'½') & kNumber);  // No
  EXPECT_TRUE(eval_flags(U'Ⅻ') & kNumber);  // Nl
  for (char32_t c : {U' ', U'\t', U'\x1c', U'\x1f', U'\u0085', U'\u00a0', U'\u2028', U'\u3000', U'\u2009'}) {
    EXPECT_TRUE(eval_is_space(c)) << std::hex << static_cast<uint32_t>(c);
  }
  for (char32_t c : {U'a', U'\u200b', U'\ufeff', U'\x1b'}) EXPECT_FALSE(eval_is_space(c));
}

TEST(EvalUnicode, LowercasesLikePythonStrLower) {
  EXPECT_EQ(eval_lowercase("ÉCOLE Ça ÀÖ"), "école ça àö");
  EXPECT_EQ(eval_lowercase("İstanbul"), "i\u0307stanbul");  // two code points
  EXPECT_EQ(eval_lowercase("ǅ ǈ"), "ǆ ǉ");                   // titlecase digraphs
  // Final sigma: after a cased letter and not before one, skipping case-ignorables.
  EXPECT_EQ(eval_lowercase("ΟΔΥΣΣΕΥΣ"), "οδυσσευς");
  EXPECT_EQ(eval_lowercase("Σ"), "σ");
  EXPECT_EQ(eval_lowercase("ΑΣ."), "ας.");
  EXPECT_EQ(eval_lowercase("Α'Σ"), "α'ς");
  EXPECT_EQ(eval_lowercase("ΑΣ'Α"), "ασ'α");
  EXPECT_EQ(eval_lowercase(".Σ"), ".σ");
  EXPECT_EQ(eval_lowercase("ПРИВЕТ"), "привет");
}

struct TokenizerCase {
  const char* input;
  const char* v13a;
  const char* intl;
};

// sacreBLEU 2.6.0's Tokenizer13a and TokenizerV14International on each input.
const TokenizerCase kTokenizerCases[] = {
    {"Hello, world.", "Hello , world .", "Hello , world ."},
    {"It costs $1,000.50 (approx.)", "It costs $ 1,000.50 ( approx . )", "It costs $ 1,000.50 ( approx . )"},
    {"a..b", "a . . b", "a . . b"},
    {"3.14, 2014.", "3.14 , 2014 .", "3.14 , 2014."},
    {"10-12 years -5", "10 - 12 years -5", "10-12 years - 5"},
    {"don't", "don't", "don ' t"},
    {"&amp;quot; &lt;b&gt; <skipped>x", "& quot ; < b > x", "& amp ; quot ; & lt ; b & gt ; < skipped > x"},
    {"«Bonjour», dit-il…", "«Bonjour» , dit-il…", "« Bonjour » , dit - il …"},
    {"1,2.3", "1,2.3", "1,2.3"},
    {"x.,y", "x . , y", "x . , y"},
    {"A-\nB", "AB", "A - B"},
    {"\u00a0x\u3000y\u2028", "x y", "x y"},
    {"€5 ½ ٣.٤", "€5 ½ ٣ . ٤", "€ 5 ½ ٣.٤"},
    {"Q3; 2-3%", "Q3 ; 2 - 3 %", "Q3 ; 2-3%"},
    {"e.g. U.S.A.", "e . g . U . S . A .", "e . g . U . S . A ."},
    {"我们。「好」", "我们。「好」", "我们 。 「 好 」"},
    {"", "", ""},
    {"   ", "", ""},
};

TEST(EvalBleuTokenize, MatchesSacrebleuOnTrickyStrings) {
  for (const auto& c : kTokenizerCases) {
    EXPECT_EQ(bleu_tokenize_13a(c.input), c.v13a) << c.input;
    EXPECT_EQ(bleu_tokenize_intl(c.input), c.intl) << c.input;
  }
}

TEST(EvalBleuTokenize, PreprocessLowercasesAndStripsTheEnd) {
  EXPECT_EQ(bleu_preprocess("The END.  \t", {BleuTokenize::v13a, /*lowercase=*/true}), "the end .");
  // rstrip removes the newline before 13a could join "-\n"; a dash after a letter stays.
  EXPECT_EQ(bleu_preprocess("The END-\n", {BleuTokenize::v13a, /*lowercase=*/false}), "The END-");
  EXPECT_EQ(bleu_tokenize_from_name("intl"), BleuTokenize::intl);
  EXPECT_THROW(bleu_tokenize_from_name("zh"), Error);
}

// The reference: sacreBLEU's extract_all_word_ngrams + Counter, in plain maps.
BleuStats reference_bleu_stats(const std::vector<std::string>& hyp, const std::vector<std::string>& ref) {
  const auto count = [](const std::vector<std::string>& t) {
    std::map<std::vector<std::string>, uint64_t> grams;
    for (size_t n = 1; n <= kBleuMaxOrder; ++n) {
      for (size_t i = 0; i + n <= t.size(); ++i) ++grams[std::vector<std::string>(t.begin() + i, t.begin() + i + n)];
    }
    return grams;
  };
  const auto h = count(hyp), r = count(ref);
  BleuStats s;
  s.hyp_len = hyp.size();
  s.ref_len = ref.size();
  for (const auto& [gram, n] : h) {
    s.total[gram.size() - 1] += n;
    if (auto it = r.find(gram); it != r.end()) s.correct[gram.size() - 1] += std::min(n, it->second);
  }
  return s;
}

std::string join(const std::vector<std::string>& tokens) {
  std::string out;
  for (const auto& t : tokens) out += (out.empty() ? "" : " ") + t;
  return out;
}

TEST(EvalBleuStats, CountsLikeTheReferenceOnRandomTokens) {
  std::mt19937 rng(17);
  const std::vector<std::string> vocab = {"a", "b", "c", "le", "été", ",", ".", "1,000", "😀"};
  for (int trial = 0; trial < 2000; ++trial) {
    const size_t vocab_size = 1 + rng() % vocab.size();
    const auto sample = [&](size_t length) {
      std::vector<std::string> t;
      for (size_t i = 0; i < length; ++i) t.push_back(vocab[rng() % vocab_size]);
      return t;
    };
    const auto hyp = sample(rng() % 20), ref = sample(rng() % 20);
    const BleuStats got = bleu_stats_tokenized(join(hyp), join(ref));
    const BleuStats want = reference_bleu_stats(hyp, ref);
    ASSERT_EQ(got.hyp_len, want.hyp_len);
    ASSERT_EQ(got.ref_len, want.ref_len);
    ASSERT_EQ(got.correct, want.correct) << join(hyp) << " | " << join(ref);
    ASSERT_EQ(got.total, want.total) << join(hyp) << " | " << join(ref);
  }
}

TEST(EvalBleuStats, ClipsRepeatedNgramsByTheReference) {
  const BleuStats s = bleu_stats_tokenized("the the the the", "the cat");
  EXPECT_EQ(s.correct, (std::array<uint64_t, 4>{1, 0, 0, 0}));
  EXPECT_EQ(s.total, (std::array<uint64_t, 4>{4, 3, 2, 1}));
  EXPECT_EQ(s.hyp_len, 4u);
  EXPECT_EQ(s.ref_len, 2u);
}

TEST(EvalBleuScore, PerfectMatchIs100) {
  const std::vector<std::string> refs = {"The cat sat on the mat.", "Il fait beau aujourd'hui."};
  const BleuScore s = corpus_bleu(refs, refs);
  EXPECT_DOUBLE_EQ(s.score, 100.0);
  EXPECT_DOUBLE_EQ(s.bp, 1.0);
  EXPECT_EQ(s.line(), "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0 = 100.00 "
                      "100.0/100.0/100.0/100.0 (BP = 1.000 ratio = 1.000 hyp_len = 12 ref_len = 12)");
}

TEST(EvalBleuScore, NoMatchAtAllIsZeroWithTheBrevityPenaltyStillReported) {
  BleuStats st;
  st.hyp_len = 5;
  st.ref_len = 10;
  st.total = {5, 4, 3, 2};
  const BleuScore s = bleu_score_from_stats(st, {});
  EXPECT_EQ(s.score, 0.0);
  EXPECT_EQ(s.precisions, (std::array<double, 4>{0, 0, 0, 0}));
  EXPECT_DOUBLE_EQ(s.bp, std::exp(1.0 - 10.0 / 5.0));
  EXPECT_DOUBLE_EQ(s.ratio, 0.5);
}

TEST(EvalBleuScore, ExpSmoothingHalvesEachFurtherZeroOrder) {
  BleuStats st;
  st.hyp_len = 12;
  st.ref_len = 10;
  st.correct = {5, 0, 2, 0};
  st.total = {10, 8, 6, 4};
  const BleuScore s = bleu_score_from_stats(st, {});
  // order 2: first zero, 1/(2*8); order 3 matches; order 4: second zero, 1/(4*4).
  const double p[4] = {50.0, 100.0 / 16.0, 100.0 * 2 / 6, 100.0 / 16.0};
  for (int n = 0; n < 4; ++n) EXPECT_DOUBLE_EQ(s.precisions[n], p[n]) << n;
  EXPECT_DOUBLE_EQ(s.bp, 1.0);
  EXPECT_NEAR(s.score, std::exp((std::log(p[0]) + std::log(p[1]) + std::log(p[2]) + std::log(p[3])) / 4), 1e-12);
}

TEST(EvalBleuScore, AnOrderWithNoNgramsMakesTheScoreZero) {
  // Three-word hypotheses: no 4-grams; sacreBLEU's log(0) floor makes the score 0.
  const std::vector<std::string> hyps = {"the cat sat", "a dog"}, refs = {"the cat sat down", "a dog ran"};
  const BleuScore s = corpus_bleu(hyps, refs);
  EXPECT_EQ(s.stats.total[3], 0u);
  EXPECT_EQ(s.precisions[3], 0.0);
  EXPECT_EQ(s.score, 0.0);
  EXPECT_GT(s.precisions[0], 99.0);
}

TEST(EvalBleuScore, EmptyHypothesisLinesCountAsNothingButLengthenTheReference) {
  const std::vector<std::string> refs = {"one two three four five", "six seven eight nine"};
  const std::vector<std::string> hyps = {"one two three four five", ""};
  const BleuScore s = corpus_bleu(hyps, refs);
  EXPECT_EQ(s.stats.hyp_len, 5u);
  EXPECT_EQ(s.stats.ref_len, 9u);
  EXPECT_EQ(s.stats.correct, (std::array<uint64_t, 4>{5, 4, 3, 2}));
  EXPECT_DOUBLE_EQ(s.bp, std::exp(1.0 - 9.0 / 5.0));
  EXPECT_NEAR(s.score, 100.0 * std::exp(1.0 - 9.0 / 5.0), 1e-9);
  const BleuScore empty = corpus_bleu(std::vector<std::string>{"", ""}, refs);
  EXPECT_EQ(empty.score, 0.0);
  EXPECT_EQ(empty.bp, 0.0);
}

TEST(EvalBleuScore, RejectsMismatchedAndInvalidInput) {
  const std::vector<std::string> one = {"a"}, two = {"a", "b"}, bad = {"a\xff"};
  EXPECT_THROW(corpus_bleu(one, two), Error);
  EXPECT_THROW(corpus_chrf(two, one), Error);
  EXPECT_THROW(corpus_bleu(bad, one), Error);
  EXPECT_THROW(corpus_chrf(one, bad), Error);
}

TEST(EvalBleuScore, SignaturesAreSacrebleus) {
  EXPECT_EQ(bleu_signature({BleuTokenize::intl, /*lowercase=*/true}),
            "nrefs:1|case:lc|eff:no|tok:intl|smooth:exp|version:2.6.0");
  EXPECT_EQ(chrf_signature({}), "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0");
}

// The reference: sacreBLEU's extract_all_char_ngrams + _get_match_statistics, in maps.
ChrfStats reference_chrf_stats(const std::u32string& hyp, const std::u32string& ref) {
  ChrfStats s;
  for (size_t n = 1; n <= kChrfCharOrder; ++n) {
    std::map<std::u32string, uint64_t> h, r;
    for (size_t i = 0; i + n <= hyp.size(); ++i) ++h[hyp.substr(i, n)];
    for (size_t i = 0; i + n <= ref.size(); ++i) ++r[ref.substr(i, n)];
    uint64_t hyp_count = 0, ref_count = 0, match = 0;
    for (const auto& [g, c] : h) {
      hyp_count += c;
      if (auto it = r.find(g); it != r.end()) match += std::min(c, it->second);
    }
    for (const auto& [g, c] : r) ref_count += c;
    s.hyp[n - 1] = r.empty() ? 0 : hyp_count;
    s.ref[n - 1] = ref_count;
    s.match[n - 1] = match;
  }
  return s;
}

TEST(EvalChrf, CountsLikeTheReferenceOnRandomText) {
  std::mt19937 rng(29);
  const std::u32string alphabet = U"abé😀 \u00a0";
  for (int trial = 0; trial < 2000; ++trial) {
    const size_t k = 1 + rng() % alphabet.size();
    const auto sample = [&](size_t length) {
      std::u32string t;
      for (size_t i = 0; i < length; ++i) t.push_back(alphabet[rng() % k]);
      return t;
    };
    const std::u32string hyp = sample(rng() % 16), ref = sample(rng() % 16);
    std::string hyp8, ref8;
    for (char32_t c : hyp) utf8_append(hyp8, c);
    for (char32_t c : ref) utf8_append(ref8, c);
    const auto strip = [](std::u32string t) {
      std::erase_if(t, [](char32_t c) { return c == U' ' || c == U'\u00a0'; });
      return t;
    };
    const ChrfStats got = chrf_segment_stats(hyp8, ref8, {});
    const ChrfStats want = reference_chrf_stats(strip(hyp), strip(ref));
    ASSERT_EQ(got.hyp, want.hyp) << hyp8 << " | " << ref8;
    ASSERT_EQ(got.ref, want.ref) << hyp8 << " | " << ref8;
    ASSERT_EQ(got.match, want.match) << hyp8 << " | " << ref8;
  }
}

TEST(EvalChrf, ScoresTheEdgeCases) {
  const std::vector<std::string> refs = {"Le chat est là.", "Il pleut."};
  EXPECT_DOUBLE_EQ(corpus_chrf(refs, refs).score, 100.0);
  EXPECT_EQ(corpus_chrf(std::vector<std::string>{"", ""}, refs).score, 0.0);
  EXPECT_EQ(corpus_chrf(std::vector<std::string>{"xyz", "qqq"}, refs).score, 0.0);
  // Whitespace does not count: the same characters, differently spaced, score 100.
  EXPECT_DOUBLE_EQ(corpus_chrf(std::vector<std::string>{"Lechat est\tlà .", " Il\u00a0pleut. "}, refs).score, 100.0);
  // Short hypotheses: the orders they lack are left out of the averages (effective order).
  ChrfStats st;
  st.hyp = {2, 1, 0, 0, 0, 0};
  st.ref = {4, 3, 2, 1, 0, 0};
  st.match = {2, 1, 0, 0, 0, 0};
  const double prec = 1.0, rec = (2.0 / 4 + 1.0 / 3) / 2;
  EXPECT_NEAR(chrf_score_from_stats(st, {}).score, 100 * 5 * prec * rec / (4 * prec + rec), 1e-12);
  EXPECT_EQ(corpus_chrf(std::vector<std::string>{"ÉTÉ"}, std::vector<std::string>{"été"}, {true}).score, 100.0);
}

class EvalReadLines : public ::testing::Test {
 protected:
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("flashgpt_eval_" + std::to_string(::getpid()));
  void SetUp() override { std::filesystem::create_directories(dir); }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::filesystem::path write(const std::string& name, const std::string& bytes) {
    const auto path = dir / name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
};

TEST_F(EvalReadLines, SplitsOnNewlinesOnly) {
  EXPECT_EQ(eval_read_lines(write("a", "one\ntwo\n")), (std::vector<std::string>{"one", "two"}));
  EXPECT_EQ(eval_read_lines(write("b", "one\ntwo")), (std::vector<std::string>{"one", "two"}));
  EXPECT_EQ(eval_read_lines(write("c", "one\r\n\n\u2028x\n")), (std::vector<std::string>{"one\r", "", "\u2028x"}));
  EXPECT_EQ(eval_read_lines(write("d", "\n")), (std::vector<std::string>{""}));
}

TEST_F(EvalReadLines, RefusesBadFilesNamingThem) {
  const auto message = [](const std::filesystem::path& p) {
    try {
      eval_read_lines(p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(dir / "missing.txt").find("missing.txt: no such file"), std::string::npos);
  EXPECT_NE(message(dir).find("is a directory"), std::string::npos);
  EXPECT_NE(message(write("empty.txt", "")).find("empty.txt: empty file"), std::string::npos);
  EXPECT_NE(message(write("bad.txt", "ok\nok\nbad\xc3(\n")).find("invalid UTF-8 at line 3"), std::string::npos);
}

}  // namespace
}  // namespace flashgpt

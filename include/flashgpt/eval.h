// Corpus BLEU and chrF exactly as sacreBLEU 2.x computes them (one reference per segment).
//
// BLEU: tokenizer 13a (mteval-v13a, the default) or intl (mteval-v14 international),
// optional lowercasing (Python's str.lower()), n-grams 1..4 clipped by the reference,
// brevity penalty from the summed lengths, exponential smoothing ("exp", sacreBLEU's
// default: the k-th order with no match gets precision 1/(2^k * total)), no effective
// order (an order with no hypothesis n-gram at all makes the score 0, as sacreBLEU's
// corpus BLEU does). chrF2: character n-grams 1..6 with whitespace removed, no word
// n-grams, beta 2, sacreBLEU's default effective-order averaging of precision and recall.
// The statistics are summed over segments, then scored; the arithmetic follows sacreBLEU's
// order of operations so that the doubles, not just their two decimals, agree.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

// The sacreBLEU release whose definitions and signatures this code reproduces.
inline constexpr char kSacrebleuVersion[] = "2.6.0";
inline constexpr int kBleuMaxOrder = 4;

enum class BleuTokenize { v13a, intl };
// "13a" / "intl" (sacreBLEU's names); bleu_tokenize_from_name throws on anything else.
const char* bleu_tokenize_name(BleuTokenize tokenize);
BleuTokenize bleu_tokenize_from_name(std::string_view name);

struct BleuOptions {
  BleuTokenize tokenize = BleuTokenize::v13a;
  bool lowercase = false;
};

// Sufficient statistics of one segment or, summed, of a corpus.
struct BleuStats {
  uint64_t hyp_len = 0, ref_len = 0;
  std::array<uint64_t, kBleuMaxOrder> correct{}, total{};
  BleuStats& operator+=(const BleuStats& other);
};

struct BleuScore {
  double score = 0;                                  // 0..100
  std::array<double, kBleuMaxOrder> precisions{};    // percent, smoothed
  double bp = 0, ratio = 0;                          // brevity penalty, hyp_len / ref_len
  BleuStats stats;
  std::string signature;  // nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0
  // sacreBLEU's verbose part: "58.1/33.2/20.9/13.6 (BP = 0.989 ratio = 0.989 hyp_len = 77456 ref_len = 78300)"
  std::string verbose() const;
  // sacreBLEU's full line: "BLEU|<signature> = 27.35 <verbose>"
  std::string line() const;
};

struct ChrfOptions {
  bool lowercase = false;
};
inline constexpr int kChrfCharOrder = 6;
inline constexpr int kChrfBeta = 2;

// Per character n-gram order (1..6): hypothesis n-grams (counted only where the reference
// has n-grams of that order, as sacreBLEU does), reference n-grams, matches.
struct ChrfStats {
  std::array<uint64_t, kChrfCharOrder> hyp{}, ref{}, match{};
  ChrfStats& operator+=(const ChrfStats& other);
};

struct ChrfScore {
  double score = 0;  // 0..100
  ChrfStats stats;
  std::string signature;  // nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0
  std::string line() const;  // "chrF2|<signature> = 55.12"
};

// --- The corpus scores (what `flashgpt eval bleu` and the translation evaluator call).
// hyps and refs must have the same size (one reference per hypothesis) and be valid UTF-8.
BleuScore corpus_bleu(std::span<const std::string> hyps, std::span<const std::string> refs,
                      const BleuOptions& options = {});
ChrfScore corpus_chrf(std::span<const std::string> hyps, std::span<const std::string> refs,
                      const ChrfOptions& options = {});
std::string bleu_signature(const BleuOptions& options);
std::string chrf_signature(const ChrfOptions& options);

// --- The pieces, exposed for tests and for callers that score incrementally.
// sacreBLEU's preprocessing of one segment: lowercase (optional), strip trailing
// whitespace, tokenize; tokens joined by single spaces.
std::string bleu_preprocess(std::string_view segment, const BleuOptions& options);
// The tokenizers alone (no lowercasing, no rstrip).
std::string bleu_tokenize_13a(std::string_view line);
std::string bleu_tokenize_intl(std::string_view line);
// Statistics of already tokenized segments (tokens separated by single spaces).
BleuStats bleu_stats_tokenized(std::string_view hyp_tokens, std::string_view ref_tokens);
BleuStats bleu_segment_stats(std::string_view hyp, std::string_view ref, const BleuOptions& options);
BleuScore bleu_score_from_stats(const BleuStats& stats, const BleuOptions& options);
ChrfStats chrf_segment_stats(std::string_view hyp, std::string_view ref, const ChrfOptions& options);
ChrfScore chrf_score_from_stats(const ChrfStats& stats, const ChrfOptions& options);
// Python's str.lower() (full mapping, Final_Sigma) of valid UTF-8.
std::string eval_lowercase(std::string_view text);

// The lines of a UTF-8 text file, one segment per line ("\n" ends a line; a last line
// without it counts; "\r" is kept, as sacreBLEU reads files). Throws, naming the file,
// for a missing file, a directory, an empty file and invalid UTF-8 (with the line number).
std::vector<std::string> eval_read_lines(const std::filesystem::path& path);

}  // namespace flashgpt

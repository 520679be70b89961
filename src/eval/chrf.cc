// chrF2 as sacreBLEU 2.x computes it by default (metrics/chrf.py: char_order 6,
// word_order 0, beta 2, whitespace=False, eps_smoothing=False), written from its
// definition: the segment's str.split() pieces are concatenated (all whitespace dropped),
// character n-grams of orders 1..6 are counted on each side, matches are clipped by the
// reference, and the per-order [hyp, ref, match] counts are summed over the corpus. The
// score averages precision and recall over the orders where both sides have n-grams
// ("effective order"), then takes F-beta of the averages.
#include <flashgpt/error.h>
#include <flashgpt/eval.h>

#include <fmt/format.h>

#include <algorithm>

#include "gram_counter.h"
#include "eval_text.h"
#include "eval_unicode.h"

namespace flashgpt {
namespace {

std::u32string chrf_characters(std::string_view segment, bool lowercase) {
  std::u32string text = eval_text::to_u32(segment);
  if (lowercase) {
    std::u32string lower;
    lower.reserve(text.size());
    eval_unicode::eval_lower_append(text, lower);
    text = std::move(lower);
  }
  std::erase_if(text, [](char32_t c) { return eval_unicode::eval_is_space(c); });
  return text;
}

// An n-gram of n <= 6 code points (21 bits each) packed into two words: code points 0..2
// in `lo`, 3..5 in `hi`. Within one order every key has the same length, so the packing
// is one-to-one.
struct CharGram {
  uint64_t hi = 0, lo = 0;
  bool operator==(const CharGram&) const = default;
};
static_assert(kChrfCharOrder <= 6, "CharGram holds at most 6 code points of 21 bits");

struct CharGramHash {
  uint64_t operator()(const CharGram& g) const { return eval_detail::mix64(g.lo * 0x9e3779b97f4a7c15ULL ^ g.hi); }
};

CharGram char_gram(std::u32string_view text, size_t i, size_t n) {
  CharGram g;
  for (size_t k = 0; k < n; ++k) (k < 3 ? g.lo : g.hi) |= static_cast<uint64_t>(text[i + k]) << (21 * (k % 3));
  return g;
}

}  // namespace

ChrfStats& ChrfStats::operator+=(const ChrfStats& other) {
  for (int n = 0; n < kChrfCharOrder; ++n) {
    hyp[n] += other.hyp[n];
    ref[n] += other.ref[n];
    match[n] += other.match[n];
  }
  return *this;
}

// Per order: the reference's n-grams counted, then each hypothesis n-gram takes a count.
ChrfStats chrf_segment_stats(std::string_view hyp, std::string_view ref, const ChrfOptions& options) {
  const std::u32string h = chrf_characters(hyp, options.lowercase), r = chrf_characters(ref, options.lowercase);
  ChrfStats stats;
  thread_local eval_detail::GramCounter<CharGram, CharGramHash> counter;
  for (size_t n = 1; n <= kChrfCharOrder; ++n) {
    const size_t hyp_grams = h.size() >= n ? h.size() - n + 1 : 0;
    const size_t ref_grams = r.size() >= n ? r.size() - n + 1 : 0;
    // sacreBLEU: "don't count hits if no reference exists for that n-gram" order.
    stats.hyp[n - 1] = ref_grams ? hyp_grams : 0;
    stats.ref[n - 1] = ref_grams;
    if (!hyp_grams || !ref_grams) continue;
    counter.reset(ref_grams);
    for (size_t i = 0; i < ref_grams; ++i) counter.add(char_gram(r, i, n));
    for (size_t i = 0; i < hyp_grams; ++i) stats.match[n - 1] += counter.take(char_gram(h, i, n));
  }
  return stats;
}

std::string chrf_signature(const ChrfOptions& options) {
  return fmt::format("nrefs:1|case:{}|eff:yes|nc:{}|nw:0|space:no|version:{}", options.lowercase ? "lc" : "mixed",
                     kChrfCharOrder, kSacrebleuVersion);
}

// sacreBLEU's CHRF._compute_f_score without eps smoothing, in its order of operations.
ChrfScore chrf_score_from_stats(const ChrfStats& stats, const ChrfOptions& options) {
  ChrfScore s;
  s.stats = stats;
  s.signature = chrf_signature(options);
  constexpr double factor = kChrfBeta * kChrfBeta;
  double avg_prec = 0.0, avg_rec = 0.0;
  int effective_order = 0;
  for (int n = 0; n < kChrfCharOrder; ++n) {
    if (stats.hyp[n] > 0 && stats.ref[n] > 0) {
      avg_prec += static_cast<double>(stats.match[n]) / static_cast<double>(stats.hyp[n]);
      avg_rec += static_cast<double>(stats.match[n]) / static_cast<double>(stats.ref[n]);
      ++effective_order;
    }
  }
  if (effective_order > 0) {
    avg_prec /= effective_order;
    avg_rec /= effective_order;
  }
  if (avg_prec + avg_rec != 0.0) {
    double score = (1 + factor) * avg_prec * avg_rec;
    score /= factor * avg_prec + avg_rec;
    s.score = 100 * score;
  }
  return s;
}

std::string ChrfScore::line() const { return fmt::format("chrF{}|{} = {:.2f}", kChrfBeta, signature, score); }

ChrfScore corpus_chrf(std::span<const std::string> hyps, std::span<const std::string> refs,
                      const ChrfOptions& options) {
  eval_text::check_segments(hyps, refs);
  ChrfStats total;
  for (size_t i = 0; i < hyps.size(); ++i) total += chrf_segment_stats(hyps[i], refs[i], options);
  return chrf_score_from_stats(total, options);
}

}  // namespace flashgpt

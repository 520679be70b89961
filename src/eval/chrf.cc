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

#include "eval/text.h"
#include "eval/unicode.h"

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

}  // namespace

ChrfStats& ChrfStats::operator+=(const ChrfStats& other) {
  for (int n = 0; n < kChrfCharOrder; ++n) {
    hyp[n] += other.hyp[n];
    ref[n] += other.ref[n];
    match[n] += other.match[n];
  }
  return *this;
}

// Per order: both sides' n-grams (views into the code points) sorted, equal runs merged.
ChrfStats chrf_segment_stats(std::string_view hyp, std::string_view ref, const ChrfOptions& options) {
  const std::u32string h = chrf_characters(hyp, options.lowercase), r = chrf_characters(ref, options.lowercase);
  const std::u32string_view hv = h, rv = r;
  ChrfStats stats;
  std::vector<std::u32string_view> hg, rg;
  for (int n = 1; n <= kChrfCharOrder; ++n) {
    hg.clear();
    rg.clear();
    for (size_t i = 0; i + n <= hv.size(); ++i) hg.push_back(hv.substr(i, n));
    for (size_t i = 0; i + n <= rv.size(); ++i) rg.push_back(rv.substr(i, n));
    // sacreBLEU: "don't count hits if no reference exists for that n-gram" order.
    stats.hyp[n - 1] = rg.empty() ? 0 : hg.size();
    stats.ref[n - 1] = rg.size();
    if (hg.empty() || rg.empty()) continue;
    std::sort(hg.begin(), hg.end());
    std::sort(rg.begin(), rg.end());
    size_t j = 0;
    for (size_t i = 0; i < hg.size();) {
      size_t i_end = i;
      while (i_end < hg.size() && hg[i_end] == hg[i]) ++i_end;
      while (j < rg.size() && rg[j] < hg[i]) ++j;
      size_t j_end = j;
      while (j_end < rg.size() && rg[j_end] == hg[i]) ++j_end;
      stats.match[n - 1] += std::min(i_end - i, j_end - j);
      i = i_end;
      j = j_end;
    }
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

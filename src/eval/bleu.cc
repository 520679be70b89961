// Corpus BLEU as sacreBLEU 2.x computes it (metrics/bleu.py, tokenizers/tokenizer_13a.py,
// tokenizer_re.py, tokenizer_intl.py), written from their definitions:
//   preprocess: [str.lower()], str.rstrip(), tokenize, ' '.join(split())
//   13a: drop "<skipped>", join "-\n", "\n" -> " ", unescape &quot; &amp; &lt; &gt; (in
//        that order, only if the line has '&'), pad with one space each side, then four
//        regex substitutions applied one after the other (each non-overlapping, left to right):
//          ([{-~[-` -&(-+:-@/])  -> " \1 "      ASCII punctuation except ' , - .
//          ([^0-9])([.,])        -> "\1 \2 "    period/comma not after a digit
//          ([.,])([^0-9])        -> " \1 \2"    period/comma not before a digit
//          ([0-9])(-)            -> "\1 \2 "    dash after a digit
//   intl: (\P{N})(\p{P}) -> "\1 \2 ", (\p{P})(\P{N}) -> " \1 \2", (\p{S}) -> " \1 "
// Every rule above matches one or two characters, so "non-overlapping, left to right" is a
// scan that emits the replacement and skips the pair on a match, else copies one character.
#include <flashgpt/error.h>
#include <flashgpt/eval.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "gram_counter.h"
#include "eval_text.h"
#include "eval_unicode.h"

namespace flashgpt {
namespace {

using eval_unicode::eval_flags;

bool is_digit(char32_t c) { return c >= U'0' && c <= U'9'; }

// The character class of 13a's first rule: [{-~] [[-`] [ -&] [(-+] [:-@] [/].
bool is_13a_separated(char32_t c) {
  return (c >= 0x7B && c <= 0x7E) || (c >= 0x5B && c <= 0x60) || (c >= 0x20 && c <= 0x26) ||
         (c >= 0x28 && c <= 0x2B) || (c >= 0x3A && c <= 0x40) || c == U'/';
}

// Python's str.replace(from, to) on code points.
void replace_all(std::u32string& s, std::u32string_view from, std::u32string_view to) {
  size_t pos = s.find(from);
  if (pos == std::u32string::npos) return;
  std::u32string out;
  out.reserve(s.size());
  size_t start = 0;
  for (; pos != std::u32string::npos; pos = s.find(from, start)) {
    out.append(s, start, pos - start);
    out.append(to);
    start = pos + from.size();
  }
  out.append(s, start);
  s = std::move(out);
}

// re.sub("(A)", " \1 ", s) for a one-character class A.
template <class A>
std::u32string pad_each(const std::u32string& s, A a) {
  std::u32string out;
  out.reserve(s.size() + s.size() / 2);
  for (const char32_t c : s) {
    if (a(c)) {
      out.push_back(U' ');
      out.push_back(c);
      out.push_back(U' ');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

enum class Spaces { after_each, before_each };  // "\1 \2 " or " \1 \2"

// re.sub("(A)(B)", replacement, s) for one-character classes A and B.
template <class A, class B>
std::u32string pad_pairs(const std::u32string& s, A a, B b, Spaces spaces) {
  std::u32string out;
  out.reserve(s.size() + s.size() / 4);
  size_t i = 0;
  while (i < s.size()) {
    if (i + 1 < s.size() && a(s[i]) && b(s[i + 1])) {
      if (spaces == Spaces::after_each) {
        out += s[i];
        out += U' ';
        out += s[i + 1];
        out += U' ';
      } else {
        out += U' ';
        out += s[i];
        out += U' ';
        out += s[i + 1];
      }
      i += 2;
    } else {
      out.push_back(s[i++]);
    }
  }
  return out;
}

std::string tokenize_13a_u32(std::u32string line) {
  replace_all(line, U"<skipped>", U"");
  replace_all(line, U"-\n", U"");
  replace_all(line, U"\n", U" ");
  if (line.find(U'&') != std::u32string::npos) {
    replace_all(line, U"&quot;", U"\"");
    replace_all(line, U"&amp;", U"&");
    replace_all(line, U"&lt;", U"<");
    replace_all(line, U"&gt;", U">");
  }
  line = U" " + line + U" ";
  const auto period_comma = [](char32_t c) { return c == U'.' || c == U','; };
  const auto not_digit = [](char32_t c) { return !is_digit(c); };
  line = pad_each(line, is_13a_separated);
  line = pad_pairs(line, not_digit, period_comma, Spaces::after_each);
  line = pad_pairs(line, period_comma, not_digit, Spaces::before_each);
  line = pad_pairs(line, is_digit, [](char32_t c) { return c == U'-'; }, Spaces::after_each);
  return eval_text::join_split_utf8(line);
}

std::string tokenize_intl_u32(std::u32string line) {
  const auto punct = [](char32_t c) { return (eval_flags(c) & eval_unicode::kPunct) != 0; };
  const auto not_number = [](char32_t c) { return (eval_flags(c) & eval_unicode::kNumber) == 0; };
  line = pad_pairs(line, not_number, punct, Spaces::after_each);
  line = pad_pairs(line, punct, not_number, Spaces::before_each);
  line = pad_each(line, [](char32_t c) { return (eval_flags(c) & eval_unicode::kSymbol) != 0; });
  return eval_text::join_split_utf8(line);
}

// Python's my_log: log, with log(0) floored to -9999999999.
double floored_log(double x) { return x == 0.0 ? -9999999999.0 : std::log(x); }

}  // namespace

namespace eval_text {
void check_segments(std::span<const std::string> hyps, std::span<const std::string> refs) {
  FLASHGPT_CHECK(hyps.size() == refs.size(), "{} hypotheses but {} references: one reference per hypothesis",
                 hyps.size(), refs.size());
  for (size_t i = 0; i < hyps.size(); ++i) {
    if (auto bad = utf8_first_invalid(hyps[i])) FLASHGPT_FAIL("hypothesis {} is not valid UTF-8 (byte {})", i + 1, *bad);
    if (auto bad = utf8_first_invalid(refs[i])) FLASHGPT_FAIL("reference {} is not valid UTF-8 (byte {})", i + 1, *bad);
  }
}
}  // namespace eval_text

const char* bleu_tokenize_name(BleuTokenize tokenize) { return tokenize == BleuTokenize::intl ? "intl" : "13a"; }

BleuTokenize bleu_tokenize_from_name(std::string_view name) {
  if (name == "13a") return BleuTokenize::v13a;
  if (name == "intl") return BleuTokenize::intl;
  FLASHGPT_FAIL("unknown BLEU tokenizer '{}' (known: 13a, intl)", name);
}

std::string bleu_tokenize_13a(std::string_view line) { return tokenize_13a_u32(eval_text::to_u32(line)); }
std::string bleu_tokenize_intl(std::string_view line) { return tokenize_intl_u32(eval_text::to_u32(line)); }

std::string bleu_preprocess(std::string_view segment, const BleuOptions& options) {
  std::u32string text = eval_text::to_u32(segment);
  if (options.lowercase) {
    std::u32string lower;
    lower.reserve(text.size());
    eval_unicode::eval_lower_append(text, lower);
    text = std::move(lower);
  }
  while (!text.empty() && eval_unicode::eval_is_space(text.back())) text.pop_back();  // str.rstrip()
  return options.tokenize == BleuTokenize::intl ? tokenize_intl_u32(std::move(text))
                                                 : tokenize_13a_u32(std::move(text));
}

BleuStats& BleuStats::operator+=(const BleuStats& other) {
  hyp_len += other.hyp_len;
  ref_len += other.ref_len;
  for (int n = 0; n < kBleuMaxOrder; ++n) {
    correct[n] += other.correct[n];
    total[n] += other.total[n];
  }
  return *this;
}

// n-grams as fixed arrays of token ids (ids start at 1, so an order-k n-gram padded with
// zeros never equals one of another order): the reference's counted, then each
// hypothesis n-gram takes one count if any is left (clipping).
BleuStats bleu_stats_tokenized(std::string_view hyp_tokens, std::string_view ref_tokens) {
  using Gram = std::array<uint32_t, kBleuMaxOrder>;
  struct GramHash {
    uint64_t operator()(const Gram& g) const {
      return eval_detail::mix64((uint64_t{g[0]} | uint64_t{g[1]} << 32) * 0x9e3779b97f4a7c15ULL ^
                                (uint64_t{g[2]} | uint64_t{g[3]} << 32));
    }
  };
  thread_local std::unordered_map<std::string_view, uint32_t> ids;
  thread_local eval_detail::GramCounter<Gram, GramHash> counter;
  thread_local std::vector<uint32_t> hyp, ref;
  ids.clear();
  const auto token_ids = [&](std::string_view text, std::vector<uint32_t>& out) {
    out.clear();
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = text.find(' ', pos);
      if (end == std::string_view::npos) end = text.size();
      if (end > pos) out.push_back(ids.try_emplace(text.substr(pos, end - pos), ids.size() + 1).first->second);
      pos = end + 1;
    }
  };
  const auto gram = [](const std::vector<uint32_t>& t, size_t i, size_t n) {
    Gram g{};
    std::copy_n(t.begin() + static_cast<std::ptrdiff_t>(i), n, g.begin());
    return g;
  };
  token_ids(hyp_tokens, hyp);
  token_ids(ref_tokens, ref);
  BleuStats stats;
  stats.hyp_len = hyp.size();
  stats.ref_len = ref.size();
  counter.reset(kBleuMaxOrder * ref.size());
  for (size_t n = 1; n <= kBleuMaxOrder; ++n) {
    for (size_t i = 0; i + n <= ref.size(); ++i) counter.add(gram(ref, i, n));
  }
  for (size_t n = 1; n <= kBleuMaxOrder; ++n) {
    for (size_t i = 0; i + n <= hyp.size(); ++i) {
      ++stats.total[n - 1];
      stats.correct[n - 1] += counter.take(gram(hyp, i, n));
    }
  }
  return stats;
}

BleuStats bleu_segment_stats(std::string_view hyp, std::string_view ref, const BleuOptions& options) {
  return bleu_stats_tokenized(bleu_preprocess(hyp, options), bleu_preprocess(ref, options));
}

std::string bleu_signature(const BleuOptions& options) {
  return fmt::format("nrefs:1|case:{}|eff:no|tok:{}|smooth:exp|version:{}", options.lowercase ? "lc" : "mixed",
                     bleu_tokenize_name(options.tokenize), kSacrebleuVersion);
}

// sacreBLEU's BLEU.compute_bleu with smooth_method='exp', effective_order=False, in its
// order of operations.
BleuScore bleu_score_from_stats(const BleuStats& stats, const BleuOptions& options) {
  BleuScore s;
  s.stats = stats;
  s.signature = bleu_signature(options);
  const double sys_len = static_cast<double>(stats.hyp_len), ref_len = static_cast<double>(stats.ref_len);
  s.ratio = stats.ref_len ? sys_len / ref_len : 0.0;
  s.bp = 1.0;
  if (stats.hyp_len < stats.ref_len) s.bp = stats.hyp_len > 0 ? std::exp(1.0 - ref_len / sys_len) : 0.0;
  if (std::all_of(stats.correct.begin(), stats.correct.end(), [](uint64_t c) { return c == 0; })) {
    s.score = 0.0;  // sacreBLEU stops early when nothing matches
    return s;
  }
  double smooth = 1.0;
  for (int n = 0; n < kBleuMaxOrder; ++n) {
    if (stats.total[n] == 0) break;  // the remaining precisions stay 0 (log floored)
    if (stats.correct[n] == 0) {
      smooth *= 2;
      s.precisions[n] = 100.0 / (smooth * static_cast<double>(stats.total[n]));
    } else {
      s.precisions[n] = 100.0 * static_cast<double>(stats.correct[n]) / static_cast<double>(stats.total[n]);
    }
  }
  double log_sum = 0.0;
  for (const double p : s.precisions) log_sum += floored_log(p);
  s.score = s.bp * std::exp(log_sum / kBleuMaxOrder);
  return s;
}

std::string BleuScore::verbose() const {
  return fmt::format("{:.1f}/{:.1f}/{:.1f}/{:.1f} (BP = {:.3f} ratio = {:.3f} hyp_len = {} ref_len = {})",
                     precisions[0], precisions[1], precisions[2], precisions[3], bp, ratio, stats.hyp_len,
                     stats.ref_len);
}

std::string BleuScore::line() const { return fmt::format("BLEU|{} = {:.2f} {}", signature, score, verbose()); }

BleuScore corpus_bleu(std::span<const std::string> hyps, std::span<const std::string> refs,
                      const BleuOptions& options) {
  eval_text::check_segments(hyps, refs);
  BleuStats total;
  for (size_t i = 0; i < hyps.size(); ++i) total += bleu_segment_stats(hyps[i], refs[i], options);
  return bleu_score_from_stats(total, options);
}

}  // namespace flashgpt

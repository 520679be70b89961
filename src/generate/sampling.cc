// Sampling from logits: greedy, or temperature -> top-k -> top-p, then one draw.
//
// Every ordering is total (probability descending, then id ascending), so the candidate
// set and the draw depend on nothing but the logits, the config and (seed, prompt index,
// step). The uniform comes from Philox-4x32-10 with counter (step, prompt index) and key
// seed, so a prompt's samples do not depend on which batch or slot it ran in.
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/philox.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace flashgpt {

void sampling_validate(const SamplingConfig& config) {
  if (config.greedy) return;
  FLASHGPT_CHECK(std::isfinite(config.temperature) && config.temperature > 0.0f,
                 "sampling: temperature must be > 0, got {} (use greedy decoding for temperature 0)",
                 config.temperature);
  FLASHGPT_CHECK(config.top_k >= 0, "sampling: top_k must be >= 0 (0: no limit), got {}", config.top_k);
  FLASHGPT_CHECK(config.top_p > 0.0f && config.top_p <= 1.0f, "sampling: top_p must be in (0, 1], got {}",
                 config.top_p);
}

namespace {

using Candidate = std::pair<float, TokenId>;  // (logit, then probability; id)

bool more_likely(const Candidate& a, const Candidate& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

TokenId argmax(std::span<const float> logits) {
  FLASHGPT_CHECK(!logits.empty(), "sampling: no logits");
  size_t best = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    FLASHGPT_CHECK(!std::isnan(logits[i]), "sampling: logit {} is NaN", i);
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<TokenId>(best);
}

// The kept candidates (most likely first when top_p < 1), with their probabilities renormalised over the
// top-k set (before the top-p cut, as in Hugging Face's warpers); returns the kept count.
size_t sampling_candidates(std::span<const float> logits, const SamplingConfig& config,
                           std::vector<Candidate>& c) {
  const size_t V = logits.size();
  FLASHGPT_CHECK(V > 0, "sampling: no logits");
  c.resize(V);
  const float inv_t = 1.0f / config.temperature;
  for (size_t i = 0; i < V; ++i) {
    FLASHGPT_CHECK(!std::isnan(logits[i]), "sampling: logit {} is NaN", i);
    c[i] = {logits[i] * inv_t, static_cast<TokenId>(i)};
  }
  size_t n = V;
  if (config.top_k > 0 && static_cast<size_t>(config.top_k) < V) {
    n = static_cast<size_t>(config.top_k);
    std::nth_element(c.begin(), c.begin() + static_cast<long>(n) - 1, c.end(), more_likely);
  }
  // The most likely of the n first.
  const float top = std::max_element(c.begin(), c.begin() + static_cast<long>(n),
                                     [](const Candidate& a, const Candidate& b) { return more_likely(b, a); })
                        ->first;
  FLASHGPT_CHECK(std::isfinite(top), "sampling: the largest logit is {}", top);
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    c[i].first = std::exp(c[i].first - top);
    sum += c[i].first;
  }
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (size_t i = 0; i < n; ++i) c[i].first *= inv_sum;
  if (config.top_p >= 1.0f) return n;  // the draw needs no order, only a fixed one
  // Sort only as many as needed: the m most likely, growing m until their mass reaches p.
  for (size_t m = std::min<size_t>(n, 256);; m = std::min(n, m * 8)) {
    std::partial_sort(c.begin(), c.begin() + static_cast<long>(m), c.begin() + static_cast<long>(n), more_likely);
    double mass = 0.0;
    for (size_t i = 0; i < m; ++i) {
      mass += c[i].first;
      if (mass >= config.top_p) return i + 1;
    }
    if (m == n) return n;  // rounding kept the sum just below p: keep everything
  }
}

}  // namespace

std::vector<TokenId> sampling_allowed_set(std::span<const float> logits, const SamplingConfig& config) {
  sampling_validate(config);
  if (config.greedy) return {argmax(logits)};
  std::vector<Candidate> c;
  const size_t kept = sampling_candidates(logits, config, c);
  std::vector<TokenId> ids;
  for (size_t i = 0; i < kept; ++i) ids.push_back(c[i].second);
  std::sort(ids.begin(), ids.end());
  return ids;
}

TokenId sampling_draw(std::span<const float> logits, const SamplingConfig& config, uint64_t prompt_index,
                      uint64_t step, std::vector<Candidate>& scratch) {
  if (config.greedy) return argmax(logits);
  const size_t kept = sampling_candidates(logits, config, scratch);
  const Philox4x32 words = philox4x32_10(
      {static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), static_cast<uint32_t>(prompt_index),
       static_cast<uint32_t>(prompt_index >> 32)},
      static_cast<uint32_t>(config.seed), static_cast<uint32_t>(config.seed >> 32));
  const uint64_t bits = ((static_cast<uint64_t>(words.x) << 32) | words.y) >> 11;
  const double u = static_cast<double>(bits) * 0x1.0p-53;  // [0, 1)
  double mass = 0.0;
  for (size_t i = 0; i < kept; ++i) mass += scratch[i].first;
  const double target = u * mass;
  double cumulative = 0.0;
  for (size_t i = 0; i < kept; ++i) {
    cumulative += scratch[i].first;
    if (target < cumulative) return scratch[i].second;
  }
  return scratch[kept - 1].second;
}

}  // namespace flashgpt

// Sampling (greedy, temperature, top-k, top-p, seeds), stop strings, UTF-8 streaming and
// the generate loop (batching, slot reuse, finish reasons) on a tiny random model.
#include "common/test_support.h"

#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

namespace flashgpt {
namespace {

const Tokenizer& cl100k() {
  static const Tokenizer tokenizer = [] {
    auto dir = testing::tokenizer_dir();
    if (!dir) throw Error("no tokenizer rank files: set FLASHGPT_TOKENIZER_DIR or provide ../shared/data/tokenizers");
    return Tokenizer::load("cl100k_base", *dir);
  }();
  return tokenizer;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

std::vector<float> random_logits(size_t n, uint32_t seed, float spread = 3.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<float> l(n);
  for (auto& v : l) v = normal(rng);
  return l;
}

// ---- sampling ------------------------------------------------------------------------

// The allowed set from its definition: sort everything, cut at k, then at mass p.
std::vector<TokenId> allowed_by_definition(std::span<const float> logits, const SamplingConfig& c) {
  std::vector<std::pair<double, TokenId>> all;
  for (size_t i = 0; i < logits.size(); ++i) all.push_back({double(logits[i]) / c.temperature, TokenId(i)});
  std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  if (c.top_k > 0 && size_t(c.top_k) < all.size()) all.resize(size_t(c.top_k));
  double sum = 0;
  for (auto& [l, id] : all) sum += std::exp(l - all[0].first);
  std::vector<TokenId> ids;
  double mass = 0;
  for (auto& [l, id] : all) {
    ids.push_back(id);
    mass += std::exp(l - all[0].first) / sum;
    if (c.top_p < 1.0f && mass >= c.top_p - 1e-6) break;
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

TEST(Sampling, AllowedSetFollowsTheDefinition) {
  for (size_t V : {1u, 7u, 300u, 5000u}) {
    const auto logits = random_logits(V, static_cast<uint32_t>(V));
    for (int64_t k : {0, 1, 5, 40}) {
      for (float p : {1.0f, 0.9f, 0.5f, 0.01f}) {
        SamplingConfig c{.temperature = 0.7f, .top_k = k, .top_p = p};
        const auto got = sampling_allowed_set(logits, c);
        const auto want = allowed_by_definition(logits, c);
        // p near a boundary may differ by rounding; the sets must agree but for their last member.
        EXPECT_LE(std::abs(double(got.size()) - double(want.size())), 1.0) << V << " " << k << " " << p;
        std::vector<TokenId> common;
        std::set_intersection(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(common));
        EXPECT_GE(common.size() + 1, std::max(got.size(), want.size())) << V << " " << k << " " << p;
        if (k > 0) {
          EXPECT_LE(got.size(), size_t(k));
        }
      }
    }
  }
  const std::vector<float> tie = {1.0f, 3.0f, 3.0f, 0.0f};
  EXPECT_EQ(sampling_allowed_set(tie, {.greedy = true}), std::vector<TokenId>{1});  // lowest id on a tie
  EXPECT_EQ(sampling_allowed_set(tie, {.top_k = 1}), std::vector<TokenId>{1});
}

// Statistical: thousands of draws with fixed seeds never leave the allowed set, and the
// kept tokens come up about as often as their renormalised probabilities say.
TEST(Sampling, DrawsStayInTheAllowedSetWithTheRightFrequencies) {
  const auto logits = random_logits(500, 3, 2.0f);
  std::vector<std::pair<float, TokenId>> scratch;
  for (SamplingConfig c : {SamplingConfig{.top_k = 10, .seed = 1}, SamplingConfig{.top_p = 0.6f, .seed = 2},
                           SamplingConfig{.temperature = 1.5f, .top_k = 50, .top_p = 0.8f, .seed = 3},
                           SamplingConfig{.temperature = 0.5f, .seed = 4}}) {
    const auto allowed = sampling_allowed_set(logits, c);
    const std::set<TokenId> allowed_set(allowed.begin(), allowed.end());
    std::map<TokenId, int> counts;
    const int draws = 5000;
    for (int i = 0; i < draws; ++i) {
      const TokenId t = sampling_draw(logits, c, static_cast<uint64_t>(i % 7), static_cast<uint64_t>(i), scratch);
      ASSERT_TRUE(allowed_set.count(t)) << "token " << t << " outside the allowed set";
      ++counts[t];
    }
    // Expected frequency of the most likely token, renormalised over the allowed set.
    double sum = 0, top = -1e30;
    for (TokenId t : allowed) top = std::max(top, double(logits[t]) / c.temperature);
    for (TokenId t : allowed) sum += std::exp(double(logits[t]) / c.temperature - top);
    const TokenId best = *std::max_element(allowed.begin(), allowed.end(),
                                           [&](TokenId a, TokenId b) { return logits[a] < logits[b]; });
    const double p = 1.0 / sum;
    const double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(counts[best] / double(draws), p, 5 * sigma + 1e-3);
  }
}

TEST(Sampling, SeedsRepeatAndDiffer) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const auto logits = random_logits(1000, 9, 1.0f);
  std::vector<std::pair<float, TokenId>> scratch;
  auto run = [&](uint64_t seed) {
    std::vector<TokenId> out;
    for (uint64_t step = 0; step < 64; ++step)
      out.push_back(sampling_draw(logits, {.top_p = 0.95f, .seed = seed}, 3, step, scratch));
    return out;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
  EXPECT_THROW(sampling_validate({.temperature = 0.0f}), Error);
  EXPECT_THROW(sampling_validate({.top_k = -1}), Error);
  EXPECT_THROW(sampling_validate({.top_p = 0.0f}), Error);
  EXPECT_THROW(sampling_validate({.top_p = 1.5f}), Error);
  const std::vector<float> nan = {0.0f, std::nanf("")};
  EXPECT_THROW(sampling_draw(nan, {}, 0, 0, scratch), Error);
}

// ---- streaming and stop strings ------------------------------------------------------

// Single-byte token ids of cl100k for each byte of s.
std::vector<TokenId> byte_tokens(std::string_view s) {
  std::vector<TokenId> ids;
  for (char c : s) {
    for (TokenId id = 0; id < 100256; ++id) {
      if (cl100k().token_bytes(id) == std::string_view(&c, 1)) {
        ids.push_back(id);
        break;
      }
    }
  }
  EXPECT_EQ(ids.size(), s.size());
  return ids;
}

TEST(StopStreamer, NeverSplitsACharacterAndAddsUpToTheText) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const std::string text = "caf\xC3\xA9 \xF0\x9F\x99\x82 na\xC3\xAFve \xE4\xB8\x96\xE7\x95\x8C\nsecond line";
  for (const auto& ids : {cl100k().encode_ordinary(text), byte_tokens(text)}) {
    StopStreamer stream(cl100k(), {});
    std::string joined;
    for (TokenId id : ids) {
      const std::string chunk = stream.push(id);
      EXPECT_TRUE(valid_utf8(chunk)) << "chunk cut inside a character";
      joined += chunk;
    }
    joined += stream.finish();
    EXPECT_EQ(joined, text);
    EXPECT_FALSE(stream.stopped());
  }
}

TEST(StopStreamer, CutsAtTheFirstStopStringAndHoldsBackItsPrefix) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const std::string text = "Bonjour.\nEnglish: hello";
  StopStreamer stream(cl100k(), {"\n", "English:"});
  std::string shown;
  const auto ids = byte_tokens(text);
  for (TokenId id : ids) shown += stream.push(id);
  EXPECT_TRUE(stream.stopped());
  EXPECT_EQ(shown, "Bonjour.");
  EXPECT_EQ(stream.text(), "Bonjour.");
  EXPECT_EQ(stream.finish(), "");

  // A possible stop string is held back, then released once it cannot be one.
  StopStreamer held(cl100k(), {"END"});
  std::string out;
  for (TokenId id : byte_tokens("aEN")) out += held.push(id);
  EXPECT_EQ(out, "a");
  out += held.push(byte_tokens("x")[0]);
  EXPECT_EQ(out, "aENx");
  for (TokenId id : byte_tokens("yEND")) out += held.push(id);
  EXPECT_TRUE(held.stopped());
  EXPECT_EQ(out, "aENxy");
  // A stop string spanning tokens, with a multi-byte character inside it.
  StopStreamer multi(cl100k(), {"\xC3\xA9t\xC3\xA9"});
  std::string m;
  for (TokenId id : byte_tokens("un \xC3\xA9t\xC3\xA9 chaud")) m += multi.push(id);
  EXPECT_TRUE(multi.stopped());
  EXPECT_EQ(m, "un ");
  // At the end, a held prefix is released.
  StopStreamer tail(cl100k(), {"\n\n"});
  std::string t;
  for (TokenId id : byte_tokens("ok\n")) t += tail.push(id);
  EXPECT_EQ(t, "ok");
  EXPECT_EQ(tail.finish(), "\n");
}

TEST(StopStreamer, UnescapesCommandLineStops) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  EXPECT_EQ(stop_string_unescape("\\n"), "\n");
  EXPECT_EQ(stop_string_unescape("a\\tb\\\\"), "a\tb\\");
  EXPECT_EQ(stop_string_unescape("\\u00e9"), "\xC3\xA9");
  EXPECT_EQ(stop_string_unescape("\\x41"), "A");
  EXPECT_THROW(stop_string_unescape("\\q"), Error);
  EXPECT_THROW(stop_string_unescape(""), Error);
  EXPECT_THROW(stop_string_unescape("\\xC3"), Error);  // not valid UTF-8 alone
  EXPECT_THROW(stop_string_unescape("a\\"), Error);
}

// ---- the generate loop ---------------------------------------------------------------

struct TinyModel {
  ModelConfig config;
  std::vector<float> params;
};

// A tiny random model over the first 1000 ids of cl100k (every one of them decodes), so
// that random outputs include partial UTF-8 sequences.
const TinyModel& tiny() {
  static const TinyModel m = [] {
    TinyModel t;
    t.config = model_preset("tiny", 1000);
    t.config.dropout = 0.0f;
    t.params.resize(static_cast<size_t>(model_param_count(t.config)));
    model_init_params(t.config, 5, t.params);
    std::mt19937 rng(5);
    std::normal_distribution<float> noise(0.0f, 0.3f);  // sharper than init: outputs differ by prompt
    for (auto& v : t.params) v += noise(rng);
    return t;
  }();
  return m;
}

std::vector<std::vector<TokenId>> prompts_of(std::initializer_list<int64_t> lengths) {
  std::vector<std::vector<TokenId>> prompts;
  uint32_t seed = 1;
  for (int64_t n : lengths) {
    std::mt19937 rng(seed++);
    std::vector<TokenId> p(static_cast<size_t>(n));
    for (auto& t : p) t = static_cast<TokenId>(rng() % 1000);
    prompts.push_back(p);
  }
  return prompts;
}

std::vector<GenerationResult> run(const std::vector<std::vector<TokenId>>& prompts, const GenerateConfig& config,
                                  int64_t slots, std::vector<std::string>* streamed = nullptr) {
  auto engine = inference_create_cpu(tiny().config, tiny().params, {.max_slots = slots});
  std::vector<int> done(prompts.size(), 0);
  if (streamed) streamed->assign(prompts.size(), "");
  auto results = generate_tokens(*engine, cl100k(), prompts, config, [&](size_t i, std::string_view text, bool end) {
    EXPECT_EQ(done[i], 0) << "text after done";
    EXPECT_TRUE(valid_utf8(text));
    if (streamed) (*streamed)[i] += text;
    done[i] += end;
  });
  for (int d : done) EXPECT_EQ(d, 1);
  return results;
}

TEST(Generate, BatchingDoesNotChangeTheOutput) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();  // run() decodes with cl100k_base
  const auto prompts = prompts_of({3, 20, 1, 9, 40, 2});
  for (GenerateConfig config : {GenerateConfig{.max_new_tokens = 12, .sampling = {.greedy = true}, .stop = {}},
                                GenerateConfig{.max_new_tokens = 12, .sampling = {.top_k = 50, .top_p = 0.9f, .seed = 7}, .stop = {}}}) {
    std::vector<std::string> streamed;
    const auto alone = run(prompts, config, 1, &streamed);
    for (int64_t slots : {2, 8}) {
      const auto batched = run(prompts, config, slots);
      for (size_t i = 0; i < prompts.size(); ++i) {
        EXPECT_EQ(batched[i].tokens, alone[i].tokens) << "prompt " << i << " slots " << slots;
        EXPECT_EQ(batched[i].text, alone[i].text);
      }
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(streamed[i], alone[i].text);
      EXPECT_TRUE(valid_utf8(alone[i].text));
      EXPECT_EQ(alone[i].prompt_tokens, int64_t(prompts[i].size()));
    }
  }
}

TEST(Generate, SampledOutputRepeatsWithTheSeedAndChangesWithAnother) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();  // run() decodes with cl100k_base
  const auto prompts = prompts_of({4, 4, 10});
  GenerateConfig config{.max_new_tokens = 16, .sampling = {.temperature = 1.0f, .seed = 1}, .stop = {}};
  config.stop_at_end_of_text = false;
  const auto a = run(prompts, config, 3), b = run(prompts, config, 3);
  config.sampling.seed = 2;
  const auto c = run(prompts, config, 3);
  int differ = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens);
    differ += a[i].tokens != c[i].tokens;
  }
  EXPECT_GT(differ, 0);
  // The same prompt twice in one batch gets different samples: the stream is keyed by index.
  EXPECT_NE(a[0].tokens, a[1].tokens);
}

TEST(Generate, FinishReasons) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();  // run() decodes with cl100k_base
  const ModelConfig& c = tiny().config;
  GenerateConfig config{.max_new_tokens = 5, .sampling = {.greedy = true}, .stop = {}};
  config.stop_at_end_of_text = false;
  auto r = run(prompts_of({3}), config, 1);
  EXPECT_EQ(r[0].finish, FinishReason::max_new_tokens);
  EXPECT_EQ(r[0].tokens.size(), 5u);
  // A prompt of T - 3 tokens can take 4 more: three fed at positions T-3..T-1, one last.
  config.max_new_tokens = 100;
  r = run(prompts_of({c.context - 3}), config, 1);
  EXPECT_EQ(r[0].finish, FinishReason::context);
  EXPECT_EQ(r[0].tokens.size(), 4u);
  // A stop string made of what greedy decoding produces anyway.
  config.max_new_tokens = 8;
  const auto free_run = run(prompts_of({6}), config, 1);
  const std::string& text = free_run[0].text;
  ASSERT_TRUE(valid_utf8(text));
  size_t cut = 1;  // a whole-character stop string from the middle of the output
  while (cut < text.size() && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) ++cut;
  if (cut < text.size()) {
    size_t end = cut + 1;
    while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
    config.stop = {text.substr(cut, end - cut)};
    r = run(prompts_of({6}), config, 1);
    EXPECT_EQ(r[0].finish, FinishReason::stop_string);
    EXPECT_EQ(r[0].text, text.substr(0, text.find(config.stop[0])));
  }
  EXPECT_THROW(run(prompts_of({c.context}), config, 1), Error);  // no room to generate
}

TEST(Generate, StopsAtEndOfText) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  // <|endoftext|> is outside the 1000 ids of tiny(): a one-layer model over all of cl100k
  // whose tied embedding makes <|endoftext|> the likeliest token everywhere.
  ModelConfig c = model_preset("tiny", static_cast<int64_t>(cl100k().vocab_size()));
  c.dropout = 0.0f;
  c.n_layer = 1;
  std::vector<float> params(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, 3, params);
  const TokenId eot = cl100k().end_of_text();
  for (const ParamSpec& s : model_param_specs(c)) {
    if (s.kind == ParamKind::wte) {
      for (int64_t j = 0; j < c.d_model; ++j) params[s.offset + eot * c.d_model + j] = 0.0f;
      params[s.offset + eot * c.d_model] = 50.0f;  // its logit is 50 * lnf(x)[0]
    }
    if (s.kind == ParamKind::lnf_b) params[s.offset] = 10.0f;  // lnf(x)[0] >= ~6: eot wins
  }
  auto engine = inference_create_cpu(c, params, {.max_slots = 1});
  const std::vector<std::vector<TokenId>> prompts = {cl100k().encode_ordinary("Hello")};
  auto r = generate_tokens(*engine, cl100k(), prompts, {.max_new_tokens = 10, .sampling = {.greedy = true}, .stop = {}});
  EXPECT_EQ(r[0].finish, FinishReason::end_of_text);
  EXPECT_EQ(r[0].tokens, std::vector<TokenId>{eot});
  EXPECT_EQ(r[0].text, "");
  // Without the stop, its text appears in the output.
  r = generate_tokens(*engine, cl100k(), prompts,
                      {.max_new_tokens = 2, .sampling = {.greedy = true}, .stop = {}, .stop_at_end_of_text = false});
  EXPECT_EQ(r[0].text, "<|endoftext|><|endoftext|>");
}

}  // namespace
}  // namespace flashgpt

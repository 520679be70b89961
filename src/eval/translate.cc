// Few-shot translation evaluation: prompts, demonstrations, the leak check and the scoring
// loop (translate.h).
#include <flashgpt/data.h>
#include <flashgpt/error.h>
#include <flashgpt/philox.h>
#include <flashgpt/translate.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>

namespace flashgpt {

const char* translate_direction_name(TranslateDirection direction) {
  return direction == TranslateDirection::en_fr ? "en-fr" : "fr-en";
}

std::vector<TranslateDirection> translate_directions_from_name(std::string_view name) {
  if (name == "en-fr") return {TranslateDirection::en_fr};
  if (name == "fr-en") return {TranslateDirection::fr_en};
  if (name == "both") return {TranslateDirection::en_fr, TranslateDirection::fr_en};
  FLASHGPT_FAIL("unknown translation direction '{}' (choose en-fr, fr-en or both)", name);
}

std::string translate_prompt(std::span<const TranslatePair> demos, std::string_view source,
                             TranslateDirection direction) {
  const bool en_fr = direction == TranslateDirection::en_fr;
  const char* from = en_fr ? "English" : "French";
  const char* to = en_fr ? "French" : "English";
  std::string prompt;
  for (const TranslatePair& d : demos) {
    prompt += fmt::format("{}: {}\n{}: {}\n\n", from, en_fr ? d.en : d.fr, to, en_fr ? d.fr : d.en);
  }
  prompt += fmt::format("{}: {}\n{}:", from, source, to);
  return prompt;
}

// A partial Fisher-Yates shuffle driven by Philox counter (sentence, draw) under the seed.
std::vector<size_t> translate_demo_indices(uint64_t seed, uint64_t sentence, size_t pool, size_t k) {
  FLASHGPT_CHECK(k <= pool, "{} demonstrations asked for, but the dev pool holds only {} pairs", k, pool);
  std::vector<size_t> order(pool);
  std::iota(order.begin(), order.end(), size_t{0});
  for (size_t i = 0; i < k; ++i) {
    const Philox4x32 r = philox4x32_10({static_cast<uint32_t>(i), static_cast<uint32_t>(sentence),
                                        static_cast<uint32_t>(sentence >> 32), 0x7472616eu /* "tran" */},
                                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const uint64_t bits = (static_cast<uint64_t>(r.x) << 32) | r.y;
    const size_t j = i + static_cast<size_t>(bits % (pool - i));
    std::swap(order[i], order[j]);
  }
  order.resize(k);
  return order;
}

std::vector<TranslatePair> translate_read_pairs(const std::filesystem::path& dir, std::string_view name) {
  std::filesystem::path en;
  for (const char* ext : {".xz", ".gz", ""}) {
    const auto candidate = dir / fmt::format("{}.fr-en.en{}", name, ext);
    if (std::filesystem::exists(candidate)) {
      en = candidate;
      break;
    }
  }
  FLASHGPT_CHECK(!en.empty(), "{}: no {}.fr-en.en[.xz|.gz] (and its .fr) here; pass --data-dir", dir.string(), name);
  PairReader reader(pair_source_from_path(en), BadLinePolicy::fail, Prefetch::no);
  std::vector<TranslatePair> pairs;
  TextPair pair;
  while (reader.next(pair)) pairs.push_back({std::move(pair.en), std::move(pair.fr)});
  FLASHGPT_CHECK(!pairs.empty(), "{}: no sentence pairs", en.string());
  return pairs;
}

TrainingDataCheck translate_check_training_data(const std::filesystem::path& run, const std::filesystem::path& dataset) {
  std::filesystem::path data = dataset;
  const auto config_path = run / "config.json";
  if (data.empty()) {
    std::ifstream in(config_path);
    if (!in) return {false, fmt::format("{} is missing, so the run's training data is unknown", config_path.string())};
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("options") || !j["options"].contains("data") ||
        !j["options"]["data"].is_string()) {
      return {false, fmt::format("{} does not name the training data (options.data)", config_path.string())};
    }
    data = j["options"]["data"].get<std::string>();
  }
  const auto summary_path = data / "summary.json";
  std::ifstream in(summary_path);
  if (!in) {
    return {false, fmt::format("the training data {} has no summary.json listing its inputs (pass --train-data DIR "
                               "if the dataset moved)", data.string())};
  }
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.contains("corpora") || !j["corpora"].is_array()) {
    return {false, fmt::format("{} does not list the corpora the dataset was built from", summary_path.string())};
  }
  std::vector<std::string> names;
  for (const auto& c : j["corpora"]) {
    std::string name = c.value("name", std::string());
    std::string lower = name;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
    if (lower.find("newstest2014") != std::string::npos || lower.find("newstest14") != std::string::npos) {
      return {false, fmt::format("{} lists '{}' among the training inputs: the run was trained on the test set",
                                 summary_path.string(), name)};
    }
    names.push_back(std::move(name));
  }
  return {true, fmt::format("{} (the training data of {}) lists {} input corpora, none of them newstest2014: {}",
                            summary_path.string(), run.string(), names.size(), fmt::join(names, ", "))};
}

namespace {

std::string strip(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return std::string(s);
}

struct BuiltPrompt {
  std::vector<TokenId> tokens;
  size_t shots = 0;
  bool too_long = false;
};

// The prompt with as many of the k demonstrations as fit beside the output budget.
BuiltPrompt build_prompt(const Tokenizer& tokenizer, std::span<const TranslatePair> dev, std::span<const size_t> demo_ids,
                         std::string_view source, TranslateDirection direction, int64_t t_max, int64_t max_new) {
  std::vector<TranslatePair> demos;
  for (size_t id : demo_ids) demos.push_back(dev[id]);
  const int64_t source_tokens = static_cast<int64_t>(tokenizer.encode_ordinary(source).size());
  const int64_t budget = std::min<int64_t>(max_new, 2 * source_tokens + 16);
  while (true) {
    BuiltPrompt p;
    p.tokens = tokenizer.encode_ordinary(translate_prompt(demos, source, direction));
    p.shots = demos.size();
    const int64_t len = static_cast<int64_t>(p.tokens.size());
    if (len + budget <= t_max || (demos.empty() && len < t_max)) return p;
    if (demos.empty()) {
      p.too_long = true;
      return p;
    }
    demos.pop_back();
  }
}

}  // namespace

std::vector<TranslateSetting> translate_evaluate(InferenceEngine& engine, const Tokenizer& tokenizer,
                                                 std::span<const TranslatePair> test,
                                                 std::span<const TranslatePair> dev, const TranslateConfig& config) {
  FLASHGPT_CHECK(!test.empty(), "translate: no test sentences");
  for (int64_t k : config.shots) {
    FLASHGPT_CHECK(k >= 0 && static_cast<size_t>(k) <= dev.size(), "translate: {} shots asked for, with {} dev pairs",
                   k, dev.size());
  }
  const int64_t t_max = engine.max_context();
  GenerateConfig gen;
  gen.max_new_tokens = config.max_new_tokens;
  gen.sampling = config.sampling;
  gen.sampling.seed = config.seed;
  gen.stop = {"\n"};
  std::vector<TranslateSetting> settings;
  for (TranslateDirection direction : config.directions) {
    const bool en_fr = direction == TranslateDirection::en_fr;
    std::vector<std::string> refs;
    for (const auto& p : test) refs.push_back(en_fr ? p.fr : p.en);
    for (int64_t k : config.shots) {
      const auto t0 = std::chrono::steady_clock::now();
      TranslateSetting s;
      s.direction = direction;
      s.shots = k;
      std::vector<std::vector<TokenId>> prompts;
      std::vector<size_t> index_of;  // prompt -> test sentence
      int64_t given = 0;
      for (size_t i = 0; i < test.size(); ++i) {
        const auto ids = translate_demo_indices(config.seed, i, dev.size(), static_cast<size_t>(k));
        BuiltPrompt p = build_prompt(tokenizer, dev, ids, en_fr ? test[i].en : test[i].fr, direction, t_max,
                                     config.max_new_tokens);
        if (p.too_long) {
          ++s.prompts_too_long;
          continue;
        }
        s.prompts_shortened += p.shots < static_cast<size_t>(k);
        given += static_cast<int64_t>(p.shots);
        prompts.push_back(std::move(p.tokens));
        index_of.push_back(i);
      }
      s.shots_mean = prompts.empty() ? 0.0 : static_cast<double>(given) / static_cast<double>(prompts.size());
      // The seed's examples ride in the same batch, with demonstrations drawn past the test indices.
      const size_t n_test = prompts.size();
      std::vector<std::string> example_sources;
      for (size_t j = 0; j < 3; ++j) {
        const std::string_view src = en_fr ? kTranslateExamplesEn[j] : kTranslateExamplesFr[j];
        const auto ids = translate_demo_indices(config.seed, (uint64_t{1} << 40) + j, dev.size(), static_cast<size_t>(k));
        BuiltPrompt p = build_prompt(tokenizer, dev, ids, src, direction, t_max, config.max_new_tokens);
        if (p.too_long) continue;
        prompts.push_back(std::move(p.tokens));
        example_sources.emplace_back(src);
      }
      GenerateStats stats;
      size_t finished = 0;
      const auto results = generate_tokens(engine, tokenizer, prompts, gen, [&](size_t, std::string_view, bool done) {
        if (!done || !config.progress) return;
        if (++finished % 50 == 0 || finished == prompts.size()) {
          fmt::print(stderr, "\rtranslate {} {}-shot: {}/{} sentences", translate_direction_name(direction), k,
                     finished, prompts.size());
        }
      }, &stats);
      if (config.progress) fmt::print(stderr, "\n");
      s.hypotheses.assign(test.size(), std::string());
      for (size_t p = 0; p < n_test; ++p) s.hypotheses[index_of[p]] = strip(results[p].text);
      for (size_t j = 0; j < example_sources.size(); ++j) {
        s.examples.push_back({example_sources[j], strip(results[n_test + j].text)});
      }
      s.bleu = corpus_bleu(s.hypotheses, refs);
      s.chrf = corpus_chrf(s.hypotheses, refs);
      s.generated_tokens = stats.generated_tokens;
      s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      settings.push_back(std::move(s));
    }
  }
  return settings;
}

}  // namespace flashgpt

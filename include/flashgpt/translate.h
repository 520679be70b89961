// Few-shot translation evaluation (GPT-3 style): English<->French on newstest2014, scored
// with corpus BLEU and chrF exactly as sacreBLEU computes them (eval.h).
//
// Prompts are the seed's format. For English->French with K demonstrations:
//   English: {en_1}\nFrench: {fr_1}\n\n ... English: {en_K}\nFrench: {fr_K}\n\nEnglish: {en}\nFrench:
// and French->English the same with the languages swapped. The model continues after
// "French:" (greedy by default) until a newline; the output, stripped of surrounding
// whitespace, is the hypothesis.
//
// Demonstrations come from the dev sets (newstest2012 and newstest2013), never the test
// set: for test sentence i, the first K of a Philox-seeded draw without replacement keyed
// by (seed, i), so the K = 1 demonstration is also the first of the K = 5 ones. When a
// prompt with its output budget would not fit the context, demonstrations are dropped from
// the end until it does (counted in the results).
#pragma once

#include <flashgpt/eval.h>
#include <flashgpt/generate.h>

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

enum class TranslateDirection { en_fr, fr_en };
const char* translate_direction_name(TranslateDirection direction);  // "en-fr", "fr-en"
// "en-fr", "fr-en" or "both"; throws naming the choices.
std::vector<TranslateDirection> translate_directions_from_name(std::string_view name);

struct TranslatePair {
  std::string en, fr;
};

// The prompt for `source` after the demonstrations, in the format above.
std::string translate_prompt(std::span<const TranslatePair> demos, std::string_view source,
                             TranslateDirection direction);
// The first k of a seeded draw without replacement from 0 .. pool - 1 for `sentence`.
std::vector<size_t> translate_demo_indices(uint64_t seed, uint64_t sentence, size_t pool, size_t k);

// Pairs of DIR/NAME.fr-en.{en,fr}[.xz|.gz]; an error names the files when they are missing.
std::vector<TranslatePair> translate_read_pairs(const std::filesystem::path& dir, std::string_view name);

// Whether a run's training data could hold the test set. The run's RUN/config.json names its
// prepared dataset (options.data; `dataset` overrides it), whose summary.json lists the
// corpora it was built from; a corpus named like newstest2014 makes it unclean. `reason`
// says which files were read and what was found.
struct TrainingDataCheck {
  bool clean = false;
  std::string reason;
};
TrainingDataCheck translate_check_training_data(const std::filesystem::path& run,
                                                const std::filesystem::path& dataset = {});

// The seed's three prompts, and French ones for French->English.
inline constexpr std::string_view kTranslateExamplesEn[] = {"Good morning.", "Thank you for your help.",
                                                            "I enjoy learning new things."};
inline constexpr std::string_view kTranslateExamplesFr[] = {"Bonjour.", "Merci pour votre aide.",
                                                            "J'aime apprendre de nouvelles choses."};

struct TranslateConfig {
  std::vector<int64_t> shots = {0, 1, 5};
  std::vector<TranslateDirection> directions = {TranslateDirection::en_fr, TranslateDirection::fr_en};
  uint64_t seed = 1234;           // demonstrations (and sampling, if not greedy)
  int64_t max_new_tokens = 200;   // per hypothesis
  SamplingConfig sampling{.greedy = true};
  bool progress = true;
};

struct TranslateExample {
  std::string source, output;
};

struct TranslateSetting {
  TranslateDirection direction = TranslateDirection::en_fr;
  int64_t shots = 0;            // asked for
  double shots_mean = 0;        // given, on average (demonstrations dropped to fit)
  int64_t prompts_shortened = 0;  // prompts that lost demonstrations
  int64_t prompts_too_long = 0;   // sources too long for the context even alone: empty hypothesis
  BleuScore bleu;
  ChrfScore chrf;
  std::vector<std::string> hypotheses;
  std::vector<TranslateExample> examples;
  double seconds = 0;
  int64_t generated_tokens = 0;
};

// Runs every (direction, K) on the test pairs with demonstrations from `dev`.
std::vector<TranslateSetting> translate_evaluate(InferenceEngine& engine, const Tokenizer& tokenizer,
                                                 std::span<const TranslatePair> test,
                                                 std::span<const TranslatePair> dev, const TranslateConfig& config);

}  // namespace flashgpt

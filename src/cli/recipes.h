// Named recipes: the settings of an experiment that worked, declared once for every command
// that runs it. `data prepare --recipe NAME` and `train --recipe NAME` fill the options not
// given on the command line from the recipe (explicit flags win); `flashgpt run` builds its
// GPU plan from the same struct. So the flags of bench/model/recipe2_run.sh, the defaults of
// `flashgpt run --device cuda` and docs/experiments.md cannot drift apart.
#pragma once

#include <flashgpt/data_prepare.h>

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

// Recipe 2 v2 of docs/experiments.md ("translate"): the seed model trained on documents that
// are K-shot prompts; 22 BLEU en->fr few-shot on newstest2014 after 390 s on one H100.
// docs/experiments.md says why each value was chosen.
struct TranslationRecipe {
  // data prepare
  double bilingual_rate = 1.0;     // every pair bilingual
  int64_t pairs_per_document = 16;  // documents are K-shot prompts...
  uint64_t document_bytes = 2000;   // ...that fit the 512-token context (~470 tokens)
  double single_pair_share = 0.1;   // a tenth stays in the four single-pair templates
  std::string pair_order = "shuffled";  // unrelated demonstrations, as in the evaluation
  // In-domain news repeated; a weight whose corpus is not among the inputs is dropped.
  std::vector<CorpusWeight> weights = {{"train.newstest2008-2011.fr-en", 4},
                                       {"train.news-commentary-v8-head5k.fr-en", 4},
                                       {"train.misc-testsets.fr-en", 2}};
  // News monolingual text, looked up as DATA/extra/NAME (plain, .xz or .gz) when --mono is
  // not given; one that is absent is left out with a warning.
  std::vector<std::string> mono = {"mono.newstest2015-2021.en", "mono.newstest2019-2021-defr.fr"};
  std::string val_set = "newstest2013";  // validation = the dev set in the prompt format

  // train
  std::string preset = "seed";
  int64_t steps = 4700;  // 154M tokens, ~3 passes, ~390 s on an H100
  int64_t batch = 64;
  double lr = 6e-4;
  int64_t warmup = 200;
  std::string schedule = "cosine";
  double min_lr_ratio = 0.1;
  double weight_decay = 0.1;
  int64_t eval_every = 500;
  int64_t eval_batches = 0;  // all of newstest2013
  int64_t save_every = 0;    // no intermediate 2 GB checkpoints
  bool keep_best = true;     // RUN/best: the lowest newstest2013 loss
};

// The recipe called `name`; an unknown name is an error listing the known ones.
const TranslationRecipe& recipe_find(std::string_view name);
std::vector<std::string> recipe_names();

// One option of a command as the recipe sets it: the option's long name without dashes and
// its value(s) as a user would type them.
struct RecipeValue {
  std::string option;
  std::vector<std::string> values;
};
// What the recipe sets in `data prepare` (without --mono: its paths depend on the data
// directory) and in `train`, in the commands' own option names.
std::vector<RecipeValue> recipe_prepare_values(const TranslationRecipe& recipe);
std::vector<RecipeValue> recipe_train_values(const TranslationRecipe& recipe);

// Accepts a name of recipe_names(); else "unknown recipe 'x' (known: ...)".
CLI::Validator cli_recipe_check();
// Adds --recipe NAME to `cmd`, checked by cli_recipe_check().
CLI::Option* cli_option_recipe(CLI::App& cmd, std::string& recipe);

// After parsing: gives each option of `values` that the command line left out the recipe's
// value, through the option's own conversion and checks (so a recipe value obeys the same
// rules as a typed one). Returns the line that says where the values came from:
// "recipe NAME: a=1 b=2; given on the command line instead: c".
std::string cli_recipe_apply(CLI::App& cmd, const std::string& name, const std::vector<RecipeValue>& values);

}  // namespace flashgpt

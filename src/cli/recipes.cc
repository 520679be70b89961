#include "recipes.h"

#include <flashgpt/error.h>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <utility>

namespace flashgpt {
namespace {

const std::pair<std::string_view, TranslationRecipe> kRecipes[] = {
    {"translate", TranslationRecipe{}},
};

std::string number_text(double v) { return fmt::format("{}", v); }

}  // namespace

std::vector<std::string> recipe_names() {
  std::vector<std::string> names;
  for (const auto& [name, recipe] : kRecipes) names.emplace_back(name);
  return names;
}

const TranslationRecipe& recipe_find(std::string_view name) {
  for (const auto& [known, recipe] : kRecipes) {
    if (known == name) return recipe;
  }
  FLASHGPT_FAIL("--recipe {}: unknown recipe (known: {})", name, fmt::join(recipe_names(), ", "));
}

std::vector<RecipeValue> recipe_prepare_values(const TranslationRecipe& r) {
  std::vector<RecipeValue> v = {
      {"bilingual-rate", {number_text(r.bilingual_rate)}},
      {"pairs-per-document", {std::to_string(r.pairs_per_document)}},
      {"document-bytes", {std::to_string(r.document_bytes)}},
      {"single-pair-share", {number_text(r.single_pair_share)}},
      {"pair-order", {r.pair_order}},
      {"weight", {}},
      {"val-set", {r.val_set}},
  };
  for (const auto& w : r.weights) v[5].values.push_back(fmt::format("{}={}", w.corpus, w.repeat));
  return v;
}

std::vector<RecipeValue> recipe_train_values(const TranslationRecipe& r) {
  return {
      {"preset", {r.preset}},
      {"steps", {std::to_string(r.steps)}},
      {"batch", {std::to_string(r.batch)}},
      {"lr", {number_text(r.lr)}},
      {"warmup", {std::to_string(r.warmup)}},
      {"schedule", {r.schedule}},
      {"min-lr-ratio", {number_text(r.min_lr_ratio)}},
      {"weight-decay", {number_text(r.weight_decay)}},
      {"eval-every", {std::to_string(r.eval_every)}},
      {"eval-batches", {std::to_string(r.eval_batches)}},
      {"save-every", {std::to_string(r.save_every)}},
      {"keep-best", {r.keep_best ? "true" : "false"}},
  };
}

CLI::Validator cli_recipe_check() {
  return CLI::Validator(
      [](std::string& name) {
        for (const auto& known : recipe_names()) {
          if (known == name) return std::string();
        }
        return fmt::format("unknown recipe '{}' (known: {})", name, fmt::join(recipe_names(), ", "));
      },
      "RECIPE");
}

CLI::Option* cli_option_recipe(CLI::App& cmd, std::string& recipe) {
  return cmd.add_option("--recipe", recipe,
                        "Named recipe (translate: recipe 2 v2 of docs/experiments.md): its values fill the options "
                        "not given here")
      ->check(cli_recipe_check());
}

std::string cli_recipe_apply(CLI::App& cmd, const std::string& name, const std::vector<RecipeValue>& values) {
  std::vector<std::string> set, kept;
  for (const auto& rv : values) {
    CLI::Option* opt = cmd.get_option_no_throw("--" + rv.option);
    FLASHGPT_CHECK(opt != nullptr, "recipe {} sets --{}, which `{}` does not have", name, rv.option, cmd.get_name());
    if (opt->count() > 0) {
      kept.push_back(rv.option);
      continue;
    }
    if (rv.values.empty()) continue;
    try {
      opt->clear();
      opt->add_result(rv.values);
      opt->run_callback();
    } catch (const CLI::Error& e) {
      FLASHGPT_FAIL("recipe {}: --{} {}: {}", name, rv.option, fmt::join(rv.values, " "), e.what());
    }
    set.push_back(fmt::format("{}={}", rv.option,
                              rv.values.size() == 1 ? rv.values[0] : fmt::format("[{}]", fmt::join(rv.values, ","))));
  }
  std::string line = fmt::format("recipe {}: {}", name, fmt::join(set, " "));
  if (!kept.empty()) line += fmt::format("; given on the command line instead: {}", fmt::join(kept, " "));
  return line;
}

}  // namespace flashgpt

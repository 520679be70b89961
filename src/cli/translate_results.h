// What `eval translate` and `flashgpt run` keep of translate_evaluate's settings, written
// once: each setting's hypotheses in HYP_DIR/<direction>.<K>shot.txt, and the two arrays of
// translate.json: "results" (one object of scores per setting) and "examples" (the seed's
// prompts and their outputs).
#pragma once

#include <flashgpt/translate.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <vector>

namespace flashgpt {

struct TranslateResultsJson {
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  nlohmann::ordered_json examples = nlohmann::ordered_json::array();
};

// Writes the hypothesis files (atomically; HYP_DIR is created) and returns the arrays. BLEU
// and chrF are rounded to two decimals; with `name_hypotheses` each result names its file.
TranslateResultsJson translate_results_write(const std::vector<TranslateSetting>& settings,
                                             const std::filesystem::path& hyp_dir, bool name_hypotheses);

}  // namespace flashgpt

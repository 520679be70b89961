#include "translate_results.h"

#include <flashgpt/atomic_file.h>

#include <fmt/core.h>

#include <cmath>
#include <string>

namespace flashgpt {

TranslateResultsJson translate_results_write(const std::vector<TranslateSetting>& settings,
                                             const std::filesystem::path& hyp_dir, bool name_hypotheses) {
  auto two_decimals = [](double x) { return std::round(x * 100.0) / 100.0; };
  std::filesystem::create_directories(hyp_dir);
  TranslateResultsJson out;
  for (const auto& s : settings) {
    const std::string direction = translate_direction_name(s.direction);
    const auto hyp_path = hyp_dir / fmt::format("{}.{}shot.txt", direction, s.shots);
    std::string hyps;
    for (const auto& h : s.hypotheses) hyps += h + "\n";
    atomic_write_file(hyp_path, hyps);
    nlohmann::ordered_json r = {{"direction", direction},
                                {"shots", s.shots},
                                {"shots_mean", s.shots_mean},
                                {"prompts_shortened", s.prompts_shortened},
                                {"prompts_too_long", s.prompts_too_long},
                                {"bleu", two_decimals(s.bleu.score)},
                                {"chrf", two_decimals(s.chrf.score)},
                                {"bleu_line", s.bleu.line()},
                                {"chrf_line", s.chrf.line()}};
    if (name_hypotheses) r["hypotheses"] = hyp_path.string();
    r["generated_tokens"] = s.generated_tokens;
    r["seconds"] = s.seconds;
    out.results.push_back(std::move(r));
    for (const auto& e : s.examples) {
      out.examples.push_back({{"direction", direction}, {"shots", s.shots}, {"source", e.source}, {"output", e.output}});
    }
  }
  return out;
}

}  // namespace flashgpt

// `flashgpt eval bleu --ref FILE --hyp FILE`: corpus BLEU and chrF2 of two plain-text
// files (one segment per line), equal to sacreBLEU's, with sacreBLEU's signatures.
#include "commands.h"

#include <flashgpt/error.h>
#include <flashgpt/eval.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <memory>

namespace flashgpt {
namespace {

struct EvalBleuOptions {
  std::string ref, hyp;
  std::string tokenize = "13a";
  bool lowercase = false;       // BLEU only, as sacreBLEU's -lc
  bool chrf_lowercase = false;  // as sacreBLEU's --chrf-lowercase
  bool json = false;
};

// The score as sacreBLEU prints it and puts in its JSON: rounded to two decimals.
double two_decimals(double score) { return std::strtod(fmt::format("{:.2f}", score).c_str(), nullptr); }

void run_eval_bleu(const EvalBleuOptions& o) {
  fmt::print(stderr, "eval bleu: ref={} hyp={} tokenize={} lowercase={} chrf_lowercase={} json={}\n", o.ref, o.hyp,
             o.tokenize, o.lowercase, o.chrf_lowercase, o.json);
  BleuOptions bleu_options;
  bleu_options.tokenize = bleu_tokenize_from_name(o.tokenize);
  bleu_options.lowercase = o.lowercase;
  ChrfOptions chrf_options;
  chrf_options.lowercase = o.chrf_lowercase;
  const std::vector<std::string> refs = eval_read_lines(o.ref);
  const std::vector<std::string> hyps = eval_read_lines(o.hyp);
  FLASHGPT_CHECK(hyps.size() == refs.size(), "--hyp {} has {} lines but --ref {} has {}: one hypothesis per reference",
                 o.hyp, hyps.size(), o.ref, refs.size());
  const BleuScore bleu = corpus_bleu(hyps, refs, bleu_options);
  const ChrfScore chrf = corpus_chrf(hyps, refs, chrf_options);
  if (!o.json) {
    fmt::print("{}\n{}\n", bleu.line(), chrf.line());
    return;
  }
  nlohmann::ordered_json j;
  j["bleu"] = two_decimals(bleu.score);
  j["chrf"] = two_decimals(chrf.score);
  j["signature"] = {{"bleu", bleu.signature}, {"chrf", chrf.signature}};
  j["bleu_score"] = bleu.score;
  j["chrf_score"] = chrf.score;
  j["bleu_verbose"] = bleu.verbose();
  j["precisions"] = bleu.precisions;
  j["counts"] = bleu.stats.correct;
  j["totals"] = bleu.stats.total;
  j["bp"] = bleu.bp;
  j["ratio"] = bleu.ratio;
  j["hyp_len"] = bleu.stats.hyp_len;
  j["ref_len"] = bleu.stats.ref_len;
  j["segments"] = hyps.size();
  fmt::print("{}\n", j.dump(1));
}

}  // namespace

void cli_add_eval_bleu(CLI::App& eval) {
  auto options = std::make_shared<EvalBleuOptions>();
  auto* b = eval.add_subcommand("bleu", "Corpus BLEU and chrF2 of a hypothesis file against a reference file");
  b->add_option("--ref", options->ref, "Reference file, one segment per line (UTF-8)")->required();
  b->add_option("--hyp", options->hyp, "Hypothesis file, as many lines as --ref (UTF-8)")->required();
  b->add_option("--tokenize", options->tokenize, "BLEU tokenizer (sacreBLEU's 13a or intl)")
      ->capture_default_str()->check(CLI::IsMember({"13a", "intl"}));
  b->add_flag("--lowercase", options->lowercase, "Lowercase BLEU (sacreBLEU's -lc; chrF stays cased)");
  b->add_flag("--chrf-lowercase", options->chrf_lowercase, "Lowercase chrF (sacreBLEU's --chrf-lowercase)");
  b->add_flag("--json", options->json,
              "Print a JSON object: bleu, chrf (two decimals, as sacreBLEU's JSON), signature {bleu, chrf}, the "
              "full-precision scores and BLEU's statistics");
  b->callback([options] { run_eval_bleu(*options); });
}

}  // namespace flashgpt

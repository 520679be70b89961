// `flashgpt eval <what>`: scoring translations. Each subcommand lives in its own file.
#include "commands.h"

namespace flashgpt {

void cli_add_eval(CLI::App& app) {
  auto* eval = app.add_subcommand("eval", "Score translations (BLEU and chrF as sacreBLEU computes them)");
  eval->require_subcommand(1);
  cli_add_eval_bleu(*eval);
}

}  // namespace flashgpt

// `flashgpt bench <what>`: the measuring harnesses. Each one validates before it times.
#include "commands.h"

namespace flashgpt {

void cli_add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Validate, then time, a component against its peers");
  bench->require_subcommand(1);
  cli_add_bench_attention(*bench);
  cli_add_bench_tokenizer(*bench);
  cli_add_bench_data(*bench);
  cli_add_bench_train(*bench);
  cli_add_bench_generate(*bench);
}

}  // namespace flashgpt

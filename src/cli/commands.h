// Each subcommand registers itself on the root app from its own file; main() lists them.
// A subcommand owns one config struct filled by its option table and prints it at start.
#pragma once

#include <CLI/CLI.hpp>

namespace flashgpt {

// Thrown by a subcommand that ends on purpose with a non-zero status (e.g. `train` stopped
// by a signal after writing its checkpoint); main() returns `code`.
struct CliExit {
  int code = 0;
};

void cli_add_version(CLI::App& app);
void cli_add_bench(CLI::App& app);
void cli_add_tokenize(CLI::App& app);
void cli_add_data(CLI::App& app);
void cli_add_eval(CLI::App& app);
void cli_add_train(CLI::App& app);
void cli_add_export(CLI::App& app);
void cli_add_generate(CLI::App& app);
void cli_add_run(CLI::App& app);  // the whole system: data, train, eval, report

// Subcommands of `bench`, each from its own file; cli_add_bench adds them.
void cli_add_bench_attention(CLI::App& bench);
void cli_add_bench_tokenizer(CLI::App& bench);
void cli_add_bench_data(CLI::App& bench);
void cli_add_bench_train(CLI::App& bench);
void cli_add_bench_generate(CLI::App& bench);

// Subcommands of `eval`, each from its own file; cli_add_eval adds them.
void cli_add_eval_bleu(CLI::App& eval);
void cli_add_eval_translate(CLI::App& eval);

}  // namespace flashgpt

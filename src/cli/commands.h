// Each subcommand registers itself on the root app from its own file; main() lists them.
// A subcommand owns one config struct filled by its option table and prints it at start.
#pragma once

#include <CLI/CLI.hpp>

namespace flashgpt {

void cli_add_version(CLI::App& app);
void cli_add_bench(CLI::App& app);
void cli_add_data(CLI::App& app);
// `flashgpt bench data`, added under the `bench` subcommand.
void cli_add_bench_data(CLI::App& bench);
void cli_add_tokenize(CLI::App& app);
// `flashgpt bench tokenizer`, added under the `bench` subcommand.
void cli_add_bench_tokenizer(CLI::App& bench);

}  // namespace flashgpt

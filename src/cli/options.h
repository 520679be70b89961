// The options several commands share, declared once: one spelling, one help text and one
// rule for the default, whatever command adds them. And the start-up line of every command,
// generated from its option table instead of typed again by hand.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

namespace flashgpt {

// --tokenizer-dir DIR: the folder of ENCODING.tiktoken and ENCODING.meta.json. The old
// spelling --vocab-dir still works (hidden from --help, with a warning).
CLI::Option* cli_option_tokenizer_dir(CLI::App& cmd, std::string& dir);
// -e,--encoding NAME: r50k_base, cl100k_base or o200k_base.
CLI::Option* cli_option_encoding(CLI::App& cmd, std::string& encoding);
// --data-dir DIR: the root of the corpora (wmt14/, extra/, tokenizers/).
CLI::Option* cli_option_data_dir(CLI::App& cmd, std::string& dir);
// --threads N (0: all cores); `what` names the work the threads do.
CLI::Option* cli_option_threads(CLI::App& cmd, int& threads, const std::string& what);
// --seed N; `what` names what the seed decides.
CLI::Option* cli_option_seed(CLI::App& cmd, uint64_t& seed, const std::string& what);
// -o,--out PATH; `what` names what is written there. `old_spelling` (e.g. "--output"), when
// given, still works (hidden, with a warning).
CLI::Option* cli_option_out(CLI::App& cmd, std::string& out, const std::string& what,
                            const std::string& old_spelling = "");

// The defaults of the shared options, resolved the same way by every command:
// --tokenizer-dir, else FLASHGPT_TOKENIZER_DIR, else DATA/tokenizers where it exists (DATA:
// `data_dir` when the command has one, else FLASHGPT_DATA_DIR or ../shared/data), else empty
// (the tokenizer then searches its download caches and downloads).
std::filesystem::path cli_tokenizer_dir(const std::string& given, const std::filesystem::path& data_dir = {});
// --data-dir, else FLASHGPT_DATA_DIR, else ../shared/data above the working directory; an
// error saying so when none is there.
std::filesystem::path cli_data_dir(const std::string& given);

// "name=value name=value ..." for every option of `cmd`, as parsed or defaulted, in the
// order of its option table (lists as [a,b], flags as true/false).
std::string cli_config_text(CLI::App& cmd);
// "<command path>: <cli_config_text>": the configuration a command runs with, printed at
// its start (on stderr unless `to` says otherwise).
void cli_config_print(CLI::App& cmd, std::FILE* to = stderr);

// scripts/NAME of the source tree (FLASHGPT_SOURCE_DIR in the environment, else the one this
// binary was built from).
std::filesystem::path cli_script_path(const char* name);
// Runs `python3 SCRIPT JSON PNG` from an argument vector; the PNG is published atomically
// only when drawn. A missing python3 or matplotlib is a warning on stderr and false.
bool cli_plot_draw(const std::filesystem::path& script, const std::filesystem::path& json,
                   const std::filesystem::path& png);

}  // namespace flashgpt

// `flashgpt tokenize`: encode a file (or stdin) as one text, decode ids back to text, or
// count tokens, with tiktoken's encodings.
#include "commands.h"
#include "option_checks.h"
#include "options.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>

namespace flashgpt {

namespace {

struct TokenizeConfig {
  std::string encoding;
  std::string input = "-";
  std::string output = "-";
  std::string tokenizer_dir;
  std::string format = "text";        // text or u32 (TokenIdFormat)
  bool decode = false;
  bool count = false;
  int threads = 0;
  std::string invalid_utf8 = "error";  // error or replace (InvalidUtf8)
  std::string allowed_special;  // comma-separated, or "all"
  bool verbose = false;
};

std::string input_read(const std::string& path) {
  if (path == "-") {
    std::ostringstream buffer;
    buffer << std::cin.rdbuf();
    return std::move(buffer).str();
  }
  std::error_code ec;
  FLASHGPT_CHECK(!std::filesystem::is_directory(path, ec), "the input {} is a directory, not a file", path);
  std::ifstream in(path, std::ios::binary);
  FLASHGPT_CHECK(in, "cannot open {}: {}", path, std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  FLASHGPT_CHECK(!in.bad(), "cannot read {}", path);
  return std::move(buffer).str();
}

// A file is replaced whole (temporary file, fsync, rename) or not at all.
void output_write(const std::string& path, std::string_view bytes) {
  if (path != "-") return atomic_write_file(path, bytes);
  const size_t written = std::fwrite(bytes.data(), 1, bytes.size(), stdout);
  FLASHGPT_CHECK(written == bytes.size() && std::fflush(stdout) == 0, "cannot write to stdout: {}",
                 std::strerror(errno));
}

// --allowed-special: "all", or comma-separated names, each a special token of the encoding.
SpecialTokenPolicy special_policy_parse(const std::string& allowed, const Tokenizer& tokenizer) {
  SpecialTokenPolicy policy;
  policy.allow_all = allowed == "all";
  for (size_t start = 0; !policy.allow_all && start <= allowed.size();) {
    size_t comma = std::min(allowed.find(',', start), allowed.size());
    std::string name = allowed.substr(start, comma - start);
    start = comma + 1;
    if (!tokenizer.special_token(name))
      FLASHGPT_FAIL("--allowed-special: '{}' is not a special token of {} (its special tokens: {}, or 'all')", name,
                    tokenizer.name(), fmt::join(tokenizer.special_tokens(), ", "));
    policy.allowed.push_back(std::move(name));
  }
  return policy;
}

void tokenize_encode_or_decode(const TokenizeConfig& config);

void tokenize_run(const TokenizeConfig& config) {
  try {
    tokenize_encode_or_decode(config);
  } catch (const std::bad_alloc&) {
    FLASHGPT_FAIL("out of memory tokenizing {} (a text needs about 3 times its size, ids included)", config.input);
  }
}

void tokenize_encode_or_decode(const TokenizeConfig& config) {
  const TokenIdFormat format = config.format == "u32" ? TokenIdFormat::u32 : TokenIdFormat::text;
  const InvalidUtf8 invalid = config.invalid_utf8 == "replace" ? InvalidUtf8::replace : InvalidUtf8::error;
  Tokenizer tokenizer = Tokenizer::load(config.encoding, cli_tokenizer_dir(config.tokenizer_dir));
  std::string input = input_read(config.input);
  if (config.decode) {
    output_write(config.output, tokenizer.decode(token_ids_parse(input, format)));
    return;
  }
  std::vector<TokenId> ids;
  if (!config.allowed_special.empty()) {
    ids = tokenizer.encode(input, special_policy_parse(config.allowed_special, tokenizer), invalid);
  } else if (config.threads == 1) {
    ids = tokenizer.encode_ordinary(input, invalid);
  } else {
    ids = tokenizer.encode_ordinary_parallel(input, config.threads, invalid);
  }
  if (config.count) {
    output_write(config.output, fmt::format("{}\n", ids.size()));
    return;
  }
  output_write(config.output, token_ids_format(ids, format));
}

}  // namespace

void cli_add_tokenize(CLI::App& app) {
  auto config = std::make_shared<TokenizeConfig>();
  auto* cmd = app.add_subcommand("tokenize", "Encode a text as tiktoken does (the whole input as one text), decode ids, or count tokens");
  cli_option_encoding(*cmd, config->encoding)->required();
  cmd->add_option("input", config->input, "Input file, '-' for stdin")->capture_default_str();
  cli_option_out(*cmd, config->output, "Output file, '-' for stdout", /*old_spelling=*/"--output");
  cli_option_tokenizer_dir(*cmd, config->tokenizer_dir);
  cmd->add_option("--format", config->format, "Token ids as 'text' (decimal, space-separated) or 'u32' (little-endian)")
      ->check(CLI::IsMember({"text", "u32"}))
      ->capture_default_str();
  auto* decode = cmd->add_flag("--decode", config->decode, "Read token ids and write the text they stand for");
  cmd->add_flag("--count", config->count, "Print the number of tokens instead of the ids")->excludes(decode);
  static_assert(kCliMaxThreads == kMaxEncodeThreads, "the CLI refuses what the encoders would");
  cli_option_threads(*cmd, config->threads, "Worker threads");
  cmd->add_option("--invalid-utf8", config->invalid_utf8, "Invalid UTF-8 in the input: 'error' or 'replace' (with U+FFFD)")
      ->check(CLI::IsMember({"error", "replace"}))
      ->capture_default_str();
  cmd->add_option("--allowed-special", config->allowed_special,
                  "Special tokens to encode as their ids, comma-separated ('all' for every one); the others are "
                  "an error, as in tiktoken's encode()")
;
  cmd->add_flag("-v,--verbose", config->verbose, "Print the configuration to stderr first");
  cmd->callback([cmd, config] {
    if (config->verbose) cli_config_print(*cmd);
    tokenize_run(*config);
  });
}

}  // namespace flashgpt

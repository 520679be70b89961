// `flashgpt tokenize`: encode a file (or stdin) as one text, decode ids back to text, or
// count tokens, with tiktoken's encodings.
#include "commands.h"

#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>

namespace flashgpt {

namespace {

enum class IdFormat { text, u32 };

struct TokenizeConfig {
  std::string encoding;
  std::string input = "-";
  std::string output = "-";
  std::string vocab_dir;
  IdFormat format = IdFormat::text;
  bool decode = false;
  bool count = false;
  int threads = 0;
  InvalidUtf8 invalid = InvalidUtf8::error;
  std::string allowed_special;  // comma-separated, or "all"
  bool verbose = false;
};

std::string input_read(const std::string& path) {
  if (path == "-") {
    std::ostringstream buffer;
    buffer << std::cin.rdbuf();
    return std::move(buffer).str();
  }
  std::ifstream in(path, std::ios::binary);
  FLASHGPT_CHECK(in, "cannot open {}", path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  FLASHGPT_CHECK(!in.bad(), "cannot read {}", path);
  return std::move(buffer).str();
}

void output_write(const std::string& path, std::string_view bytes) {
  std::FILE* out = path == "-" ? stdout : std::fopen(path.c_str(), "wb");
  FLASHGPT_CHECK(out, "cannot open {} for writing", path);
  size_t written = std::fwrite(bytes.data(), 1, bytes.size(), out);
  int closed = path == "-" ? std::fflush(out) : std::fclose(out);
  FLASHGPT_CHECK(written == bytes.size() && closed == 0, "cannot write {}", path);
}

std::vector<TokenId> ids_parse(const std::string& input, IdFormat format) {
  std::vector<TokenId> ids;
  if (format == IdFormat::u32) {
    FLASHGPT_CHECK(input.size() % 4 == 0, "u32 input has {} bytes, not a multiple of 4", input.size());
    ids.resize(input.size() / 4);
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto* b = reinterpret_cast<const uint8_t*>(input.data() + 4 * i);
      ids[i] = TokenId(b[0]) | TokenId(b[1]) << 8 | TokenId(b[2]) << 16 | TokenId(b[3]) << 24;
    }
    return ids;
  }
  const char* p = input.data();
  const char* end = p + input.size();
  while (p < end) {
    if (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ',') {
      ++p;
      continue;
    }
    TokenId id;
    auto [next, ec] = std::from_chars(p, end, id);
    FLASHGPT_CHECK(ec == std::errc(), "expected a token id at byte {} of the input", p - input.data());
    ids.push_back(id);
    p = next;
  }
  return ids;
}

std::string ids_format(std::span<const TokenId> ids, IdFormat format) {
  std::string out;
  if (format == IdFormat::u32) {
    out.resize(ids.size() * 4);
    for (size_t i = 0; i < ids.size(); ++i)
      for (int k = 0; k < 4; ++k) out[4 * i + k] = char((ids[i] >> (8 * k)) & 0xFF);
    return out;
  }
  out.reserve(ids.size() * 6 + 1);
  char buffer[16];
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ' ';
    auto [end, ec] = std::to_chars(buffer, buffer + sizeof(buffer), ids[i]);
    out.append(buffer, end);
  }
  out += '\n';
  return out;
}

void tokenize_run(const TokenizeConfig& config) {
  if (config.verbose)
    fmt::print(stderr,
               "tokenize: encoding={} input={} output={} vocab_dir='{}' format={} decode={} count={} threads={} "
               "invalid_utf8={} allowed_special={}\n",
               config.encoding, config.input, config.output, config.vocab_dir,
               config.format == IdFormat::u32 ? "u32" : "text", config.decode, config.count, config.threads,
               config.invalid == InvalidUtf8::replace ? "replace" : "error", config.allowed_special);
  Tokenizer tokenizer = Tokenizer::load(config.encoding, config.vocab_dir);
  std::string input = input_read(config.input);
  if (config.decode) {
    output_write(config.output, tokenizer.decode(ids_parse(input, config.format)));
    return;
  }
  std::vector<TokenId> ids;
  if (!config.allowed_special.empty()) {
    SpecialTokenPolicy policy;
    policy.allow_all = config.allowed_special == "all";
    for (size_t start = 0; !policy.allow_all && start <= config.allowed_special.size();) {
      size_t comma = std::min(config.allowed_special.find(',', start), config.allowed_special.size());
      policy.allowed.push_back(config.allowed_special.substr(start, comma - start));
      start = comma + 1;
    }
    ids = tokenizer.encode(input, policy, config.invalid);
  } else if (config.threads == 1) {
    ids = tokenizer.encode_ordinary(input, config.invalid);
  } else {
    ids = tokenizer.encode_ordinary_parallel(input, config.threads, config.invalid);
  }
  if (config.count) {
    output_write(config.output, fmt::format("{}\n", ids.size()));
    return;
  }
  output_write(config.output, ids_format(ids, config.format));
}

}  // namespace

void cli_add_tokenize(CLI::App& app) {
  auto config = std::make_shared<TokenizeConfig>();
  auto* cmd = app.add_subcommand("tokenize", "Encode a text as tiktoken does (the whole input as one text), decode ids, or count tokens");
  cmd->add_option("-e,--encoding", config->encoding, "r50k_base, cl100k_base or o200k_base")->required();
  cmd->add_option("input", config->input, "Input file, '-' for stdin")->capture_default_str();
  cmd->add_option("-o,--output", config->output, "Output file, '-' for stdout")->capture_default_str();
  cmd->add_option("--vocab-dir", config->vocab_dir,
                  "Directory of ENCODING.tiktoken and ENCODING.meta.json (default: $FLASHGPT_TOKENIZER_DIR)");
  cmd->add_option("--format", config->format, "Token ids as 'text' (decimal, space-separated) or 'u32' (little-endian)")
      ->transform(CLI::CheckedTransformer(std::map<std::string, IdFormat>{{"text", IdFormat::text}, {"u32", IdFormat::u32}}))
      ->option_text("text|u32 (default: text)");
  cmd->add_flag("--decode", config->decode, "Read token ids and write the text they stand for");
  cmd->add_flag("--count", config->count, "Print the number of tokens instead of the ids");
  cmd->add_option("--threads", config->threads, "Worker threads (0: all cores)")->capture_default_str();
  cmd->add_option("--invalid-utf8", config->invalid, "Invalid UTF-8 in the input: 'error' or 'replace' (with U+FFFD)")
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, InvalidUtf8>{{"error", InvalidUtf8::error}, {"replace", InvalidUtf8::replace}}))
      ->option_text("error|replace (default: error)");
  cmd->add_option("--allowed-special", config->allowed_special,
                  "Special tokens to encode as their ids, comma-separated ('all' for every one); the others are "
                  "an error, as in tiktoken's encode()")
;
  cmd->add_flag("-v,--verbose", config->verbose, "Print the configuration to stderr first");
  cmd->callback([config] { tokenize_run(*config); });
}

}  // namespace flashgpt

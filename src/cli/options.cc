#include "options.h"

#include "option_checks.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/error.h>
#include <flashgpt/process.h>

#include <fmt/core.h>

#include <cstdlib>
#include <vector>

namespace flashgpt {
namespace {

// A hidden second option for a renamed one: fills the same variable, warns once per use.
void add_deprecated_spelling(CLI::App& cmd, const std::string& old_name, const std::string& new_name,
                             std::string& target) {
  cmd.add_option(old_name, target, "deprecated: use " + new_name)
      ->group("")  // hidden from --help
      ->each([old_name, new_name](const std::string&) {
        fmt::print(stderr, "warning: {} is deprecated; use {}\n", old_name, new_name);
      });
}

}  // namespace

CLI::Option* cli_option_tokenizer_dir(CLI::App& cmd, std::string& dir) {
  auto* opt = cmd.add_option("--tokenizer-dir", dir,
                             "Folder of ENCODING.tiktoken and ENCODING.meta.json (default: FLASHGPT_TOKENIZER_DIR, "
                             "else DATA/tokenizers, else the download cache)");
  add_deprecated_spelling(cmd, "--vocab-dir", "--tokenizer-dir", dir);
  return opt;
}

CLI::Option* cli_option_encoding(CLI::App& cmd, std::string& encoding) {
  return cmd.add_option("-e,--encoding", encoding, "Tokenizer encoding: r50k_base, cl100k_base or o200k_base")
      ->capture_default_str();
}

CLI::Option* cli_option_data_dir(CLI::App& cmd, std::string& dir) {
  return cmd.add_option("--data-dir", dir, "Corpora root with wmt14/ and extra/ (default: FLASHGPT_DATA_DIR, else "
                                           "../shared/data)");
}

CLI::Option* cli_option_threads(CLI::App& cmd, int& threads, const std::string& what) {
  return cmd.add_option("--threads", threads, what + " (0: all cores)")->check(cli_thread_count())->capture_default_str();
}

CLI::Option* cli_option_seed(CLI::App& cmd, uint64_t& seed, const std::string& what) {
  return cmd.add_option("--seed", seed, "Seed of " + what)->check(cli_unsigned_integer())->capture_default_str();
}

CLI::Option* cli_option_out(CLI::App& cmd, std::string& out, const std::string& what, const std::string& old_spelling) {
  auto* opt = cmd.add_option("-o,--out", out, what)->capture_default_str();
  if (!old_spelling.empty()) add_deprecated_spelling(cmd, old_spelling, "--out", out);
  return opt;
}

std::filesystem::path cli_tokenizer_dir(const std::string& given, const std::filesystem::path& data_dir) {
  if (!given.empty()) return given;
  if (const char* env = std::getenv("FLASHGPT_TOKENIZER_DIR"); env && *env) return env;
  const auto data = data_dir.empty() ? data_dir_default() : data_dir;
  if (!data.empty() && std::filesystem::is_directory(data / "tokenizers")) return data / "tokenizers";
  return {};
}

std::filesystem::path cli_data_dir(const std::string& given) {
  if (!given.empty()) return given;
  const auto dir = data_dir_default();
  FLASHGPT_CHECK(!dir.empty(), "no data directory: pass --data-dir or set FLASHGPT_DATA_DIR (none at ../shared/data)");
  return dir;
}

std::string cli_config_text(CLI::App& cmd) {
  std::string text;
  for (CLI::Option* opt : cmd.get_options()) {
    if (opt->get_group().empty() || opt == cmd.get_help_ptr()) continue;  // hidden aliases, --help
    std::string value;
    if (opt->get_expected_max() == 0) {  // a flag: given or not
      value = opt->count() > 0 ? "true" : "false";
    } else {
      opt->capture_default_str();  // the bound variable's value now, as parsed or defaulted
      value = opt->get_default_str();
    }
    text += fmt::format("{}{}={}", text.empty() ? "" : " ", opt->get_single_name(), value);
  }
  return text;
}

void cli_config_print(CLI::App& cmd, std::FILE* to) {
  std::vector<std::string> path;
  for (const CLI::App* app = &cmd; app && app->get_parent(); app = app->get_parent()) path.insert(path.begin(), app->get_name());
  std::string name;
  for (const auto& part : path) name += (name.empty() ? "" : " ") + part;
  fmt::print(to, "{}: {}\n", name, cli_config_text(cmd));
}

std::filesystem::path cli_script_path(const char* name) {
  const char* source = std::getenv("FLASHGPT_SOURCE_DIR");
  return std::filesystem::path(source && *source ? source : FLASHGPT_SOURCE_DIR) / "scripts" / name;
}

bool cli_plot_draw(const std::filesystem::path& script, const std::filesystem::path& json,
                   const std::filesystem::path& png) {
  const auto tmp = atomic_temp_path(png);
  int status = -1;
  try {
    status = process_run({"python3", script.string(), json.string(), tmp.string()});
  } catch (const Error& e) {
    fmt::print(stderr, "warning: {}\n", e.what());
  }
  if (status == 0 && std::filesystem::exists(tmp)) {
    atomic_publish(tmp, png);
    return true;
  }
  std::error_code ignored;
  std::filesystem::remove(tmp, ignored);
  fmt::print(stderr, "warning: {} was not drawn ({} exited with {}; it needs python3 and matplotlib)\n", png.string(),
             script.string(), status);
  return false;
}

}  // namespace flashgpt

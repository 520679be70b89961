// `flashgpt bench tokenizer`: times encode_ordinary on one thread, encode_ordinary_parallel
// and encode_ordinary_batch on all cores, after checking that the three give the same ids.
// bench/tokenizer_bench.py runs it beside tiktoken on the same bytes.
#include "commands.h"
#include "options.h"

#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <memory>
#include <sstream>

namespace flashgpt {

namespace {

struct BenchTokenizerConfig {
  std::string encoding = "cl100k_base";
  std::vector<std::string> inputs;
  std::string tokenizer_dir;
  int threads = 0;
  int repeat = 3;
  int doc_lines = 64;
  bool warm = false;  // also time a second single-thread pass (piece cache warm)
  bool single_only = false;
};

// Documents for the batch API: every `lines` lines, newlines kept (the Python bench cuts
// the same bytes the same way).
std::vector<std::string_view> documents_split(std::string_view text, int lines) {
  std::vector<std::string_view> docs;
  size_t start = 0, pos = 0;
  int count = 0;
  while (pos < text.size()) {
    size_t newline = text.find('\n', pos);
    pos = newline == std::string_view::npos ? text.size() : newline + 1;
    if (++count == lines || pos == text.size()) {
      docs.push_back(text.substr(start, pos - start));
      start = pos, count = 0;
    }
  }
  return docs;
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Each run gets a freshly loaded tokenizer, so its per-thread piece caches start cold: the
// timing is that of a first pass over the text, not of a text seen before.
// `cpu_best` (when given) gets the best CPU time of the calling thread: on a shared machine
// it leaves out the time the thread waited for a core.
template <class F>
double seconds_best(const BenchTokenizerConfig& config, F&& f, double* cpu_best = nullptr) {
  double best = 1e30;
  if (cpu_best) *cpu_best = 1e30;
  for (int r = 0; r < config.repeat; ++r) {
    Tokenizer tokenizer = Tokenizer::load(config.encoding, cli_tokenizer_dir(config.tokenizer_dir));
    double cpu0 = thread_cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    f(tokenizer);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (cpu_best) *cpu_best = std::min(*cpu_best, thread_cpu_seconds() - cpu0);
  }
  return best;
}

void bench_tokenizer_run(const BenchTokenizerConfig& config) {
  int threads = config.threads > 0 ? config.threads : omp_get_num_procs();
  std::string text;
  for (const auto& path : config.inputs) {
    std::ifstream in(path, std::ios::binary);
    FLASHGPT_CHECK(in, "cannot open {}", path);
    std::ostringstream buffer;
    buffer << in.rdbuf();
    text += std::move(buffer).str();
  }
  auto docs = documents_split(text, config.doc_lines);

  std::vector<TokenId> single, parallel;
  std::vector<std::vector<TokenId>> batch;
  double cpu_single;
  double t_single = seconds_best(config, [&](const Tokenizer& t) { single = t.encode_ordinary(text); }, &cpu_single);
  double t_parallel = 0, t_batch = 0;
  if (!config.single_only) {
    t_parallel =
        seconds_best(config, [&](const Tokenizer& t) { parallel = t.encode_ordinary_parallel(text, threads); });
    t_batch = seconds_best(config, [&](const Tokenizer& t) { batch = t.encode_ordinary_batch(docs, threads); });
    FLASHGPT_CHECK(parallel == single, "encode_ordinary_parallel differs from encode_ordinary");
  }
  // A second pass over the same text on the same thread and tokenizer: every piece that
  // needed merging is in the piece cache, so this times the lookups without the merges.
  double cpu_warm = 1e30;
  if (config.warm) {
    std::vector<TokenId> warm;
    seconds_best(config, [&](const Tokenizer& t) {
      warm = t.encode_ordinary(text);
      double cpu0 = thread_cpu_seconds();
      warm = t.encode_ordinary(text);
      cpu_warm = std::min(cpu_warm, thread_cpu_seconds() - cpu0);
    });
    FLASHGPT_CHECK(warm == single, "a second pass gave other ids than the first");
  }
  size_t batch_tokens = 0;
  for (const auto& ids : batch) batch_tokens += ids.size();
  double mb = double(text.size()) / 1e6;
  fmt::print(
      "{{\"encoding\": \"{}\", \"bytes\": {}, \"tokens\": {}, \"threads\": {}, \"single_mb_s\": {:.3f}, "
      "\"single_cpu_mb_s\": {:.3f}{}{}}}\n",
      config.encoding, text.size(), single.size(), threads, mb / t_single, mb / cpu_single,
      config.single_only ? ""
                         : fmt::format(", \"documents\": {}, \"batch_tokens\": {}, \"parallel_mb_s\": {:.3f}, "
                                       "\"batch_mb_s\": {:.3f}",
                                       docs.size(), batch_tokens, mb / t_parallel, mb / t_batch),
      config.warm ? fmt::format(", \"single_warm_cpu_mb_s\": {:.3f}", mb / cpu_warm) : "");
}

}  // namespace

void cli_add_bench_tokenizer(CLI::App& bench) {
  auto config = std::make_shared<BenchTokenizerConfig>();
  auto* cmd = bench.add_subcommand("tokenizer", "Tokenizer throughput (MB/s) on one thread and on all cores");
  cli_option_encoding(*cmd, config->encoding);
  cmd->add_option("inputs", config->inputs, "Text files, joined into one text")->required();
  cli_option_tokenizer_dir(*cmd, config->tokenizer_dir);
  cli_option_threads(*cmd, config->threads, "Workers for the all-core runs");
  cmd->add_option("--repeat", config->repeat, "Timed runs of each; the best counts")->capture_default_str();
  cmd->add_option("--doc-lines", config->doc_lines, "Lines per document for the batch API")->capture_default_str();
  cmd->add_flag("--warm", config->warm,
                "Also time a second single-thread pass over the text (its pieces already in the piece cache)");
  cmd->add_flag("--single-only", config->single_only, "Time the single-thread encode only (no all-core runs)");
  cmd->callback([cmd, config] {
    cli_config_print(*cmd);
    bench_tokenizer_run(*config);
  });
}

}  // namespace flashgpt

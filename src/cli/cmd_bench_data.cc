// `flashgpt bench data`: prepare throughput end to end (MB of raw text per second) and the
// time spent reading (decompression, checks, document building), tokenizing and writing
// (stages that overlap: reading runs beside tokenizing + writing). Each run is validated first: every shard re-read with its checksum, and the
// documents written equal to the pairs used.
#include "commands.h"
#include "option_checks.h"
#include "options.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <thread>

namespace flashgpt {
namespace {

struct BenchDataConfig {
  std::string data_dir;
  std::vector<std::string> pairs;
  std::string encoding = "cl100k_base";
  std::string tokenizer_dir;
  std::string work = "results/bench_data_work";
  std::string out = "results/bench_data.json";
  int threads = 0;
  int repeat = 1;
  bool no_prefetch = false;
};

void run_bench_data(const BenchDataConfig& o) {
  const std::filesystem::path data = cli_data_dir(o.data_dir);
  PrepareConfig config;
  if (o.pairs.empty()) {
    // The benchmark: the shared Europarl and the WMT14 training files.
    config.pairs = default_pair_sources(data);
    std::erase_if(config.pairs, [](const PairSource& p) {
      const std::string name = p.name();
      return !name.starts_with("train.europarl") && p.en.parent_path().filename() != "wmt14";
    });
  } else {
    for (const auto& p : o.pairs) config.pairs.push_back(pair_source_from_path(p));
  }
  config.eval_dir = data / "wmt14";
  config.handle_signals = true;
  config.out_dir = o.work;
  config.threads = o.threads;
  config.progress = false;
  config.prefetch = o.no_prefetch ? Prefetch::no : Prefetch::yes;
  std::vector<std::string> names;
  for (const auto& p : config.pairs) names.push_back(p.name());
  const unsigned cores = std::thread::hardware_concurrency();
  fmt::print(stderr, "bench data: reading [{}] on {} cores\n", fmt::join(names, ","), cores);
  const Tokenizer tokenizer = Tokenizer::load(o.encoding, cli_tokenizer_dir(o.tokenizer_dir, data));
  const TextEncoder encoder = text_encoder_from(tokenizer);

  nlohmann::ordered_json runs = nlohmann::ordered_json::array();
  PrepareSummary best;
  for (int r = 0; r < o.repeat; ++r) {
    const PrepareSummary s = data_prepare(config, encoder);
    // Validate: every shard reads back with a good checksum; one document per pair used.
    uint64_t eot = 0, used = 0;
    for (const auto* list : {&s.train_shards, &s.val_shards}) {
      for (const auto& info : *list) {
        const ShardView shard(info.path, VerifyPayload::yes);
        eot += std::count(shard.tokens().begin(), shard.tokens().end(), shard.header().end_of_text);
      }
    }
    for (const auto& c : s.corpora) used += c.used;
    FLASHGPT_CHECK(eot == used && eot == s.documents + s.val_documents,
                   "bench data: {} documents in the shards but {} pairs used", eot, used);
    runs.push_back(nlohmann::ordered_json::parse(prepare_summary_json(s)));
    if (r == 0 || s.seconds_total < best.seconds_total) best = s;
  }
  const double total = best.seconds_total, mb = best.raw_bytes / 1e6;
  const double busy = best.seconds_read + best.seconds_tokenize + best.seconds_write;
  fmt::print("prepare throughput: {:.1f} MB raw text in {:.2f} s = {:.2f} MB/s on {} cores ({} tokens)\n", mb, total,
             mb / total, cores, best.tokens_en + best.tokens_fr + best.tokens_bilingual + best.tokens_eot);
  fmt::print("  busy time per stage; reading runs beside tokenizing + writing, so the read share of the\n"
             "  wall time is the critical path and the shares of the wall time add up to more than 100%:\n");
  fmt::print("  {:<38} {:>7} {:>9} {:>9}\n", "stage", "seconds", "% wall", "% busy");
  auto row = [&](const char* stage, double seconds) {
    fmt::print("  {:<38} {:>7.2f} {:>8.1f}% {:>8.1f}%\n", stage, seconds, 100 * seconds / total, 100 * seconds / busy);
  };
  row("read (decompress, checks, documents)", best.seconds_read);
  row("tokenize", best.seconds_tokenize);
  row("write (shards, CRC-32)", best.seconds_write);
  nlohmann::ordered_json result;
  result["cores"] = cores;
  result["threads"] = o.threads;
  result["prefetch"] = !o.no_prefetch;
  result["encoding"] = o.encoding;
  result["inputs"] = names;
  result["best_mb_per_second"] = mb / total;
  result["runs"] = runs;
  if (const auto parent = std::filesystem::path(o.out).parent_path(); !parent.empty()) {
    std::filesystem::create_directories(parent);
  }
  atomic_write_file(o.out, result.dump(2) + "\n");
}

}  // namespace

void cli_add_bench_data(CLI::App& bench) {
  auto config = std::make_shared<BenchDataConfig>();
  auto* cmd = bench.add_subcommand("data", "Throughput of data prepare, end to end, split into read/tokenize/write");
  cli_option_data_dir(*cmd, config->data_dir);
  cmd->add_option("--pairs", config->pairs, "Parallel corpora (default: DATA/wmt14/train.* + extra Europarl)");
  cli_option_encoding(*cmd, config->encoding);
  cli_option_tokenizer_dir(*cmd, config->tokenizer_dir);
  cli_option_threads(*cmd, config->threads, "Tokenizer threads");
  cmd->add_option("--repeat", config->repeat, "Runs; the fastest is reported")->capture_default_str()
      ->check(CLI::Range(1, 1000));
  cmd->add_flag("--no-prefetch", config->no_prefetch, "Decode the input files on the reading thread (the old way)");
  cmd->add_option("--work", config->work, "Where the shards go")->capture_default_str();
  cli_option_out(*cmd, config->out, "Result JSON");
  cmd->callback([cmd, config] {
    cli_config_print(*cmd);
    run_bench_data(*config);
  });
}

}  // namespace flashgpt

// `flashgpt data download|prepare|analyze`: the WMT14 fr-en pipeline. Each subcommand has
// one config struct filled by its option table and printed at start-up.
#include "commands.h"
#include "option_checks.h"
#include "options.h"
#include "recipes.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/data_analyze.h>
#include <flashgpt/data_download.h>
#include <flashgpt/data_loader.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_reader.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/process.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <new>
#include <system_error>

namespace flashgpt {
namespace {

struct DownloadOptions {
  std::string dataset = "wmt14";
  std::string dest;
  std::string manifest;             // JSON list replacing the built-in one (mirrors, tests)
  std::vector<std::string> only;    // names to fetch; empty: all
  int retries = 5;
  double timeout = 0;
  double connect_timeout = 15;
  double stall_timeout = 30;
  bool no_unpack = false;
  bool quiet = false;
};

struct PrepareOptions {
  std::string recipe;  // recipes.h: fills the options not given
  bool weights_from_recipe = false;
  bool mono_from_recipe = false;
  std::string data_dir;
  std::vector<std::string> pairs, mono;
  std::string eval_dir;
  bool no_test_set_check = false;
  std::string out = "data/wmt14_fren";
  std::string encoding = "cl100k_base";
  std::string tokenizer_dir;
  uint64_t seed = 1234;
  int threads = 0;
  double bilingual_rate = 0.0;
  int64_t pairs_per_document = 1;
  uint64_t document_bytes = 0;
  double single_pair_share = 0.0;
  std::string pair_order = "file";
  std::vector<std::string> weights;
  std::string val_set;
  double val_fraction = 0.005;
  uint64_t shard_tokens = 100'000'000;
  std::string on_bad_line = "skip";
  bool quiet = false;
};

struct AnalyzeOptions {
  std::vector<std::string> inputs;
  std::string dataset;
  std::string split = "train";
  uint64_t limit = 100'000;
  std::vector<std::string> keywords{kDefaultFrenchKeywords.begin(), kDefaultFrenchKeywords.end()};
  bool ignore_case = false;
  std::string json, plot;
  std::string encoding = "cl100k_base";
  std::string tokenizer_dir;
};

std::string data_dir_or_default(const std::string& given) {
  if (!given.empty()) return given;
  const auto dir = data_dir_default();
  FLASHGPT_CHECK(!dir.empty(), "no data directory: pass --data-dir (with --pairs: --eval-dir) or set FLASHGPT_DATA_DIR");
  return dir.string();
}

void run_download(const DownloadOptions& o) {
  FLASHGPT_CHECK(o.dataset == "wmt14", "unknown dataset '{}' (known: wmt14)", o.dataset);
  DownloadConfig config;
  config.dest = o.dest;
  config.items = o.manifest.empty() ? wmt14_download_items() : download_items_from_json(o.manifest);
  if (!o.only.empty()) {
    std::vector<DownloadItem> picked;
    for (const auto& name : o.only) {
      auto it = std::find_if(config.items.begin(), config.items.end(), [&](const auto& i) { return i.name == name; });
      FLASHGPT_CHECK(it != config.items.end(), "--only {}: no such file in the manifest", name);
      picked.push_back(*it);
    }
    config.items = std::move(picked);
  }
  config.retries = o.retries;
  config.timeout_seconds = o.timeout;
  config.connect_timeout_seconds = o.connect_timeout;
  config.stall_timeout_seconds = o.stall_timeout;
  config.unpack = !o.no_unpack;
  config.progress = !o.quiet;
  data_download(config);
  fmt::print("downloaded {} file(s) into {}\n", config.items.size(), config.dest.string());
}

void run_prepare(const PrepareOptions& o) {
  PrepareConfig config;
  const bool explicit_inputs = !o.pairs.empty() || !o.mono.empty();
  const std::string data_dir = explicit_inputs && !o.eval_dir.empty() ? o.data_dir : data_dir_or_default(o.data_dir);
  for (const auto& p : o.pairs) config.pairs.push_back(pair_source_from_path(p));
  for (const auto& m : o.mono) config.mono.emplace_back(m);
  if (!explicit_inputs) config.pairs = default_pair_sources(data_dir);
  std::vector<std::string> recipe_notes;
  if (o.mono_from_recipe) {
    // The recipe's monolingual files, by name in DATA/extra (after the inputs are decided:
    // they add to the default corpora as to explicit --pairs).
    for (const auto& name : recipe_find(o.recipe).mono) {
      std::filesystem::path found;
      for (const char* ext : {"", ".xz", ".gz"}) {
        const auto path = std::filesystem::path(data_dir) / "extra" / (name + ext);
        if (!data_dir.empty() && std::filesystem::exists(path)) {
          found = path;
          break;
        }
      }
      if (found.empty()) {
        recipe_notes.push_back(fmt::format("recipe {}: no {}[.xz] in {}/extra: prepared without it", o.recipe, name,
                                           data_dir.empty() ? std::string("(no --data-dir)") : data_dir));
      } else {
        config.mono.push_back(found);
      }
    }
  }
  config.eval_dir = o.eval_dir.empty() ? std::filesystem::path(data_dir) / "wmt14" : std::filesystem::path(o.eval_dir);
  config.test_set_check = o.no_test_set_check ? TestSetCheck::off : TestSetCheck::required;
  config.handle_signals = true;
  config.out_dir = o.out;
  config.seed = o.seed;
  config.threads = o.threads;
  config.bilingual_rate = o.bilingual_rate;
  config.pairs_per_document = o.pairs_per_document;
  config.document_bytes = o.document_bytes;
  config.single_pair_share = o.single_pair_share;
  config.pair_order = pair_order_from_name(o.pair_order);
  for (const auto& w : o.weights) config.weights.push_back(corpus_weight_from_text(w));
  if (o.weights_from_recipe) {
    // A recipe weighs the corpora it knows of; those not among this run's inputs are dropped
    // (an explicit --weight naming an absent corpus stays an error).
    std::erase_if(config.weights, [&](const CorpusWeight& w) {
      const bool present = std::any_of(config.pairs.begin(), config.pairs.end(),
                                       [&](const PairSource& p) { return p.name() == w.corpus; }) ||
                           std::any_of(config.mono.begin(), config.mono.end(),
                                       [&](const std::filesystem::path& m) { return m.filename() == w.corpus; });
      if (!present) recipe_notes.push_back(fmt::format("recipe {}: --weight {}={} dropped (no such corpus among the "
                                                       "inputs)", o.recipe, w.corpus, w.repeat));
      return !present;
    });
  }
  for (const auto& note : recipe_notes) fmt::print(stderr, "note: {}\n", note);
  config.val_set = o.val_set;
  config.val_fraction = o.val_fraction;
  config.shard_tokens = o.shard_tokens;
  config.bad_lines = o.on_bad_line == "fail" ? BadLinePolicy::fail : BadLinePolicy::skip;
  config.progress = !o.quiet;
  std::vector<std::string> names;
  for (const auto& p : config.pairs) names.push_back(p.name());
  for (const auto& m : config.mono) names.push_back(m.filename().string());
  fmt::print(stderr, "data prepare: reading [{}], newstest files from {}\n", fmt::join(names, ","),
             config.eval_dir.string());
  const Tokenizer tokenizer = Tokenizer::load(o.encoding, cli_tokenizer_dir(o.tokenizer_dir, data_dir));
  const PrepareSummary summary = data_prepare(config, text_encoder_from(tokenizer));
  for (const auto& w : summary.warnings) fmt::print(stderr, "warning: {}\n", w);
  uint64_t tokens = summary.tokens_en + summary.tokens_fr + summary.tokens_bilingual + summary.tokens_eot;
  fmt::print("prepared {} train + {} val documents, {} tokens (en {}, fr {}, bilingual {}) in {} + {} shards; "
             "{:.1f} MB in {:.1f} s = {:.2f} MB/s (read {:.1f} s, tokenize {:.1f} s, write {:.1f} s); "
             "summary in {}/summary.json\n",
             summary.documents, summary.val_documents, tokens, summary.tokens_en, summary.tokens_fr,
             summary.tokens_bilingual, summary.train_shards.size(), summary.val_shards.size(),
             summary.raw_bytes / 1e6, summary.seconds_total, summary.raw_bytes / 1e6 / summary.seconds_total,
             summary.seconds_read, summary.seconds_tokenize, summary.seconds_write, o.out);
}

// Texts of a prepared dataset: its documents, decoded, in shard order.
template <class Visit>
void visit_dataset_texts(const AnalyzeOptions& o, uint64_t limit, Visit&& visit) {
  // The dataset is checked (summary.json, every shard's header) before the tokenizer loads.
  std::vector<ShardView> shards;
  for (const auto& path : dataset_shards(o.dataset, o.split)) shards.emplace_back(path, VerifyPayload::no);
  const Tokenizer tokenizer = Tokenizer::load(o.encoding, cli_tokenizer_dir(o.tokenizer_dir));
  uint64_t seen = 0;
  for (const auto& shard_header_only : shards) {
    const auto& path = shard_header_only.path();
    const ShardView shard(path);
    FLASHGPT_CHECK(shard.header().encoding == tokenizer.name(), "{} is encoded with {}, not {} (pass --encoding)",
                   path.string(), shard.header().encoding, tokenizer.name());
    const auto tokens = shard.tokens();
    size_t begin = 0;
    for (size_t i = 0; i < tokens.size() && seen < limit; ++i) {
      if (tokens[i] != shard.header().end_of_text) continue;
      visit(tokenizer.decode(tokens.subspan(begin, i - begin)));
      ++seen;
      begin = i + 1;
    }
    if (seen >= limit) return;
  }
}

void run_analyze(const AnalyzeOptions& o) {
  std::vector<std::string> keywords = o.keywords;
  if (keywords.empty()) keywords.assign(kDefaultFrenchKeywords.begin(), kDefaultFrenchKeywords.end());
  FLASHGPT_CHECK(o.inputs.empty() != o.dataset.empty(), "give either --input FILE... or --dataset DIR");
  KeywordCounter counter(keywords, o.ignore_case ? CaseMode::ignore : CaseMode::sensitive);
  if (!o.dataset.empty()) {
    visit_dataset_texts(o, o.limit, [&](const std::string& text) { counter.add_text(text); });
  } else {
    std::string line;
    for (const auto& input : o.inputs) {
      LineReader reader(input, Prefetch::yes);
      while (counter.texts() < o.limit && reader.next(line)) counter.add_text(line);
    }
  }
  auto counts = counter.counts();
  std::stable_sort(counts.begin(), counts.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  const uint64_t total = counter.total();
  fmt::print("keyword counts over {} texts ({}):\n", counter.texts(), o.ignore_case ? "ignoring case" : "case-sensitive");
  fmt::print("{:<10} {:>12} {:>7}\n", "keyword", "count", "share");
  for (const auto& [word, n] : counts) {
    fmt::print("{:<10} {:>12} {:>6.2f}%\n", word, n, total ? 100.0 * n / total : 0.0);
  }
  fmt::print("{:<10} {:>12}\n", "total", total);
  nlohmann::ordered_json j;
  j["texts"] = counter.texts();
  j["total"] = total;
  j["counts"] = nlohmann::ordered_json::object();
  for (const auto& [word, n] : counts) j["counts"][word] = n;
  std::string json_path = o.json;
  if (json_path.empty() && !o.plot.empty()) json_path = o.plot + ".json";
  if (!json_path.empty()) atomic_write_file(json_path, j.dump(2) + "\n");
  if (!o.plot.empty()) {
    const char* source = std::getenv("FLASHGPT_SOURCE_DIR");
    const std::filesystem::path script =
        std::filesystem::path(source ? source : FLASHGPT_SOURCE_DIR) / "scripts" / "plot_keywords.py";
    // The script writes a temporary file next to the PNG, published only when it succeeds.
    const std::filesystem::path temp = atomic_temp_path(o.plot);
    const std::vector<std::string> argv = {"python3", script.string(), json_path, temp.string()};
    const int status = process_run(argv);
    if (status != 0) {
      std::error_code ignored;
      std::filesystem::remove(temp, ignored);
      FLASHGPT_FAIL("plotting failed (python3 {} exited with status {}; it needs matplotlib); the counts are in {}",
                    script.string(), status, json_path);
    }
    atomic_publish(temp, o.plot);
  }
}

// Library errors that are not flashgpt::Error, turned into messages that say what failed
// (never "unexpected error: std::...").
template <class Run>
void run_data_command(const char* command, Run&& run) {
  try {
    run();
  } catch (const Error&) {
    throw;
  } catch (const std::filesystem::filesystem_error& e) {
    std::string what = e.what();  // "filesystem error: cannot create directories: Not a directory [PATH]"
    if (what.starts_with("filesystem error: ")) what.erase(0, std::string_view("filesystem error: ").size());
    FLASHGPT_FAIL("{}: {}", command, what);
  } catch (const std::bad_alloc&) {
    FLASHGPT_FAIL("{}: out of memory", command);
  } catch (const nlohmann::json::exception& e) {
    FLASHGPT_FAIL("{}: malformed JSON: {}", command, e.what());
  } catch (const std::system_error& e) {
    FLASHGPT_FAIL("{}: system error: {}", command, e.code().message());
  }
}

}  // namespace

void cli_add_data(CLI::App& app) {
  auto* data = app.add_subcommand("data", "The WMT14 fr-en pipeline: download, prepare token shards, analyze");
  data->require_subcommand(1);

  auto download = std::make_shared<DownloadOptions>();
  auto* d = data->add_subcommand("download", "Fetch, verify and unpack the WMT14 fr-en archives (needs libcurl)");
  d->add_option("dataset", download->dataset, "Which dataset")->capture_default_str();
  d->add_option("--dest", download->dest, "Where the archives go and are unpacked")->required();
  d->add_option("--manifest", download->manifest, "JSON list of {name,url,md5?,sha256?,size?} replacing the built-in");
  d->add_option("--only", download->only, "Fetch only these files (by name)");
  d->add_option("--retries", download->retries, "Resumed attempts per file after a dropped connection")
      ->capture_default_str()->check(CLI::Range(0, 100));
  d->add_option("--timeout", download->timeout, "Seconds per attempt (0: no limit)")->capture_default_str()
      ->check(CLI::Range(0.0, 7 * 24 * 3600.0));
  d->add_option("--connect-timeout", download->connect_timeout, "Seconds to wait for a connection")
      ->capture_default_str()->check(CLI::Range(1.0, 600.0));
  d->add_option("--stall-timeout", download->stall_timeout, "Seconds without a byte after which an attempt fails")
      ->capture_default_str()->check(CLI::Range(1.0, 3600.0));
  d->add_flag("--no-unpack", download->no_unpack, "Only fetch and verify");
  d->add_flag("--quiet", download->quiet, "No progress lines");
  d->callback([d, download] {
    cli_config_print(*d);
    run_data_command("data download", [&] { run_download(*download); });
  });

  auto prepare = std::make_shared<PrepareOptions>();
  auto* p = data->add_subcommand("prepare", "Build documents from the corpora and write token shards");
  cli_option_recipe(*p, prepare->recipe);
  cli_option_data_dir(*p, prepare->data_dir);
  p->add_option("--pairs", prepare->pairs,
                "Parallel corpora: X.en[.xz|.gz] (finds X.fr), X.tsv or *-src.en.sgm (default: train.* in "
                "DATA/wmt14 and DATA/extra)");
  p->add_option("--mono", prepare->mono, "Monolingual files X.en / X.fr, one text per line");
  p->add_option("--eval-dir", prepare->eval_dir,
                "Where newstest2012/13/14 are (default: DATA/wmt14); missing, unreadable or without newstest2014 "
                "is an error");
  p->add_flag("--no-test-set-check", prepare->no_test_set_check,
              "Train without a newstest2014 to check the text against (file names are still checked)");
  cli_option_out(*p, prepare->out, "Output directory");
  cli_option_encoding(*p, prepare->encoding);
  cli_option_tokenizer_dir(*p, prepare->tokenizer_dir);
  cli_option_seed(*p, prepare->seed, "every random choice");
  cli_option_threads(*p, prepare->threads, "Tokenizer threads");
  p->add_option("--bilingual-rate", prepare->bilingual_rate,
                "Share of pairs turned into bilingual documents (0: the original one-side-per-pair recipe)")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  p->add_option("--pairs-per-document", prepare->pairs_per_document,
                "Above 1: bilingual pairs grouped into documents of up to this many pairs, one direction each, in "
                "`eval translate`'s K-shot prompt format")
      ->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{100000}));
  p->add_option("--document-bytes", prepare->document_bytes,
                "Multi-pair documents stop before their text passes this many bytes (0: no limit; about 4.2 bytes "
                "per cl100k_base token)")
      ->capture_default_str()->check(cli_unsigned_integer());
  p->add_option("--single-pair-share", prepare->single_pair_share,
                "With --pairs-per-document: share of the bilingual pairs kept as single-pair documents in the four "
                "templates")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  p->add_option("--pair-order", prepare->pair_order,
                "Order pairs are used in: file, or shuffled (a seeded permutation per corpus and repetition)")
      ->capture_default_str()->check(CLI::IsMember({"file", "shuffled"}));
  p->add_option("--weight", prepare->weights,
                "NAME=REPEAT: use corpus NAME (as the summary names it) REPEAT times (e.g. 2.5); repeatable");
  p->add_option("--val-set", prepare->val_set,
                "newstest2012 or newstest2013: the validation split is that dev set in the prompt format, both "
                "directions, instead of held-out documents (implies --val-fraction 0)")
      ->check(CLI::IsMember({"newstest2012", "newstest2013"}));
  p->add_option("--val-fraction", prepare->val_fraction, "Share of documents held out")->capture_default_str()
      ->check(CLI::Range(0.0, 0.999));
  p->add_option("--shard-tokens", prepare->shard_tokens, "Tokens per shard")->capture_default_str()
      ->check(cli_unsigned_integer())->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  p->add_option("--on-bad-line", prepare->on_bad_line, "Invalid UTF-8 or malformed lines: skip (and count) or fail")
      ->capture_default_str()->check(CLI::IsMember({"skip", "fail"}));
  p->add_flag("--quiet", prepare->quiet, "No progress lines");
  p->callback([p, prepare] {
    std::string recipe_line;
    if (!prepare->recipe.empty()) {
      prepare->weights_from_recipe = p->get_option("--weight")->count() == 0;
      prepare->mono_from_recipe = p->get_option("--mono")->count() == 0;
      recipe_line = cli_recipe_apply(*p, prepare->recipe, recipe_prepare_values(recipe_find(prepare->recipe)));
    }
    if (!prepare->val_set.empty() && p->get_option("--val-fraction")->count() == 0) prepare->val_fraction = 0;
    cli_config_print(*p);
    if (!recipe_line.empty()) {
      fmt::print(stderr, "data prepare: {}{}\n", recipe_line,
                 prepare->mono_from_recipe ? fmt::format(" mono=[{}] (in DATA/extra)",
                                                         fmt::join(recipe_find(prepare->recipe).mono, ","))
                                           : "");
    }
    run_data_command("data prepare", [&] { run_prepare(*prepare); });
  });

  auto analyze = std::make_shared<AnalyzeOptions>();
  auto* a = data->add_subcommand("analyze", "Count French keywords (whole words) in the first N texts");
  a->add_option("--input", analyze->inputs, "Text files, one text per line (.xz/.gz fine)");
  a->add_option("--dataset", analyze->dataset, "A prepared dataset directory (documents decoded)");
  a->add_option("--split", analyze->split, "train or val")->capture_default_str()
      ->check(CLI::IsMember({"train", "val"}));
  a->add_option("--limit", analyze->limit, "Texts to read")->capture_default_str()->check(cli_unsigned_integer());
  a->add_option("--keywords", analyze->keywords, "Keyword list (comma-separated)")->delimiter(',');
  a->add_flag("--ignore-case", analyze->ignore_case, "Compare after Unicode simple lowercasing");
  a->add_option("--json", analyze->json, "Write {texts,total,counts} here");
  a->add_option("--plot", analyze->plot, "Bar chart PNG (python3 + matplotlib)");
  cli_option_encoding(*a, analyze->encoding)->description("Tokenizer encoding of --dataset");
  cli_option_tokenizer_dir(*a, analyze->tokenizer_dir);
  a->callback([a, analyze] {
    cli_config_print(*a);
    run_data_command("data analyze", [&] { run_analyze(*analyze); });
  });
}

}  // namespace flashgpt

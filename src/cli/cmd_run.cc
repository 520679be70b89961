// `flashgpt run`: the whole system as one job, the README's `make run`. It calls the
// components' library APIs in data-flow order, never a shell or another flashgpt process:
//   1. data    : prepare token shards (../shared/data, or the built-in sample in share/fren-sample)
//   2. train   : a preset sized for the device, with a step count and a wall-clock cap
//   3. eval    : zero-, one- and few-shot en->fr and fr->en, BLEU and chrF per K
//   4. report  : OUT/report.md (+ report.json, loss.png, kshot.png) with the commands that reproduce it
//
// The device is decided once (run_plan_make) and every stage takes it from the plan: the
// trainer through gpt_create(device), generation through run_inference_engine(device).
//
// OUT is never reused: an --out that exists is refused; without --out the job claims
// results/run, else the first free results/run-N (create_directory is the atomic claim).
#include "commands.h"
#include "option_checks.h"
#include "options.h"
#include "recipes.h"
#include "stop_signal.h"
#include "translate_results.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/data_download.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_reader.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/model.h>
#include <flashgpt/process.h>
#include <flashgpt/tokenizer.h>
#include <flashgpt/train.h>
#include <flashgpt/translate.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#ifdef FLASHGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace flashgpt {
namespace {

using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// What the user chose. Zero / empty means "the device's default" (run_plan_make).
struct RunOptions {
  std::string out;
  std::string data = "auto";  // auto | shared | download | builtin
  std::string data_dir;
  std::string download_dir;       // default: ~/.cache/flashgpt/wmt14
  std::string download_manifest;  // replaces the built-in URLs (mirrors, tests)
  std::string tokenizer_dir;
  std::string device = "auto";  // auto | cpu | cuda
  std::string recipe = "auto";  // auto (translate on cuda, none on cpu) | none | a name of recipes.h
  std::string preset;
  int64_t steps = 0;
  double minutes = 0;
  int64_t batch = 0;
  int64_t eval_sentences = -1;  // -1: the device's default; 0: all
  std::vector<int64_t> shots = {0, 1, 5};
  int64_t max_new_tokens = 0;
  uint64_t seed = 1234;
  int threads = 0;
};

// Everything the stages need, decided in one place from the options and the device.
struct RunPlan {
  Device device = Device::cpu;
  std::string device_name;  // "cpu" or "cuda"
  // The named recipe (recipes.h) whose data and training settings the job takes, or empty
  // for the CPU job's own small settings.
  std::string recipe;
  TranslationRecipe recipe_values;  // recipe_find(recipe) when recipe is set
  std::string preset;
  int64_t steps = 0;
  double minutes = 0;  // the whole job's wall-clock budget
  int64_t batch = 0;
  double lr = 0;
  int64_t warmup = 0;
  std::string schedule = "cosine";
  double min_lr_ratio = 0.1;
  int64_t eval_every = 0, eval_batches = 0;
  bool keep_best = true;  // evaluate RUN/best, the lowest validation loss
  int64_t eval_sentences = 0;  // 0: all
  int64_t max_new_tokens = 0;
  int64_t infer_batch = 8;
  Device generation_device = Device::cpu;  // where run_inference_engine generates
  double bilingual_rate = 0.8;
  double val_fraction = 0.05;
  double weight_decay = 0;
  // The recipe's documents (on the shared corpora only: a download or the built-in sample
  // keeps single-pair documents): several pairs in eval translate's prompt format, news
  // repeated, the dev set as the validation split.
  bool multi_pair = false;
  bool all_corpora = false;  // shared data: every train.* pair (recipe) or the short-sentence ones (CPU)
};

// The built-in bilingual sample: sentences written for this project (share/fren-sample/README.md).
std::filesystem::path builtin_sample_dir() {
  const char* source = std::getenv("FLASHGPT_SOURCE_DIR");
  return std::filesystem::path(source && *source ? source : FLASHGPT_SOURCE_DIR) / "share" / "fren-sample";
}


int cuda_device_count() {
#ifdef FLASHGPT_WITH_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
#else
  return 0;
#endif
}

std::string gpu_name() {
#ifdef FLASHGPT_WITH_CUDA
  cudaDeviceProp prop{};
  if (cuda_device_count() > 0 && cudaGetDeviceProperties(&prop, 0) == cudaSuccess) return prop.name;
#endif
  return "";
}

RunPlan run_plan_make(const RunOptions& o) {
  RunPlan p;
  if (o.device == "auto") {
    p.device = cuda_device_count() > 0 ? Device::cuda : Device::cpu;
  } else {
    p.device = o.device == "cuda" ? Device::cuda : Device::cpu;
  }
  if (p.device == Device::cuda) {
#ifndef FLASHGPT_WITH_CUDA
    FLASHGPT_FAIL("--device cuda: this build has no CUDA backend (configure with -DFLASHGPT_CUDA=ON)");
#endif
    FLASHGPT_CHECK(cuda_device_count() > 0, "--device cuda: no CUDA device is visible");
  }
  const bool gpu = p.device == Device::cuda;
  p.device_name = gpu ? "cuda" : "cpu";
  // CPU: the tiny preset, short sentences, a hundred steps (docs/run.md has the timings).
  // GPU: the `translate` recipe (recipes.h: recipe 2 v2 of docs/experiments.md).
  p.recipe = o.recipe == "auto" ? (gpu ? "translate" : "") : o.recipe == "none" ? "" : o.recipe;
  const bool recipe = !p.recipe.empty();
  if (recipe) p.recipe_values = recipe_find(p.recipe);
  const TranslationRecipe& r = p.recipe_values;
  p.preset = !o.preset.empty() ? o.preset : recipe ? r.preset : "tiny";
  p.steps = o.steps > 0 ? o.steps : recipe ? r.steps : 100;
  p.minutes = o.minutes > 0 ? o.minutes : gpu ? 15.0 : 6.0;
  p.batch = o.batch > 0 ? o.batch : recipe ? r.batch : 8;
  // The recipe's rate whatever the preset, as `train --recipe` has it.
  p.lr = recipe ? r.lr : p.preset == "seed" ? 6e-4 : p.preset == "small" ? 1e-3 : 2e-3;
  // Warmup and validation follow a --steps shorter than the recipe's (at most a tenth of the
  // steps warm up, at least five validations); at the recipe's steps they are the recipe's.
  p.warmup = std::min<int64_t>(recipe ? r.warmup : 25, std::max<int64_t>(1, p.steps / 10));
  p.eval_every = std::min<int64_t>(recipe ? r.eval_every : p.steps, std::max<int64_t>(1, p.steps / 5));
  // On the CPU, validation takes 4 batches whatever the recipe says: all of newstest2013
  // (375k tokens) is 0.4 s on an H100 but minutes on two cores, outside the training budget.
  p.eval_batches = recipe && gpu ? r.eval_batches : 4;
  if (recipe) {
    p.schedule = r.schedule;
    p.min_lr_ratio = r.min_lr_ratio;
    p.weight_decay = r.weight_decay;
    p.keep_best = r.keep_best;
  }
  // Generation follows training onto the GPU where the CUDA engine takes the preset (its
  // head dim's kernels are in the build; the vocabulary does not decide).
  const bool gpu_generation = gpu && inference_cuda_supports(model_preset(p.preset, 100277));
  p.generation_device = gpu_generation ? Device::cuda : Device::cpu;
  // All 3003 sentences with the CUDA engine; on the CPU engine the seed model decodes a few
  // tokens/s, so a GPU job whose preset the CUDA engine cannot take scores 100 (the report
  // says where generation ran).
  p.eval_sentences = o.eval_sentences >= 0 ? o.eval_sentences : gpu_generation ? 0 : gpu ? 100 : 50;
  p.max_new_tokens = o.max_new_tokens > 0 ? o.max_new_tokens : gpu ? 200 : 40;
  p.infer_batch = gpu_generation ? 64 : 8;
  p.val_fraction = recipe ? 0.005 : 0.05;
  p.all_corpora = recipe;
  p.multi_pair = recipe;
  if (recipe) p.bilingual_rate = r.bilingual_rate;
  return p;
}

// The generation engine for the plan's generation device (the one place it is created).
std::unique_ptr<InferenceEngine> run_inference_engine(const RunPlan& plan, const RunWeights& weights, int threads,
                                                      std::string* note) {
  InferenceOptions io;
  io.max_slots = plan.infer_batch;
  io.threads = threads;
  if (plan.generation_device == Device::cuda) return inference_create_cuda(weights.config, weights.params, io);
  if (plan.device == Device::cuda) {
    *note = fmt::format("generation ran on the CPU engine (the CUDA engine of this build cannot take the {} preset)",
                        plan.preset);
    fmt::print(stderr, "note: {}\n", *note);
  }
  return inference_create_cpu(weights.config, weights.params, io);
}

// The job's wall-clock budget (--minutes) is spent in order: data, training, evaluation,
// report. Training gets what is left after the data stage minus what the later stages are
// expected to take; the evaluation skips its least important settings if it runs late.
//
// Seconds one (direction, K) setting of `sentences` sentences is expected to take. GPU
// engine: 42 s for six settings of 3,003 sentences x 200 new tokens with a random seed-preset
// model (every row to its budget: the worst case; a trained one took 26 s), so ~1.2e-5 s a
// sentence-token, plus ~2 s of prefill and setup. CPU engine: 64 s for six settings of 50
// sentences x 40 tokens of the tiny preset on a loaded 2-core machine (docs/run.md), 5.3 ms
// a sentence-token, scaled by the preset's size.
double eval_setting_seconds_estimate(const RunPlan& plan, int64_t sentences) {
  const double rows = static_cast<double>(sentences + 3);  // + the seed's three example prompts
  const double tokens = rows * static_cast<double>(plan.max_new_tokens);
  if (plan.generation_device == Device::cuda) return 2.0 + 1.2e-5 * tokens;
  const double size = static_cast<double>(model_param_count(model_preset(plan.preset, 100277))) /
                      static_cast<double>(model_param_count(model_preset("tiny", 100277)));
  return 0.5 + 5.3e-3 * size * tokens;
}

// Seconds after training that are not the evaluation's settings: the final validation, the
// checkpoint and best/ (2 GB each for the seed preset), the model load for generation, the
// plots and the report. GPU: ~6 s + ~5 s (docs/experiments.md's budget); CPU: a few seconds.
double finish_seconds_estimate(const RunPlan& plan) { return plan.device == Device::cuda ? 20.0 : 10.0; }

void stage_header(int index, const char* name, const std::string& what) {
  fmt::print(stderr, "\n==== [{}/4] {}: {} ====\n", index, name, what);
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string read_first_line(const std::filesystem::path& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.starts_with(key)) {
      const auto colon = line.find(':');
      if (colon == std::string::npos) continue;
      auto value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(" \t"));
      return value;
    }
  }
  return "";
}

Json machine_describe(const RunPlan& plan) {
  Json m;
  m["cpu"] = read_first_line("/proc/cpuinfo", "model name");
  m["cores"] = std::thread::hardware_concurrency();
  const std::string mem = read_first_line("/proc/meminfo", "MemTotal");
  m["memory_gib"] = mem.empty() ? 0.0 : std::round(std::stod(mem) / (1 << 20) * 10) / 10;  // kB
  struct utsname u {};
  m["os"] = uname(&u) == 0 ? fmt::format("{} {} {}", u.sysname, u.release, u.machine) : "";
  m["gpu"] = gpu_name();
  m["device"] = plan.device_name;
#ifdef FLASHGPT_WITH_CUDA
  m["cuda_build"] = true;
#else
  m["cuda_build"] = false;
#endif
  return m;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// Claims OUT: an existing --out is refused; the default takes results/run or results/run-N.
std::filesystem::path out_claim(const std::string& given) {
  if (!given.empty()) {
    const std::filesystem::path out = given;
    FLASHGPT_CHECK(!std::filesystem::exists(out),
                   "--out {} already exists: `flashgpt run` never writes over earlier results; choose a new --out "
                   "(or leave it out for results/run-N)", given);
    if (!out.parent_path().empty()) std::filesystem::create_directories(out.parent_path());
    FLASHGPT_CHECK(std::filesystem::create_directory(out), "--out {}: created by someone else meanwhile", given);
    return out;
  }
  std::filesystem::create_directories("results");
  for (int n = 1; n < 10000; ++n) {
    const std::filesystem::path out = n == 1 ? "results/run" : fmt::format("results/run-{}", n);
    if (std::filesystem::create_directory(out)) return out;
  }
  FLASHGPT_FAIL("results/run ... results/run-9999 all exist: pass --out");
}

// The pairs of a parallel corpus (aligned or SGM files) written as STEM.en and STEM.fr.
void pairs_write_plain(const PairSource& source, const std::string& stem) {
  FLASHGPT_CHECK(std::filesystem::exists(source.en) && std::filesystem::exists(source.fr),
                 "the download has no {} and {}", source.en.string(), source.fr.string());
  PairReader reader(source);
  std::string en, fr;
  TextPair pair;
  while (reader.next(pair)) {
    en += pair.en + '\n';
    fr += pair.fr + '\n';
  }
  FLASHGPT_CHECK(reader.stats().read > 0, "{}: no sentence pairs", source.en.string());
  atomic_write_file(stem + ".en", en);
  atomic_write_file(stem + ".fr", fr);
}

std::filesystem::path download_dir_default() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::filesystem::path(x) / "flashgpt" / "wmt14";
  if (const char* h = std::getenv("HOME"); h && *h) return std::filesystem::path(h) / ".cache" / "flashgpt" / "wmt14";
  return "wmt14-download";
}

// The WMT14 dev and test sets and News Commentary v9 fr-en, fetched with `data download`'s
// code into DEST and laid out as a data folder: DEST/data/wmt14/newstest201{2,3,4}.fr-en.*
// (the SGML test set turned into plain lines) and train.news-commentary-v9.fr-en.*. A
// complete earlier download (newstest2014.fr-en.fr, written last) is reused.
std::filesystem::path wmt14_fetch(const RunOptions& o) {
  const std::filesystem::path dest = o.download_dir.empty() ? download_dir_default() : std::filesystem::path(o.download_dir);
  const auto data = dest / "data";
  const auto wmt = data / "wmt14";
  if (std::filesystem::exists(wmt / "newstest2014.fr-en.fr")) return data;
  FLASHGPT_CHECK(download_supported() && unpack_supported(),
                 "this build cannot download (it needs libcurl and libarchive at configure time)");
  const std::vector<std::string> wanted = {"dev.tgz", "test-full.tgz", "training-parallel-nc-v9.tgz"};
  const auto all = o.download_manifest.empty() ? wmt14_download_items() : download_items_from_json(o.download_manifest);
  DownloadConfig dc;
  dc.dest = dest;
  for (const auto& name : wanted) {
    const auto it = std::find_if(all.begin(), all.end(), [&](const DownloadItem& i) { return i.name == name; });
    FLASHGPT_CHECK(it != all.end(), "the download manifest has no {}", name);
    dc.items.push_back(*it);
  }
  dc.retries = 2;
  dc.connect_timeout_seconds = 10;
  dc.progress = true;
  fmt::print(stderr, "data: downloading {} into {}\n", fmt::join(wanted, ", "), dest.string());
  std::filesystem::create_directories(dest);
  data_download(dc);
  std::filesystem::create_directories(wmt);
  const auto aligned = [](const std::filesystem::path& stem) {
    return PairSource{PairFormat::aligned, stem.string() + ".en", stem.string() + ".fr"};
  };
  pairs_write_plain(aligned(dest / "training" / "news-commentary-v9.fr-en"),
                    (wmt / "train.news-commentary-v9.fr-en").string());
  pairs_write_plain(aligned(dest / "dev" / "newstest2012"), (wmt / "newstest2012.fr-en").string());
  pairs_write_plain(aligned(dest / "dev" / "newstest2013"), (wmt / "newstest2013.fr-en").string());
  // Written last: its presence marks a complete download. English source, French reference.
  pairs_write_plain(PairSource{PairFormat::sgm, dest / "test-full" / "newstest2014-fren-src.en.sgm",
                               dest / "test-full" / "newstest2014-fren-ref.fr.sgm"},
                    (wmt / "newstest2014.fr-en").string());
  return data;
}

// Where the corpora are, or empty for the built-in sample; `kind`: shared, download or builtin.
std::filesystem::path data_source_resolve(const RunOptions& o, std::string* why, std::string* kind) {
  if (o.data == "builtin") {
    *why = "--data builtin";
    *kind = "builtin";
    return {};
  }
  if (o.data == "download") {
    const auto dir = wmt14_fetch(o);
    *why = fmt::format("--data download: WMT14 dev/test sets and News Commentary v9 in {}", dir.string());
    *kind = "download";
    return dir;
  }
  std::filesystem::path dir;
  if (!o.data_dir.empty()) {
    dir = o.data_dir;
  } else {
    dir = data_dir_default();
  }
  const bool found = !dir.empty() && std::filesystem::is_directory(dir / "wmt14");
  if (o.data == "shared" || !o.data_dir.empty()) {
    FLASHGPT_CHECK(found, "{}: no wmt14/ folder there (pass --data-dir DATA, set FLASHGPT_DATA_DIR, or use --data builtin)",
                   dir.empty() ? std::string("no data directory (../shared/data is absent)") : dir.string());
    *why = fmt::format("corpora in {}", dir.string());
    *kind = "shared";
    return dir;
  }
  if (found) {
    *why = fmt::format("corpora found in {}", dir.string());
    *kind = "shared";
    return dir;
  }
  if (download_supported() && unpack_supported()) {
    fmt::print(stderr, "data: no corpora found (no --data-dir, FLASHGPT_DATA_DIR or ../shared/data): downloading\n");
    try {
      const auto downloaded = wmt14_fetch(o);
      *why = fmt::format("no corpora found: downloaded the WMT14 dev/test sets and News Commentary v9 into {}",
                         downloaded.string());
      *kind = "download";
      return downloaded;
    } catch (const Error& e) {
      fmt::print(stderr, "warning: the download failed, falling back to the built-in sample: {}\n", e.what());
      *why = "no corpora found and the download failed: the built-in sample";
      *kind = "builtin";
      return {};
    }
  }
  *why = "no corpora found (no --data-dir, FLASHGPT_DATA_DIR or ../shared/data) and no download support: the "
         "built-in sample";
  *kind = "builtin";
  return {};
}

// A build without liblzma (the GPU machine has none) cannot read the .xz corpora of
// ../shared/data. The files the job reads (the train.* pairs and newstest2012-2014 of wmt14/
// and extra/, and the recipe's monolingual files) are then unpacked with python3's lzma
// module into DEST, laid out as a data folder, and the job reads that. Each file is written
// under a temporary name and renamed; one python3 process, files in parallel.
std::filesystem::path corpora_unpack_xz(const std::filesystem::path& data_dir, const std::filesystem::path& dest,
                                        const std::vector<std::string>& mono) {
  std::vector<std::string> argv = {"python3", "-c", R"(
import concurrent.futures, lzma, os, shutil, sys
def unpack(job):
    src, dst = job
    with lzma.open(src) as fin, open(dst + ".tmp", "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(dst + ".tmp", dst)
jobs = list(zip(sys.argv[1::2], sys.argv[2::2]))
with concurrent.futures.ProcessPoolExecutor() as pool:
    list(pool.map(unpack, jobs))
)"};
  size_t files = 0;
  for (const char* sub : {"wmt14", "extra"}) {
    const auto dir = data_dir / sub;
    if (!std::filesystem::is_directory(dir)) continue;
    std::filesystem::create_directories(dest / sub);
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      const std::string plain = name.ends_with(".xz") ? name.substr(0, name.size() - 3) : name;
      const bool wanted =
          plain.ends_with(".en") || plain.ends_with(".fr")
              ? plain.starts_with("train.") || plain.starts_with("newstest201") ||
                    std::find(mono.begin(), mono.end(), plain) != mono.end()
              : false;
      if (!wanted) continue;
      if (name.ends_with(".xz")) {
        argv.push_back(entry.path().string());
        argv.push_back((dest / sub / plain).string());
        ++files;
      } else {
        if (!std::filesystem::exists(dest / sub / plain)) {
          std::filesystem::create_symlink(std::filesystem::absolute(entry.path()), dest / sub / plain);
        }
      }
    }
  }
  fmt::print(stderr, "data: this build has no liblzma: unpacking {} .xz files of {} into {} with python3\n", files,
             data_dir.string(), dest.string());
  const int status = process_run(argv);
  FLASHGPT_CHECK(status == 0,
                 "unpacking the .xz corpora of {} with python3's lzma failed (exit status {}); unpack them yourself "
                 "(`xz -dk`) and pass that folder as --data-dir", data_dir.string(), status);
  return dest;
}

bool corpora_have_xz(const std::filesystem::path& data_dir) {
  for (const char* sub : {"wmt14", "extra"}) {
    const auto dir = data_dir / sub;
    if (!std::filesystem::is_directory(dir)) continue;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.path().extension() == ".xz") return true;
    }
  }
  return false;
}

// Every test pair must be absent from the built-in training file, on either side.
void builtin_check_disjoint(const std::vector<TranslatePair>& train, const std::vector<TranslatePair>& test) {
  std::set<std::string> seen;
  for (const auto& p : train) {
    seen.insert(p.en);
    seen.insert(p.fr);
  }
  for (const auto& p : test) {
    FLASHGPT_CHECK(!seen.contains(p.en) && !seen.contains(p.fr),
                   "the built-in sample's test pair '{}' / '{}' is also in its training file", p.en, p.fr);
  }
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=,:+") ==
                        std::string::npos) {
    return s;
  }
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + shell_quote(a);
  return s;
}

std::string fmt_seconds(double s) {
  if (s < 60) return fmt::format("{:.1f} s", s);
  return fmt::format("{:.1f} s ({}m{:02d}s)", s, static_cast<int>(s) / 60, static_cast<int>(s) % 60);
}


std::string md_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    if (c == '|') {
      r += "\\|";
    } else if (c == '\n') {
      r += "\\n";
    } else if (c == '`') {
      r += '\'';
    } else {
      r += c;
    }
  }
  return r;
}

void run_all(CLI::App* cmd, const RunOptions& o) {
  cli_config_print(*cmd);
  const auto job_start = Clock::now();
  const std::string started = utc_now();
  const RunPlan plan = run_plan_make(o);
  model_preset(plan.preset, 1000);  // an unknown preset fails before anything is written
  std::string data_why, data_source;
  const std::filesystem::path source_data_dir = data_source_resolve(o, &data_why, &data_source);
  std::filesystem::path data_dir = source_data_dir;  // OUT/corpora when the .xz files are unpacked there
  const bool builtin = data_source == "builtin";
  const bool downloaded = data_source == "download";
  // The budget: the evaluation's estimate must leave training a fair share of --minutes
  // (checked before anything is written).
  const double budget_s = plan.minutes * 60;
  const int64_t test_sentences_total = builtin ? 24 : 3003;  // the sample's test split; newstest2014
  const int64_t scored = plan.eval_sentences > 0 ? std::min(plan.eval_sentences, test_sentences_total)
                                                 : test_sentences_total;
  const double eval_estimate_s = 2.0 * static_cast<double>(o.shots.size()) *
                                 eval_setting_seconds_estimate(plan, scored);
  const double reserve_s = eval_estimate_s + finish_seconds_estimate(plan) + 0.05 * budget_s;
  FLASHGPT_CHECK(budget_s - reserve_s >= 0.25 * budget_s,
                 "--minutes {}: the evaluation ({} sentences x {} settings, about {:.0f} s) and the final stages "
                 "(about {:.0f} s) leave less than a quarter of the budget for training: raise --minutes, or lower "
                 "--eval-sentences or --max-new-tokens", plan.minutes, scored, 2 * o.shots.size(), eval_estimate_s,
                 reserve_s - eval_estimate_s);
  const auto sample = builtin_sample_dir();
  if (builtin) {
    FLASHGPT_CHECK(std::filesystem::exists(sample / "train.sample.fr-en.en"),
                   "the built-in sample is missing: {} has no train.sample.fr-en.en (set FLASHGPT_SOURCE_DIR to the "
                   "repository)", sample.string());
  }
  const Tokenizer tokenizer = [&] {
    try {
      return Tokenizer::load("cl100k_base", cli_tokenizer_dir(o.tokenizer_dir, data_dir));
    } catch (const Error& e) {
      FLASHGPT_FAIL("{}\n(every data source, the built-in sample included, is tokenized with cl100k_base: pass "
                    "--tokenizer-dir DIR or set FLASHGPT_TOKENIZER_DIR to a folder holding cl100k_base.tiktoken)",
                    e.what());
    }
  }();
  const std::filesystem::path out = out_claim(o.out);
  const auto ds_dir = out / "data";
  const auto run_dir = out / "train";
  const auto eval_dir = out / "eval";
  fmt::print(stderr,
             "run: device {}, recipe {}, preset {}, {} steps, batch {}, eval {} sentences, shots [{}], budget {} min "
             "for the whole job (evaluation estimated at {:.0f} s), out {}\n"
             "data: {}\n",
             plan.device_name, plan.recipe.empty() ? std::string("none") : plan.recipe, plan.preset, plan.steps,
             plan.batch, plan.eval_sentences == 0 ? std::string("all") : std::to_string(plan.eval_sentences),
             fmt::join(o.shots, ","), plan.minutes, eval_estimate_s, out.string(), data_why);
  Json report;
  report["started"] = started;
  report["machine"] = machine_describe(plan);
  Json timings;

  // ---- 1. data --------------------------------------------------------------------------
  stage_header(1, "data", builtin ? "prepare the built-in sample" : "prepare token shards from " + data_dir.string());
  auto t0 = Clock::now();
  // FLASHGPT_RUN_UNPACK_XZ=1 takes the no-liblzma path in any build (tests/cli/recipe_test.py).
  const char* force_unpack = std::getenv("FLASHGPT_RUN_UNPACK_XZ");
  const bool unpack_xz = !compression_supported(Compression::xz) || (force_unpack && std::string(force_unpack) == "1");
  if (data_source == "shared" && unpack_xz && corpora_have_xz(data_dir)) {
    data_dir = corpora_unpack_xz(source_data_dir, out / "corpora",
                                 plan.multi_pair ? plan.recipe_values.mono : std::vector<std::string>{});
    data_why += fmt::format(" (its .xz files unpacked with python3 into {}: this build has no liblzma)",
                            data_dir.string());
  }
  PrepareConfig pc;
  std::vector<std::string> prepare_argv = {"flashgpt", "data", "prepare"};
  if (builtin) {
    pc.pairs.push_back(pair_source_from_path(sample / "train.sample.fr-en.en"));
    pc.test_set_check = TestSetCheck::off;
    prepare_argv.insert(prepare_argv.end(), {"--pairs", (sample / "train.sample.fr-en.en").string(),
                                             "--no-test-set-check"});
  } else {
    for (auto& source : default_pair_sources(data_dir)) {
      const std::string name = source.name();
      if (plan.all_corpora || downloaded || name.find("multi30k") != std::string::npos ||
          name.find("tatoeba") != std::string::npos) {
        prepare_argv.insert(prepare_argv.end(), {"--pairs", source.en.string()});
        pc.pairs.push_back(std::move(source));
      }
    }
    FLASHGPT_CHECK(!pc.pairs.empty(), "{}: no train.* corpora in wmt14/ or extra/", data_dir.string());
    pc.eval_dir = data_dir / "wmt14";
    pc.test_set_check = TestSetCheck::required;
    prepare_argv.insert(prepare_argv.end(), {"--eval-dir", pc.eval_dir.string()});
  }
  pc.out_dir = ds_dir;
  pc.seed = o.seed;
  pc.threads = o.threads;
  const bool recipe_documents = plan.multi_pair && !builtin && !downloaded;
  if (recipe_documents) {
    // The recipe's documents, as `data prepare --recipe NAME --data-dir DATA` makes them
    // (recipes.h; tests/cli/recipe_test.py checks the two give the same shards).
    const TranslationRecipe& r = plan.recipe_values;
    pc.bilingual_rate = r.bilingual_rate;
    pc.pairs_per_document = r.pairs_per_document;
    pc.document_bytes = r.document_bytes;
    pc.single_pair_share = r.single_pair_share;
    pc.pair_order = pair_order_from_name(r.pair_order);
    for (const auto& name : r.mono) {
      for (const char* ext : {"", ".xz", ".gz"}) {
        const auto path = data_dir / "extra" / (name + ext);
        if (std::filesystem::exists(path)) {
          pc.mono.push_back(path);
          break;
        }
      }
    }
    pc.weights = r.weights;
    std::erase_if(pc.weights, [&](const CorpusWeight& w) {
      return std::none_of(pc.pairs.begin(), pc.pairs.end(), [&](const PairSource& p) { return p.name() == w.corpus; }) &&
             std::none_of(pc.mono.begin(), pc.mono.end(),
                          [&](const std::filesystem::path& m) { return m.filename() == w.corpus; });
    });
    pc.val_set = r.val_set;
    pc.val_fraction = 0;
    prepare_argv.insert(prepare_argv.end(), {"--recipe", plan.recipe, "--data-dir", data_dir.string()});
  } else {
    pc.bilingual_rate = plan.bilingual_rate;
    pc.val_fraction = plan.val_fraction;
    prepare_argv.insert(prepare_argv.end(), {"--bilingual-rate", fmt::format("{}", plan.bilingual_rate),
                                             "--val-fraction", fmt::format("{}", plan.val_fraction)});
  }
  pc.handle_signals = true;
  pc.progress = true;
  prepare_argv.insert(prepare_argv.end(), {"--seed", std::to_string(o.seed), "--out", ds_dir.string()});
  const PrepareSummary summary = data_prepare(pc, text_encoder_from(tokenizer));
  for (const auto& w : summary.warnings) fmt::print(stderr, "warning: {}\n", w);
  const uint64_t dataset_tokens = summary.tokens_en + summary.tokens_fr + summary.tokens_bilingual + summary.tokens_eot;
  std::vector<std::string> corpora;
  for (const auto& c : summary.corpora) corpora.push_back(c.name);
  fmt::print(stderr, "data: {} train + {} val documents, {} tokens from [{}]\n", summary.documents,
             summary.val_documents, dataset_tokens, fmt::join(corpora, ", "));
  timings["data"] = seconds_since(t0);
  report["data"] = {{"source", data_source},
                    {"why", data_why},
                    {"dir", builtin ? sample.string() : data_dir.string()},
                    {"corpora", corpora},
                    {"documents", summary.documents},
                    {"val_documents", summary.val_documents},
                    {"tokens", dataset_tokens},
                    {"bilingual_rate", plan.bilingual_rate},
                    {"multi_pair_documents", pc.pairs_per_document > 1},
                    {"encoding", tokenizer.name()}};

  // ---- 2. train -------------------------------------------------------------------------
  // Training gets the budget left after the data stage, less the evaluation's estimate and
  // the final stages' (at least 10 s: a report with a barely trained model beats none).
  const double train_limit_s =
      std::max(10.0, budget_s - seconds_since(job_start) - eval_estimate_s - finish_seconds_estimate(plan) -
                         0.05 * budget_s);
  stage_header(2, "train",
               fmt::format("{} preset on {}, {} steps of {} x context (time limit {:.0f} s of the {} min budget)",
                           plan.preset, plan.device_name, plan.steps, plan.batch, train_limit_s, plan.minutes));
  t0 = Clock::now();
  const auto train_shards = shard_list(ds_dir, "train");
  const auto val_shards = shard_list(ds_dir, "val");
  FLASHGPT_CHECK(!train_shards.empty(), "{}: data prepare wrote no training shards", ds_dir.string());
  const ModelConfig mc = model_preset(plan.preset, tokenizer.vocab_size());
  const int64_t T = mc.context;
  const MemoryEstimate mem = train_memory_estimate(mc, plan.batch, T, plan.device);
  const uint64_t available = memory_available(plan.device);
  FLASHGPT_CHECK(available == 0 || mem.total() <= available,
                 "batch {} x {} tokens of the {} preset needs about {:.2f} GiB but {} has {:.2f} GiB available: lower "
                 "--batch", plan.batch, T, plan.preset, mem.total() / 1073741824.0, plan.device_name,
                 available / 1073741824.0);
  std::filesystem::create_directories(run_dir);
  Json train_options = {{"recipe", plan.recipe}, {"preset", plan.preset}, {"data", ds_dir.string()},
                        {"out", run_dir.string()}, {"device", plan.device_name}, {"steps", plan.steps},
                        {"batch", plan.batch}, {"context", T}, {"lr", plan.lr}, {"warmup", plan.warmup},
                        {"schedule", plan.schedule}, {"min-lr-ratio", plan.min_lr_ratio},
                        {"eval-every", plan.eval_every}, {"eval-batches", plan.eval_batches}, {"save-every", 0},
                        {"seed", o.seed}, {"weight-decay", plan.weight_decay}, {"time-limit", train_limit_s},
                        {"keep-best", plan.keep_best}, {"threads", o.threads}};
  Json config;
  config["options"] = train_options;
  config["model"] = Json::parse(model_config_to_json(mc));
  config["encoding"] = tokenizer.name();
  config["train_shards"] = train_shards.size();
  config["val_shards"] = val_shards.size();
  config["params"] = model_param_count(mc);
  config["params_unpadded"] = model_param_count_unpadded(mc);
  config["written_by"] = "flashgpt run";
  train_write_run_config(run_dir, config.dump(2) + "\n");

  ModelOptions mo;
  mo.max_batch = plan.batch;
  mo.max_context = T;
  mo.threads = o.threads;
  std::unique_ptr<GptModel> model = gpt_create(plan.device, mc, mo);
  TrainConfig tc;
  tc.model = mc;
  tc.encoding = tokenizer.name();
  tc.train_shards = train_shards;
  tc.val_shards = val_shards;
  tc.out_dir = run_dir;
  tc.batch = plan.batch;
  tc.context = T;
  tc.epochs = 1000000;  // the step count decides
  tc.max_steps = plan.steps;
  tc.adam = AdamWConfig{plan.lr, 0.9, 0.95, 1e-8, plan.weight_decay};
  tc.schedule.kind = lr_schedule_from_name(plan.schedule);
  tc.schedule.lr = plan.lr;
  tc.schedule.warmup_steps = plan.warmup;
  tc.schedule.min_lr_ratio = plan.min_lr_ratio;
  tc.eval_every = plan.eval_every;
  tc.eval_batches = plan.eval_batches;
  tc.save_every = 0;
  tc.time_limit = train_limit_s;
  tc.keep_best = plan.keep_best && !val_shards.empty();
  tc.log_every = plan.device == Device::cuda ? 50 : 10;
  tc.seed = o.seed;
  tc.peak_flops = plan.device == Device::cuda ? 989e12 : 0;
  tc.progress = true;
  tc.options_json = train_options.dump();
  tc.stop = &cli_stop_flag();
  TrainResult tr;
  {
    StopSignalGuard guard;
    tr = train_run(tc, *model);
  }
  model.reset();
  if (tr.stopped_by_signal != 0) {
    fmt::print(stderr, "run: stopped by signal {} after step {}; the checkpoint and partial results are in {}\n",
               tr.stopped_by_signal, tr.state.step, out.string());
    throw CliExit{128 + tr.stopped_by_signal};
  }
  const bool capped = tr.stopped_by_time;
  if (capped) {
    fmt::print(stderr, "train: the time limit ({:.0f} s of the {} min budget) ended training at step {} of {}\n",
               train_limit_s, plan.minutes, tr.state.step, plan.steps);
  }
  // The checkpoint evaluated: the lowest validation loss (RUN/best) when one was kept.
  const bool best_kept = tr.best_step >= 0 && std::filesystem::exists(run_dir / "best" / "checkpoint.safetensors");
  const std::filesystem::path eval_run = best_kept ? run_dir / "best" : run_dir;
  const bool loss_plot = train_plot_losses(run_dir, cli_script_path("plot_loss.py")) == 0 &&
                         std::filesystem::exists(run_dir / "loss.png");
  if (loss_plot) std::filesystem::copy_file(run_dir / "loss.png", out / "loss.png");
  timings["train"] = seconds_since(t0);
  report["train"] = {{"preset", plan.preset},
                     {"device", plan.device_name},
                     {"params", model_param_count_unpadded(mc)},
                     {"context", T},
                     {"batch", plan.batch},
                     {"steps_planned", plan.steps},
                     {"steps", tr.state.step},
                     {"stopped_by_time_cap", capped},
                     {"tokens", tr.state.tokens},
                     {"lr", plan.lr},
                     {"last_loss", tr.last_loss},
                     {"last_val_loss", tr.last_val_loss},
                     {"time_limit_s", train_limit_s},
                     {"best_step", tr.best_step},
                     {"best_val_loss", tr.best_val_loss},
                     {"checkpoint_evaluated", eval_run.string()},
                     {"seconds", tr.seconds},
                     {"loss_plot", loss_plot ? "loss.png" : ""}};
  // With a recipe, `train --recipe NAME` and the values the job changed (preset, steps,
  // batch, warmup and validation follow --steps); without, every value.
  std::vector<std::string> train_argv = {"flashgpt", "train"};
  if (!plan.recipe.empty()) train_argv.insert(train_argv.end(), {"--recipe", plan.recipe});
  train_argv.insert(train_argv.end(),
                    {"--preset", plan.preset, "--data", ds_dir.string(), "--out", run_dir.string(), "--device",
                     plan.device_name, "--steps", std::to_string(plan.steps), "--batch", std::to_string(plan.batch),
                     "--warmup", std::to_string(plan.warmup), "--eval-every", std::to_string(plan.eval_every)});
  if (plan.recipe.empty()) {
    train_argv.insert(train_argv.end(),
                      {"--lr", fmt::format("{}", plan.lr), "--schedule", plan.schedule, "--min-lr-ratio",
                       fmt::format("{}", plan.min_lr_ratio), "--eval-batches", std::to_string(plan.eval_batches),
                       "--save-every", "0", "--weight-decay", fmt::format("{}", plan.weight_decay)});
    if (tc.keep_best) train_argv.push_back("--keep-best");
  }
  train_argv.insert(train_argv.end(),
                    {"--time-limit", fmt::format("{:.0f}", train_limit_s), "--seed", std::to_string(o.seed)});

  // ---- 3. eval --------------------------------------------------------------------------
  std::vector<TranslatePair> test, dev;
  std::string test_name;
  size_t test_total = 0;
  std::string check_reason;
  if (builtin) {
    test = translate_read_pairs(sample, "test");
    dev = translate_read_pairs(sample, "dev");
    builtin_check_disjoint(translate_read_pairs(sample, "train.sample"), test);
    test_name = "built-in sample test split (share/fren-sample/test)";
    check_reason = "built-in sample: the test split's sentences were checked absent from its training file";
  } else {
    const auto wmt = data_dir / "wmt14";
    test = translate_read_pairs(wmt, "newstest2014");
    dev = translate_read_pairs(wmt, "newstest2012");
    for (auto& p : translate_read_pairs(wmt, "newstest2013")) dev.push_back(std::move(p));
    const TrainingDataCheck check = translate_check_training_data(eval_run, ds_dir);
    FLASHGPT_CHECK(check.clean, "refusing to score on newstest2014: {}", check.reason);
    test_name = "newstest2014";
    check_reason = check.reason;
  }
  test_total = test.size();
  if (plan.eval_sentences > 0 && static_cast<size_t>(plan.eval_sentences) < test.size()) {
    test.resize(static_cast<size_t>(plan.eval_sentences));
  }
  stage_header(3, "eval",
               fmt::format("{} of {} {} sentences, K = [{}], en-fr and fr-en, checkpoint {}", test.size(), test_total,
                           test_name, fmt::join(o.shots, ","), eval_run.string()));
  t0 = Clock::now();
  const RunWeights weights = run_load_weights(eval_run);
  std::string engine_note;
  auto engine = run_inference_engine(plan, weights, o.threads, &engine_note);
  TranslateConfig xc;
  xc.seed = o.seed;
  xc.max_new_tokens = plan.max_new_tokens;
  xc.sampling = SamplingConfig{.greedy = true};
  xc.progress = true;
  // One (direction, K) at a time, in order of importance: en-fr at the largest K (the
  // issue's target), both directions zero-shot, fr-en at the largest K, then the rest. A
  // setting that would end past the budget is skipped (the first one always runs), so a
  // job running late loses the least important ones. Demonstrations depend on (seed,
  // sentence, K) alone: one setting per call scores as one call of all.
  std::vector<std::pair<TranslateDirection, int64_t>> order;
  const auto order_add = [&](TranslateDirection d, int64_t k) {
    if (std::find(order.begin(), order.end(), std::pair{d, k}) == order.end()) order.emplace_back(d, k);
  };
  const int64_t k_max = *std::max_element(o.shots.begin(), o.shots.end());
  const int64_t k_min = *std::min_element(o.shots.begin(), o.shots.end());
  order_add(TranslateDirection::en_fr, k_max);
  order_add(TranslateDirection::en_fr, k_min);
  order_add(TranslateDirection::fr_en, k_min);
  order_add(TranslateDirection::fr_en, k_max);
  for (const auto d : {TranslateDirection::en_fr, TranslateDirection::fr_en}) {
    for (const int64_t k : o.shots) order_add(d, k);
  }
  const double setting_estimate_s = eval_setting_seconds_estimate(plan, static_cast<int64_t>(test.size()));
  std::vector<TranslateSetting> settings;
  std::vector<std::string> skipped;
  for (const auto& [direction, k] : order) {
    const double left_s = budget_s - seconds_since(job_start) - 5.0;  // the report's few seconds
    if (!settings.empty() && left_s < setting_estimate_s) {
      skipped.push_back(fmt::format("{} K={}", translate_direction_name(direction), k));
      fmt::print(stderr, "eval: skipped {} K={}: {:.0f} s of the {} min budget left, the setting takes about {:.0f} s\n",
                 translate_direction_name(direction), k, left_s, plan.minutes, setting_estimate_s);
      continue;
    }
    xc.directions = {direction};
    xc.shots = {k};
    for (auto& one : translate_evaluate(*engine, tokenizer, test, dev, xc)) settings.push_back(std::move(one));
  }
  std::sort(settings.begin(), settings.end(), [](const TranslateSetting& a, const TranslateSetting& b) {
    return std::pair{a.direction, a.shots} < std::pair{b.direction, b.shots};
  });
  engine.reset();
  Json tj;
  tj["run"] = eval_run.string();
  tj["step"] = weights.step;
  if (best_kept) tj["checkpoint"] = {{"selected_by", "lowest validation loss"}, {"val_loss", tr.best_val_loss}};
  if (!skipped.empty()) tj["skipped"] = skipped;
  tj["test_set"] = {{"name", test_name}, {"sentences", test.size()}, {"of", test_total}};
  tj["dev_pool"] = dev.size();
  tj["seed"] = o.seed;
  tj["decoding"] = {{"greedy", true}, {"max_new_tokens", plan.max_new_tokens}, {"stop", "\n"}};
  tj["training_data_check"] = check_reason;
  if (!engine_note.empty()) tj["note"] = engine_note;
  auto written = translate_results_write(settings, eval_dir / "translate", /*name_hypotheses=*/false);
  tj["results"] = std::move(written.results);
  tj["examples"] = std::move(written.examples);
  if (!settings.empty()) tj["signatures"] = {settings[0].bleu.signature, settings[0].chrf.signature};
  const auto translate_json = eval_dir / "translate.json";
  atomic_write_file(translate_json, tj.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  const bool kshot_plot = cli_plot_draw(cli_script_path("plot_translate.py"), translate_json, out / "kshot.png");
  timings["eval"] = seconds_since(t0);
  report["eval"] = tj;
  report["eval"]["kshot_plot"] = kshot_plot ? "kshot.png" : "";
  std::vector<std::string> eval_argv = {"flashgpt", "eval", "translate", "--run", eval_run.string(), "--device",
                                        plan.generation_device == Device::cuda ? "cuda" : "cpu", "--shots",
                                        fmt::format("{}", fmt::join(o.shots, ",")), "--limit",
                                        std::to_string(plan.eval_sentences), "--max-new-tokens",
                                        std::to_string(plan.max_new_tokens), "--seed", std::to_string(o.seed),
                                        "--batch", std::to_string(plan.infer_batch)};
  if (!builtin) eval_argv.insert(eval_argv.end(), {"--data-dir", data_dir.string()});

  // ---- 4. report ------------------------------------------------------------------------
  stage_header(4, "report", (out / "report.md").string());
  t0 = Clock::now();
  // The exact command, every option spelled out with the value it ran with.
  std::vector<std::string> run_argv = {"flashgpt", "run", "--data", data_source};
  if (downloaded) {
    run_argv.insert(run_argv.end(), {"--download-dir", data_dir.parent_path().string()});
    if (!o.download_manifest.empty()) run_argv.insert(run_argv.end(), {"--download-manifest", o.download_manifest});
  } else if (!builtin) {
    run_argv.insert(run_argv.end(), {"--data-dir", source_data_dir.string()});
  }
  run_argv.insert(run_argv.end(),
                  {"--device", plan.device_name, "--recipe", plan.recipe.empty() ? "none" : plan.recipe, "--preset",
                   plan.preset, "--steps", std::to_string(plan.steps),
                   "--minutes", fmt::format("{}", plan.minutes), "--batch", std::to_string(plan.batch),
                   "--eval-sentences", std::to_string(plan.eval_sentences), "--shots",
                   fmt::format("{}", fmt::join(o.shots, ",")), "--max-new-tokens", std::to_string(plan.max_new_tokens),
                   "--seed", std::to_string(o.seed), "--threads", std::to_string(o.threads), "--out", "NEW_DIR"});
  report["commands"] = {{"run", command_line(run_argv)},
                        {"prepare", command_line(prepare_argv)},
                        {"train", command_line(train_argv)}};
  if (!builtin) report["commands"]["eval"] = command_line(eval_argv);
  timings["report"] = seconds_since(t0);
  timings["total"] = seconds_since(job_start);
  report["timings_s"] = timings;

  const auto& m = report["machine"];
  std::string md;
  md += "# flashgpt run\n\n";
  md += fmt::format("Started {}; {} on {}. Everything below was produced by one `flashgpt run`: prepare the data, "
                    "train, evaluate zero-/one-/few-shot translation, write this report.\n\n",
                    started, plan.device_name,
                    plan.device == Device::cuda ? m["gpu"].get<std::string>() : m["cpu"].get<std::string>());
  md += "## Summary\n\n";
  md += "| stage | what | seconds |\n| --- | --- | --- |\n";
  md += fmt::format("| data | {} documents, {} tokens ({}) | {:.1f} |\n", summary.documents, dataset_tokens,
                    builtin ? "built-in sample" : downloaded ? "downloaded corpora" : "shared corpora", timings["data"].get<double>());
  md += fmt::format("| train | {} preset, {} steps, last loss {:.4f}, val loss {:.4f} | {:.1f} |\n", plan.preset,
                    tr.state.step, tr.last_loss, tr.last_val_loss, timings["train"].get<double>());
  md += fmt::format("| eval | {} sentences x {} settings{}, checkpoint of step {} | {:.1f} |\n", test.size(),
                    settings.size(), skipped.empty() ? "" : fmt::format(" ({} skipped)", skipped.size()),
                    weights.step, timings["eval"].get<double>());
  md += fmt::format("| total | | {:.1f} |\n\n", timings["total"].get<double>());

  md += "## Machine\n\n";
  md += fmt::format("- CPU: {} ({} cores), {} GiB memory\n", m["cpu"].get<std::string>(), m["cores"].get<unsigned>(),
                    m["memory_gib"].get<double>());
  md += fmt::format("- GPU: {}\n", m["gpu"].get<std::string>().empty() ? "none" : m["gpu"].get<std::string>());
  md += fmt::format("- OS: {}; CUDA in this build: {}; device used: {}\n\n", m["os"].get<std::string>(),
                    m["cuda_build"].get<bool>() ? "yes" : "no", plan.device_name);

  md += "## Data\n\n";
  md += fmt::format("- source: {} ({})\n", builtin ? "built-in sample `share/fren-sample`" : data_dir.string(),
                    data_why);
  md += fmt::format("- corpora: {}\n", fmt::join(corpora, ", "));
  md += fmt::format("- {} training and {} validation documents, {} tokens ({}), bilingual rate {}\n\n",
                    summary.documents, summary.val_documents, dataset_tokens, tokenizer.name(), plan.bilingual_rate);

  md += "## Training\n\n";
  md += fmt::format("- model: {} preset, {:.2f} M parameters, context {}\n", plan.preset,
                    model_param_count_unpadded(mc) / 1e6, T);
  md += fmt::format("- recipe: {}\n", plan.recipe.empty() ? std::string("none (the CPU job's small settings)")
                                                            : fmt::format("{} (src/cli/recipes.h)", plan.recipe));
  md += fmt::format("- {} of {} planned steps{}, batch {} x {}, {:.0f} tokens, AdamW lr {} (warmup {}, {} to {}%), "
                    "weight decay {}\n",
                    tr.state.step, plan.steps,
                    capped ? fmt::format(" (stopped by the time limit: {:.0f} s of the {} min budget)", train_limit_s,
                                         plan.minutes)
                           : "",
                    plan.batch, T, tr.state.tokens, plan.lr, plan.warmup, plan.schedule, plan.min_lr_ratio * 100,
                    plan.weight_decay);
  md += fmt::format("- last training loss: {:.4f}\n- last validation loss: {:.4f}\n", tr.last_loss, tr.last_val_loss);
  if (best_kept) {
    md += fmt::format("- checkpoint evaluated: step {}, validation loss {:.4f} (the lowest of the run, kept as "
                      "`train/best`; {})\n",
                      tr.best_step, tr.best_val_loss,
                      tr.best_step == tr.state.step
                          ? std::string("the last step")
                          : fmt::format("the last step, {}, had {:.4f}", tr.state.step, tr.last_val_loss));
  } else {
    md += fmt::format("- checkpoint evaluated: step {}, the last one (no validation split to select on)\n",
                      tr.state.step);
  }
  md += fmt::format("- training time: {}\n\n", fmt_seconds(tr.seconds));
  md += loss_plot ? "![loss curve](loss.png)\n\n" : "(no loss plot: python3 with matplotlib was not available)\n\n";

  md += "## Translation scores\n\n";
  md += fmt::format("Test set: {}, {} of {} sentences; demonstrations from {} ({} pairs); greedy decoding, at most {} "
                    "new tokens, stop at a newline. {}\n\n",
                    test_name, test.size(), test_total, builtin ? "the sample's dev split" : "newstest2012+2013",
                    dev.size(), plan.max_new_tokens, check_reason);
  if (!engine_note.empty()) md += fmt::format("Note: {}.\n\n", engine_note);
  if (!skipped.empty()) {
    md += fmt::format("Skipped to stay within the {} min budget: {}.\n\n", plan.minutes, fmt::join(skipped, ", "));
  }
  md += "| direction | shots | BLEU | chrF | demonstrations given (mean) | seconds |\n| --- | --- | --- | --- | --- | --- "
        "|\n";
  for (const auto& s : settings) {
    md += fmt::format("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.1f} |\n", translate_direction_name(s.direction),
                      s.shots, s.bleu.score, s.chrf.score, s.shots_mean, s.seconds);
  }
  if (!settings.empty()) {
    md += fmt::format("\nsacreBLEU signatures: `{}`, `{}`\n", settings[0].bleu.signature, settings[0].chrf.signature);
  }
  md += kshot_plot ? "\n![score against K](kshot.png)\n\n" : "\n(no K-shot plot: python3 with matplotlib was not available)\n\n";

  md += "## Example translations\n\n";
  md += "The seed's three prompts (French ones for fr-en), in every setting:\n\n";
  md += "| direction | shots | source | output |\n| --- | --- | --- | --- |\n";
  for (const auto& s : settings) {
    for (const auto& e : s.examples) {
      md += fmt::format("| {} | {} | {} | {} |\n", translate_direction_name(s.direction), s.shots, md_escape(e.source),
                        md_escape(e.output));
    }
  }
  md += "\n## Timings\n\n| stage | seconds |\n| --- | --- |\n";
  for (const char* k : {"data", "train", "eval", "report", "total"}) {
    md += fmt::format("| {} | {:.1f} |\n", k, timings[k].get<double>());
  }
  md += "\n## Reproduce\n\n";
  md += "From the repository root, with a build in `build/` (`make build`); NEW_DIR must not exist:\n\n```sh\n";
  md += "build/" + report["commands"]["run"].get<std::string>() + "\n```\n\n";
  md += "or stage by stage, as the job did (into this run's folders; use fresh ones to repeat):\n\n```sh\n";
  for (const char* k : {"prepare", "train", "eval"}) {
    if (report["commands"].contains(k)) md += "build/" + report["commands"][k].get<std::string>() + "\n";
  }
  md += "```\n\n";
  if (builtin) {
    md += "(`flashgpt eval translate` scores newstest2014 only; the built-in sample's test split is scored by "
          "`flashgpt run --data builtin` alone.)\n\n";
  }
  md += "The numbers of this report are also in `report.json`, the translation results in "
        "`eval/translate.json`, the hypotheses in `eval/translate/`, the training log in `train/log.jsonl`.\n";
  atomic_write_file(out / "report.json", report.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  atomic_write_file(out / "report.md", md);
  fmt::print(stderr, "\nrun: done in {}; report: {}\n", fmt_seconds(seconds_since(job_start)),
             (out / "report.md").string());
  fmt::print("{}\n", (out / "report.md").string());
}

}  // namespace

void cli_add_run(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  auto* r = app.add_subcommand("run",
                               "The whole system: prepare data, train, evaluate zero/one/few-shot translation, write "
                               "OUT/report.md (the README's `make run`)");
  r->add_option("-o,--out", o->out, "Output folder, must not exist (default: results/run, else results/run-N)");
  r->add_option("--data", o->data, "auto (the corpora when found, else a download, else the built-in sample), shared, download or builtin")
      ->capture_default_str()->check(CLI::IsMember({"auto", "shared", "download", "builtin"}));
  cli_option_data_dir(*r, o->data_dir);
  r->add_option("--download-dir", o->download_dir,
                "Where --data download (or auto without corpora) fetches to (default: ~/.cache/flashgpt/wmt14)");
  r->add_option("--download-manifest", o->download_manifest,
                "JSON list of {name,url,...} replacing the built-in URLs (a mirror); needs dev.tgz, test-full.tgz, "
                "training-parallel-nc-v9.tgz");
  cli_option_tokenizer_dir(*r, o->tokenizer_dir);
  r->add_option("--device", o->device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  r->add_option("--recipe", o->recipe,
                "Data and training settings: auto (translate on cuda, none on cpu), none (the CPU job's small "
                "settings) or a named recipe (translate: recipe 2 v2 of docs/experiments.md); --preset, --steps and "
                "--batch override it")
      ->capture_default_str()->check(CLI::IsMember({"auto", "none"}) | cli_recipe_check());
  r->add_option("--preset", o->preset, "Model preset: tiny, small or seed (default: the recipe's (seed), else tiny)")
      ->check(CLI::IsMember(model_preset_names()));
  r->add_option("--steps", o->steps, "Optimizer steps (default: the recipe's (4700), else 100)")
      ->check(cli_unsigned_integer())->check(CLI::Range(int64_t{1}, int64_t{10'000'000}));
  r->add_option("--minutes", o->minutes,
                "Wall-clock budget of the whole job, minutes: training gets what the data stage leaves less the "
                "evaluation's estimate (default: 6 on cpu, 15 on cuda)")
      ->check(CLI::Range(0.01, 7 * 24 * 60.0));
  r->add_option("--batch", o->batch, "Windows per step (default: the recipe's (64), else 8)")
      ->check(cli_unsigned_integer())->check(CLI::Range(int64_t{1}, int64_t{4096}));
  r->add_option("--eval-sentences", o->eval_sentences,
                "Test sentences scored (0: all; default: 50 on cpu, all 3003 of newstest2014 on cuda)")
      ->check(cli_unsigned_integer())->check(CLI::Range(int64_t{0}, int64_t{1'000'000}));
  r->add_option("--shots", o->shots, "Numbers of demonstrations K (comma-separated, 0..64)")->delimiter(',')
      ->capture_default_str()->check(CLI::Range(int64_t{0}, int64_t{64}));
  r->add_option("--max-new-tokens", o->max_new_tokens, "Tokens per translation at most (default: 40 on cpu, 200 on cuda)")
      ->check(cli_unsigned_integer())->check(CLI::Range(int64_t{1}, int64_t{4096}));
  cli_option_seed(*r, o->seed, "data preparation, training and the demonstration draw");
  cli_option_threads(*r, o->threads, "CPU threads");
  r->callback([r, o] {
    FLASHGPT_CHECK(!o->shots.empty(), "--shots: give at least one K");
    std::vector<int64_t> sorted = o->shots;
    std::sort(sorted.begin(), sorted.end());
    FLASHGPT_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), "--shots {}: a K is repeated",
                   fmt::join(o->shots, ","));
    try {
      run_all(r, *o);
    } catch (const std::filesystem::filesystem_error& e) {
      FLASHGPT_FAIL("run: {}", e.what());
    }
  });
}

}  // namespace flashgpt

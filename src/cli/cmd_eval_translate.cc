// `flashgpt eval translate --run RUN`: zero-, one- and few-shot English<->French on
// newstest2014 with the run's model on the CPU; BLEU and chrF per (direction, K) printed and
// written to RUN/eval/translate.json (atomically), the hypotheses beside it, and a plot of
// score against K (scripts/plot_translate.py, started from an argument vector).
#include "commands.h"
#include "options.h"
#include "translate_results.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/data.h>
#include <flashgpt/error.h>
#include <flashgpt/translate.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

struct EvalTranslateOptions {
  std::string run;
  std::vector<int64_t> shots = {0, 1, 5};
  std::string direction = "both";
  int64_t limit = 0;
  std::string data_dir;
  std::string train_data;
  uint64_t seed = 1234;
  int64_t max_new_tokens = 200;
  bool sample = false;
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  int64_t batch = 0;  // 0: 8 on the CPU, 64 on the GPU
  int threads = 0;
  std::string device = "auto";
  std::string tokenizer_dir;
  bool no_plot = false;
  bool quiet = false;
};

// DIR itself when it holds newstest2014, else DIR/wmt14 (DIR as `data prepare` takes it).
std::filesystem::path wmt14_dir(const std::string& given) {
  std::filesystem::path root = given;
  if (root.empty()) root = data_dir_default();
  FLASHGPT_CHECK(!root.empty(), "no data directory: pass --data-dir or set FLASHGPT_DATA_DIR");
  for (const char* ext : {".xz", ".gz", ""}) {
    if (std::filesystem::exists(root / fmt::format("newstest2014.fr-en.en{}", ext))) return root;
  }
  return root / "wmt14";
}

void run_eval_translate(const EvalTranslateOptions& o) {
  fmt::print(stderr,
             "eval translate: run={} shots=[{}] direction={} limit={} data_dir={} train_data={} seed={} "
             "max_new_tokens={} sample={} temperature={} top_k={} top_p={} batch={} threads={} device={}\n",
             o.run, fmt::join(o.shots, ","), o.direction, o.limit, o.data_dir.empty() ? "(default)" : o.data_dir,
             o.train_data.empty() ? "(from RUN/config.json)" : o.train_data, o.seed, o.max_new_tokens, o.sample,
             o.temperature, o.top_k, o.top_p, o.batch, o.threads, o.device);
  const std::filesystem::path run = o.run;
  FLASHGPT_CHECK(std::filesystem::is_directory(run), "--run {}: not a run directory", o.run);
  FLASHGPT_CHECK(o.limit >= 0, "--limit {} cannot be negative", o.limit);
  const TrainingDataCheck check = translate_check_training_data(run, o.train_data);
  FLASHGPT_CHECK(check.clean, "refusing to score {} on newstest2014: {}", o.run, check.reason);
  fmt::print(stderr, "training data check: {}\n", check.reason);

  TranslateConfig config;
  config.shots = o.shots;
  config.directions = translate_directions_from_name(o.direction);
  config.seed = o.seed;
  config.max_new_tokens = o.max_new_tokens;
  config.sampling = {!o.sample, o.temperature, o.top_k, o.top_p, o.seed};
  config.progress = !o.quiet;
  sampling_validate(config.sampling);

  const auto dir = wmt14_dir(o.data_dir);
  std::vector<TranslatePair> test = translate_read_pairs(dir, "newstest2014");
  const size_t test_total = test.size();
  if (o.limit > 0 && static_cast<size_t>(o.limit) < test.size()) test.resize(static_cast<size_t>(o.limit));
  std::vector<TranslatePair> dev = translate_read_pairs(dir, "newstest2012");
  for (auto& p : translate_read_pairs(dir, "newstest2013")) dev.push_back(std::move(p));
  fmt::print(stderr, "data: {} of {} newstest2014 pairs, {} dev pairs (newstest2012+2013) from {}\n", test.size(),
             test_total, dev.size(), dir.string());

  const RunWeights weights = run_load_weights(run);
  const Tokenizer tokenizer = Tokenizer::load(weights.encoding, cli_tokenizer_dir(o.tokenizer_dir));
  InferenceOptions io;
  const std::string device = inference_resolve_device(o.device, &weights.config);
  io.max_slots = o.batch > 0 ? o.batch : device == "cuda" ? 64 : 8;
  io.threads = o.threads;
  fmt::print(stderr, "engine: {} with {} slots\n", device, io.max_slots);
  auto engine = inference_create(device, weights.config, weights.params, io);
  const auto settings = translate_evaluate(*engine, tokenizer, test, dev, config);

  const auto out_dir = run / "eval";
  const auto hyp_dir = out_dir / "translate";
  nlohmann::ordered_json j;
  j["run"] = o.run;
  j["checkpoint"] = weights.checkpoint.string();
  j["step"] = weights.step;
  j["model"] = {{"preset", weights.config.preset}, {"context", weights.config.context},
                {"params", model_param_count_unpadded(weights.config)}};
  j["test_set"] = {{"name", "newstest2014"}, {"sentences", test.size()}, {"of", test_total}};
  j["dev_pool"] = dev.size();
  j["seed"] = o.seed;
  j["decoding"] = {{"greedy", config.sampling.greedy}, {"temperature", o.temperature}, {"top_k", o.top_k},
                   {"top_p", o.top_p}, {"max_new_tokens", o.max_new_tokens}, {"stop", "\n"}};
  j["training_data_check"] = check.reason;
  j["prompt_format"] = translate_prompt(std::vector<TranslatePair>{{"{en}", "{fr}"}}, "{source}",
                                        TranslateDirection::en_fr);
  auto written = translate_results_write(settings, hyp_dir, /*name_hypotheses=*/true);
  fmt::print("{:<6} {:>5} {:>7} {:>7} {:>9} {:>10} {:>9}\n", "dir", "shots", "BLEU", "chrF", "K given", "shortened",
             "seconds");
  for (const auto& s : settings) {
    fmt::print("{:<6} {:>5} {:>7.2f} {:>7.2f} {:>9.2f} {:>10} {:>9.1f}\n", translate_direction_name(s.direction),
               s.shots, s.bleu.score, s.chrf.score, s.shots_mean, s.prompts_shortened, s.seconds);
  }
  if (!settings.empty()) {
    fmt::print("{}\n{}\n", settings[0].bleu.signature, settings[0].chrf.signature);
  }
  for (const auto& s : settings) {
    for (const auto& e : s.examples) {
      fmt::print("[{} {}-shot] {} -> {}\n", translate_direction_name(s.direction), s.shots, e.source, e.output);
    }
  }
  j["results"] = std::move(written.results);
  j["examples"] = std::move(written.examples);
  const auto json_path = out_dir / "translate.json";
  atomic_write_file(json_path, j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  fmt::print("wrote {} and the hypotheses in {}\n", json_path.string(), hyp_dir.string());
  if (!o.no_plot) {
    const auto png = out_dir / "translate.png";
    if (cli_plot_draw(cli_script_path("plot_translate.py"), json_path, png)) fmt::print("plot: {}\n", png.string());
  }
}

}  // namespace

void cli_add_eval_translate(CLI::App& eval) {
  auto o = std::make_shared<EvalTranslateOptions>();
  auto* t = eval.add_subcommand("translate",
                                "Zero-, one- and few-shot en<->fr on newstest2014 with a run's model: BLEU and chrF "
                                "per K, a plot, example outputs");
  t->add_option("--run", o->run, "Run directory (RUN/checkpoint.safetensors; results go to RUN/eval/)")->required();
  t->add_option("--shots", o->shots, "Numbers of demonstrations K (comma-separated)")->delimiter(',')
      ->capture_default_str();
  t->add_option("--direction", o->direction, "en-fr, fr-en or both")->capture_default_str()
      ->check(CLI::IsMember({"en-fr", "fr-en", "both"}));
  t->add_option("--limit", o->limit, "Score the first N test sentences only (0: all 3003)")->capture_default_str();
  t->add_option("--data-dir", o->data_dir,
                "Where newstest2012/13/14 are: DATA or DATA/wmt14 (default: FLASHGPT_DATA_DIR or ../shared/data)");
  t->add_option("--train-data", o->train_data,
                "The run's prepared dataset, if it moved (default: options.data of RUN/config.json)");
  cli_option_seed(*t, o->seed, "the demonstration draw (and of sampling)");
  t->add_option("--max-new-tokens", o->max_new_tokens, "Tokens per translation at most")->capture_default_str()
      ->check(CLI::PositiveNumber);
  t->add_flag("--sample", o->sample, "Sample instead of greedy decoding (with --temperature, --top-k, --top-p)");
  t->add_option("--temperature", o->temperature, "Sampling temperature")->capture_default_str();
  t->add_option("--top-k", o->top_k, "Sampling top-k (0: off)")->capture_default_str();
  t->add_option("--top-p", o->top_p, "Sampling top-p (1: off)")->capture_default_str();
  t->add_option("--batch", o->batch, "Sentences in flight at once (KV-cache slots; 0: 8 on cpu, 64 on cuda)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cli_option_threads(*t, o->threads, "CPU threads");
  t->add_option("--device", o->device, "cpu, cuda, or auto (cuda where a GPU is present)")->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cli_option_tokenizer_dir(*t, o->tokenizer_dir);
  t->add_flag("--no-plot", o->no_plot, "Do not draw RUN/eval/translate.png");
  t->add_flag("--quiet", o->quiet, "No progress lines");
  t->callback([o] { run_eval_translate(*o); });
}

}  // namespace flashgpt

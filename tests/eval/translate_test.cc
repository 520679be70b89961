// eval translate: prompt construction, the demonstration draw, the training-data check, and
// `flashgpt eval translate` end to end on a tiny random model (scores computed, files
// written, refusal of a run trained on the test set). Compiled a second time with
// FLASHGPT_TRANSLATE_GPU_TESTS as eval_translate_cuda_test (label gpu): the CLI with --device cuda.
#include "common/test_support.h"

#include <flashgpt/data_prepare.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/train.h>
#include <flashgpt/translate.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

extern char** environ;

namespace flashgpt {
namespace {

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            (std::string("flashgpt_") + info->name() + "_" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

#ifndef FLASHGPT_TRANSLATE_GPU_TESTS  // the CPU tests; the GPU ones are at the end
TEST(TranslatePrompt, SeedFormatWithKDemonstrations) {
  const std::vector<TranslatePair> demos = {{"Hello.", "Bonjour."}, {"Yes.", "Oui."}};
  EXPECT_EQ(translate_prompt({}, "Good morning.", TranslateDirection::en_fr), "English: Good morning.\nFrench:");
  EXPECT_EQ(translate_prompt(std::span(demos).first(1), "Good morning.", TranslateDirection::en_fr),
            "English: Hello.\nFrench: Bonjour.\n\nEnglish: Good morning.\nFrench:");
  EXPECT_EQ(translate_prompt(demos, "Merci.", TranslateDirection::fr_en),
            "French: Bonjour.\nEnglish: Hello.\n\nFrench: Oui.\nEnglish: Yes.\n\nFrench: Merci.\nEnglish:");
  EXPECT_EQ(translate_directions_from_name("both").size(), 2u);
  EXPECT_THROW(translate_directions_from_name("de-en"), Error);
}

// data prepare's multi-pair training documents are these prompts followed by the answer:
// the K-shot prompt a model is scored on is the prefix of a document it was trained on.
TEST(TranslatePrompt, MultiPairTrainingDocumentsArePromptsPlusTheAnswer) {
  const std::vector<TextPair> pairs = {{"Good morning.", "Bonjour.", 1},
                                       {"It is \"new\" (2014)!", "C'est « nouveau » (2014) !", 2},
                                       {"Thank you for your help.", "Merci pour votre aide.", 3}};
  for (size_t k = 0; k < pairs.size(); ++k) {
    std::vector<TranslatePair> demos;
    for (size_t i = 0; i < k; ++i) demos.push_back({pairs[i].en, pairs[i].fr});
    const auto first = std::span(pairs).first(k + 1);
    EXPECT_EQ(multi_pair_document(first, PairDirection::en_fr),
              translate_prompt(demos, pairs[k].en, TranslateDirection::en_fr) + " " + pairs[k].fr);
    EXPECT_EQ(multi_pair_document(first, PairDirection::fr_en),
              translate_prompt(demos, pairs[k].fr, TranslateDirection::fr_en) + " " + pairs[k].en);
  }
}

TEST(TranslatePrompt, DemonstrationsAreSeededDistinctAndNested) {
  const size_t pool = 6000;
  const auto five = translate_demo_indices(1234, 7, pool, 5);
  EXPECT_EQ(five, translate_demo_indices(1234, 7, pool, 5));         // repeats
  EXPECT_EQ(translate_demo_indices(1234, 7, pool, 1)[0], five[0]);    // K = 1 is a prefix of K = 5
  EXPECT_NE(five, translate_demo_indices(1234, 8, pool, 5));          // per sentence
  EXPECT_NE(five, translate_demo_indices(99, 7, pool, 5));            // per seed
  EXPECT_EQ(std::set<size_t>(five.begin(), five.end()).size(), 5u);   // without replacement
  for (size_t i : five) EXPECT_LT(i, pool);
  const auto all = translate_demo_indices(1, 1, 10, 10);  // a whole pool is a permutation
  EXPECT_EQ(std::set<size_t>(all.begin(), all.end()).size(), 10u);
  EXPECT_THROW(translate_demo_indices(1, 1, 3, 4), Error);
}

TEST(TranslateTrainingData, RefusesTheTestSetAndUnknownData) {
  TempDir dir;
  const auto run = dir / "run";
  const auto data = dir / "data";
  std::filesystem::create_directories(run);
  EXPECT_FALSE(translate_check_training_data(run).clean);  // no config.json
  write_text(run / "config.json", nlohmann::json{{"options", {{"data", data.string()}}}}.dump());
  auto check = translate_check_training_data(run);
  EXPECT_FALSE(check.clean);  // no summary.json
  EXPECT_NE(check.reason.find("summary.json"), std::string::npos) << check.reason;
  write_text(data / "summary.json",
             R"({"corpora": [{"name": "train.multi30k.fr-en"}, {"name": "train.europarl-v7-head3k.fr-en"}]})");
  check = translate_check_training_data(run);
  EXPECT_TRUE(check.clean) << check.reason;
  EXPECT_NE(check.reason.find("train.multi30k.fr-en"), std::string::npos);
  write_text(data / "summary.json",
             R"({"corpora": [{"name": "train.multi30k.fr-en"}, {"name": "NewsTest2014.fr-en"}]})");
  check = translate_check_training_data(run);
  EXPECT_FALSE(check.clean);
  EXPECT_NE(check.reason.find("NewsTest2014.fr-en"), std::string::npos) << check.reason;
  // --train-data points elsewhere.
  write_text(dir / "other" / "summary.json", R"({"corpora": [{"name": "mono.x.fr"}]})");
  EXPECT_TRUE(translate_check_training_data(run, dir / "other").clean);
}

#endif  // !FLASHGPT_TRANSLATE_GPU_TESTS

// Runs the CLI with stdout and stderr to files; returns the exit status.
int run_cli(const std::vector<std::string>& args, const std::filesystem::path& out, const std::filesystem::path& err) {
  const char* bin = std::getenv("FLASHGPT_BINARY_DIR");
  const std::string exe = (std::filesystem::path(bin ? bin : ".") / "flashgpt").string();
  std::vector<std::string> argv = {exe};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> c;
  for (auto& a : argv) c.push_back(a.data());
  c.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, c.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A tiny random run over cl100k_base, a fake dataset summary, and newstest files of a few lines.
struct Fixture {
  TempDir dir;
  std::filesystem::path run = dir / "run", data = dir / "dataset", wmt = dir / "wmt14";
  // preset "tiny" (one layer), or another preset at full size (the GPU tests: head dim 64).
  explicit Fixture(const std::string& preset = "tiny") {
    auto tok_dir = testing::tokenizer_dir();
    if (!tok_dir) throw Error("no tokenizer rank files: set FLASHGPT_TOKENIZER_DIR");
    const Tokenizer tokenizer = Tokenizer::load("cl100k_base", *tok_dir);
    ModelConfig c = model_preset(preset, static_cast<int64_t>(tokenizer.vocab_size()));
    if (preset == "tiny") c.n_layer = 1;
    auto model = gpt_create_cpu(c, {.max_batch = 1, .threads = 1});
    std::vector<float> params(static_cast<size_t>(model_param_count(c)));
    model_init_params(c, 3, params);
    model->params_set(params);
    std::filesystem::create_directories(run);
    CheckpointMeta meta;
    meta.model = c;
    meta.encoding = "cl100k_base";
    checkpoint_save(run / "checkpoint.safetensors", *model, meta);
    write_text(run / "config.json", nlohmann::json{{"options", {{"data", data.string()}}}}.dump());
    write_text(data / "summary.json", R"({"corpora": [{"name": "train.multi30k.fr-en"}]})");
    const std::vector<std::pair<std::string, std::string>> lines = {
        {"The cat sleeps.", "Le chat dort."}, {"It is raining today.", "Il pleut aujourd'hui."},
        {"Where is the station?", "Où est la gare ?"}, {"I like tea.", "J'aime le thé."}};
    for (const char* name : {"newstest2012", "newstest2013", "newstest2014"}) {
      std::string en, fr;
      for (const auto& [e, f] : lines) en += e + "\n", fr += f + "\n";
      write_text(wmt / (std::string(name) + ".fr-en.en"), en);
      write_text(wmt / (std::string(name) + ".fr-en.fr"), fr);
    }
  }
};

#ifndef FLASHGPT_TRANSLATE_GPU_TESTS
TEST(EvalTranslateCli, ScoresWritesAndRefuses) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  Fixture f;
  const auto out = f.dir / "out.txt", err = f.dir / "err.txt";
  const std::vector<std::string> args = {"eval", "translate", "--run", f.run.string(), "--data-dir",
                                         f.wmt.string(), "--limit", "3", "--shots", "0,1,3",
                                         "--max-new-tokens", "6", "--no-plot", "--threads", "1",
                                         "--device", "cpu"};
  std::vector<std::string> with_plot = args;
  with_plot.erase(std::find(with_plot.begin(), with_plot.end(), "--no-plot"));
  ASSERT_EQ(run_cli(with_plot, out, err), 0) << read_text(err);
  EXPECT_TRUE(std::filesystem::exists(f.run / "eval" / "translate.png")) << read_text(err);  // matplotlib: install-deps
  const auto j = nlohmann::json::parse(read_text(f.run / "eval" / "translate.json"));
  EXPECT_EQ(j["test_set"]["sentences"], 3);
  EXPECT_EQ(j["test_set"]["of"], 4);
  ASSERT_EQ(j["results"].size(), 6u);  // 2 directions x 3 K
  std::set<std::pair<std::string, int>> seen;
  for (const auto& r : j["results"]) {
    seen.insert({r["direction"].get<std::string>(), r["shots"].get<int>()});
    EXPECT_GE(r["bleu"].get<double>(), 0.0);
    EXPECT_LE(r["bleu"].get<double>(), 100.0);
    EXPECT_GE(r["chrf"].get<double>(), 0.0);
    EXPECT_LE(r["shots_mean"].get<double>(), r["shots"].get<double>());
    EXPECT_NE(r["bleu_line"].get<std::string>().find("BLEU|nrefs:1|case:mixed|eff:no|tok:13a"), std::string::npos);
    const std::string hyps = read_text(r["hypotheses"].get<std::string>());
    EXPECT_EQ(std::count(hyps.begin(), hyps.end(), '\n'), 3) << hyps;
  }
  EXPECT_EQ(seen.size(), 6u);
  EXPECT_EQ(j["examples"].size(), 18u);  // the seed's three prompts in each setting
  EXPECT_EQ(j["examples"][0]["source"], "Good morning.");
  EXPECT_NE(read_text(out).find("Good morning."), std::string::npos);
  EXPECT_NE(j["training_data_check"].get<std::string>().find("train.multi30k.fr-en"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(f.run / "eval" / "translate.json.tmp"));

  // Trained on the test set: refused, with the reason, and nothing new written.
  std::filesystem::remove(f.run / "eval" / "translate.json");
  write_text(f.data / "summary.json", R"({"corpora": [{"name": "newstest2014.fr-en"}]})");
  EXPECT_NE(run_cli(args, out, err), 0);
  const std::string message = read_text(err);
  EXPECT_NE(message.find("refusing"), std::string::npos) << message;
  EXPECT_NE(message.find("newstest2014.fr-en"), std::string::npos) << message;
  EXPECT_FALSE(std::filesystem::exists(f.run / "eval" / "translate.json"));
}

TEST(GenerateCli, StreamsAndBatches) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  Fixture f;
  const auto out = f.dir / "out.txt", err = f.dir / "err.txt";
  ASSERT_EQ(run_cli({"generate", "--run", f.run.string(), "Hello", "--max-new-tokens", "5", "--seed", "3",
                     "--threads", "1", "--device", "cpu"},
                    out, err),
            0)
      << read_text(err);
  const std::string one = read_text(out);
  EXPECT_EQ(one.rfind("Hello", 0), 0u) << one;  // the prompt, then its continuation
  ASSERT_EQ(run_cli({"generate", "--run", f.run.string(), "Hello", "--max-new-tokens", "5", "--seed", "3",
                     "--threads", "1", "--device", "cpu"},
                    out, err),
            0);
  EXPECT_EQ(read_text(out), one);  // the seed repeats
  write_text(f.dir / "prompts.txt", "Hello\nI like tea.\n");
  ASSERT_EQ(run_cli({"generate", "--run", f.run.string(), "--prompts", (f.dir / "prompts.txt").string(), "--json",
                     "--greedy", "--max-new-tokens", "4", "--stop", "\\n", "--threads", "1", "--device", "cpu"},
                    out, err),
            0)
      << read_text(err);
  std::istringstream lines(read_text(out));
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["index"], n++);
    EXPECT_LE(j["tokens"].get<int>(), 4);
  }
  EXPECT_EQ(n, 2);
  EXPECT_NE(run_cli({"generate", "--run", (f.dir / "nope").string(), "x"}, out, err), 0);
  EXPECT_NE(read_text(err).find("no checkpoint"), std::string::npos) << read_text(err);
}

#else  // the GPU variant (eval_translate_cuda_test, label gpu, skipped without a GPU)

// The GPU engine through the CLI (skipped without a GPU): eval translate and generate with
// --device cuda on a random small-preset run (head dim 64) finish and write what the CPU
// path writes; the hypotheses are compared with the CPU's (bf16 may flip near ties of a
// random model, so their agreement is printed, not required).
TEST(EvalTranslateCli, RunsOnTheGpu) {
  if (!inference_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Fixture f("small");
  const auto out = f.dir / "out.txt", err = f.dir / "err.txt";
  std::vector<std::string> args = {"eval", "translate", "--run", f.run.string(), "--data-dir", f.wmt.string(),
                                   "--shots", "0,1,3", "--max-new-tokens", "8", "--no-plot", "--device", "cuda",
                                   "--batch", "3"};
  ASSERT_EQ(run_cli(args, out, err), 0) << read_text(err);
  EXPECT_NE(read_text(err).find("engine: cuda"), std::string::npos) << read_text(err);
  const auto gpu = nlohmann::json::parse(read_text(f.run / "eval" / "translate.json"));
  ASSERT_EQ(gpu["results"].size(), 6u);
  std::vector<std::string> gpu_hyps;
  for (const auto& r : gpu["results"]) {
    gpu_hyps.push_back(read_text(r["hypotheses"].get<std::string>()));
    EXPECT_EQ(std::count(gpu_hyps.back().begin(), gpu_hyps.back().end(), '\n'), 4) << gpu_hyps.back();
  }
  args[args.size() - 3] = "cpu";
  ASSERT_EQ(run_cli(args, out, err), 0) << read_text(err);
  const auto cpu = nlohmann::json::parse(read_text(f.run / "eval" / "translate.json"));
  int same = 0;
  for (size_t i = 0; i < 6; ++i) same += read_text(cpu["results"][i]["hypotheses"].get<std::string>()) == gpu_hyps[i];
  std::printf("GPU and CPU hypotheses files identical in %d of 6 settings\n", same);
  ASSERT_EQ(run_cli({"generate", "--run", f.run.string(), "Hello", "world", "--max-new-tokens", "5", "--seed", "3",
                     "--device", "cuda", "--json"},
                    out, err),
            0)
      << read_text(err);
  const std::string first = read_text(out);
  ASSERT_EQ(run_cli({"generate", "--run", f.run.string(), "Hello", "world", "--max-new-tokens", "5", "--seed", "3",
                     "--device", "cuda", "--json"},
                    out, err),
            0);
  EXPECT_EQ(read_text(out), first);  // sampling on the GPU repeats under a seed
}

// Timing of the integrator's run, on demand: FLASHGPT_TRANSLATE_BENCH_DATA=DIR (holding
// newstest2012/13/14 .fr-en.{en,fr}) scores a random seed-preset run on the GPU, every
// sentence, both directions, K = 0, 1, 5. A random model never writes the newline, so every
// row runs to its token budget: a worst case.
TEST(EvalTranslateCli, SeedRunOnTheGpuTiming) {
  const char* data = std::getenv("FLASHGPT_TRANSLATE_BENCH_DATA");
  if (!data || !inference_cuda_available()) GTEST_SKIP() << "set FLASHGPT_TRANSLATE_BENCH_DATA on a GPU machine";
  Fixture f("seed");
  const char* log = std::getenv("FLASHGPT_TRANSLATE_BENCH_LOG");  // stderr here, to be read if killed
  const auto out = f.dir / "out.txt", err = log ? std::filesystem::path(log) : f.dir / "err.txt";
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = run_cli({"eval", "translate", "--run", f.run.string(), "--data-dir", data, "--shots", "0,1,5",
                          "--no-plot", "--device", "cuda"},
                         out, err);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s\n%s\n", read_text(out).c_str(), read_text(err).c_str());
  ASSERT_EQ(rc, 0);
  std::printf("eval translate, random seed-preset run, 3003 sentences x 2 directions x K = 0, 1, 5: %.1f s\n", seconds);
}

#endif  // FLASHGPT_TRANSLATE_GPU_TESTS

}  // namespace
}  // namespace flashgpt

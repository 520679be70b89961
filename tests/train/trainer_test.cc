// The trainer: schedule values, clipping, accumulation against a bigger batch, skipped
// non-finite steps, checkpoints, and resume against an uninterrupted run (bit for bit), on
// the test-only FakeModel and on the real CPU model.
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include "data/fixtures.h"
#include "train/fake_model.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <functional>
#include <numbers>
#include <random>

namespace flashgpt {
namespace {

using testing::FakeModel;
using testing::TempDir;

constexpr int64_t kVocab = 200;

// train_000000.bin and val_000000.bin of random tokens below kVocab.
struct Dataset {
  std::vector<std::filesystem::path> train, val;
};
Dataset write_dataset(const TempDir& dir, size_t train_tokens, size_t val_tokens) {
  std::mt19937 rng(7);
  Dataset d;
  for (auto [name, n, list] : {std::tuple{"train_000000.bin", train_tokens, &d.train},
                               std::tuple{"val_000000.bin", val_tokens, &d.val}}) {
    std::vector<TokenId> tokens(n);
    for (auto& t : tokens) t = static_cast<TokenId>(rng() % kVocab);
    ShardWriter w(dir / name, "test_tokens", kVocab, 0);
    w.append(tokens);
    w.finish();
    list->push_back(dir / name);
  }
  return d;
}

TrainConfig base_config(const TempDir& dir, const Dataset& d, const ModelConfig& mc) {
  TrainConfig c;
  c.model = mc;
  c.encoding = "test_tokens";
  c.train_shards = d.train;
  c.val_shards = d.val;
  c.out_dir = dir.path() / "run";
  std::filesystem::create_directories(c.out_dir);
  c.batch = 2;
  c.context = 8;
  c.accum = 1;
  c.epochs = 1;
  c.adam.lr = 1e-2;
  c.schedule.lr = 1e-2;
  c.eval_batches = 2;
  c.progress = false;
  c.seed = 5;
  return c;
}

ModelConfig tiny_config(float dropout) {
  ModelConfig mc = model_preset("tiny", kVocab);
  mc.dropout = dropout;
  return mc;
}

std::vector<nlohmann::json> read_log(const std::filesystem::path& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

// The records of a log that a resumed run must repeat exactly: everything but timings.
std::vector<std::string> comparable(const std::vector<nlohmann::json>& log) {
  std::vector<std::string> out;
  for (auto j : log) {
    j.erase("seconds");
    out.push_back(j.dump());
  }
  return out;
}

std::vector<float> params_of(const GptModel& m) {
  std::vector<float> p(static_cast<size_t>(model_param_count(m.config())));
  m.params_get(p);
  return p;
}

TEST(LrSchedule, WarmupConstantCosineLinear) {
  LrScheduleConfig s;
  s.lr = 1e-3;
  s.warmup_steps = 4;
  s.total_steps = 104;
  s.min_lr_ratio = 0.1;
  s.kind = LrSchedule::constant;
  EXPECT_DOUBLE_EQ(lr_at(s, 0), 0.25e-3);
  EXPECT_DOUBLE_EQ(lr_at(s, 3), 1e-3);
  EXPECT_DOUBLE_EQ(lr_at(s, 50), 1e-3);
  s.kind = LrSchedule::cosine;
  EXPECT_DOUBLE_EQ(lr_at(s, 1), 0.5e-3);
  EXPECT_DOUBLE_EQ(lr_at(s, 4), 1e-3);
  EXPECT_NEAR(lr_at(s, 54), 0.55e-3, 1e-15);                                        // halfway
  EXPECT_NEAR(lr_at(s, 29), 1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi * 0.25)), 1e-15);
  EXPECT_NEAR(lr_at(s, 104), 1e-4, 1e-15);
  EXPECT_NEAR(lr_at(s, 500), 1e-4, 1e-15);  // past the end: the floor
  s.kind = LrSchedule::linear;
  EXPECT_NEAR(lr_at(s, 54), 0.55e-3, 1e-15);
  EXPECT_NEAR(lr_at(s, 79), 1e-3 - 0.9e-3 * 0.75, 1e-15);
  EXPECT_NEAR(lr_at(s, 104), 1e-4, 1e-15);
  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(lr_at(s, 0), 1e-3);
  EXPECT_EQ(lr_schedule_from_name("cosine"), LrSchedule::cosine);
  EXPECT_EQ(lr_schedule_name(LrSchedule::linear), "linear");
  EXPECT_THROW(lr_schedule_from_name("step"), Error);
}

TEST(Clip, ScaleBringsTheNormToTheLimit) {
  EXPECT_DOUBLE_EQ(clip_scale(0.5, 1.0), 1.0);
  EXPECT_DOUBLE_EQ(clip_scale(4.0, 1.0), 0.25);
  EXPECT_DOUBLE_EQ(clip_scale(4.0, 0.0), 1.0);  // off
  EXPECT_DOUBLE_EQ(clip_scale(std::nan(""), 1.0), 1.0);
  EXPECT_DOUBLE_EQ(clip_scale(1.0, 1.0), 1.0);
}

TEST(Trainer, ClippingAndScheduleReachTheOptimizer) {
  TempDir dir;
  const auto data = write_dataset(dir, 2000, 200);
  auto c = base_config(dir, data, tiny_config(0));
  c.accum = 3;
  c.clip = 1e-3;  // every step clips
  c.schedule.kind = LrSchedule::cosine;
  c.schedule.warmup_steps = 2;
  c.max_steps = 6;
  FakeModel model(c.model);
  const auto result = train_run(c, model);
  ASSERT_EQ(model.grad_scales.size(), 6u);
  const auto log = read_log(c.out_dir / "log.jsonl");
  int i = 0;
  for (const auto& j : log) {
    if (j["type"] != "step") continue;
    const double norm = j["grad_norm"];
    // grad_scale = clip / norm / K: the applied mean gradient has norm `clip`.
    EXPECT_NEAR(model.grad_scales[i] * 3 * norm, 1e-3, 1e-9) << "step " << i;
    LrScheduleConfig s = c.schedule;
    s.total_steps = 6;
    EXPECT_DOUBLE_EQ(model.lrs[i], lr_at(s, i));
    EXPECT_DOUBLE_EQ(j["lr"].get<double>(), lr_at(s, i));
    EXPECT_EQ(model.adam_ts[i], i + 1);
    ++i;
  }
  EXPECT_EQ(i, 6);
  EXPECT_EQ(result.state.step, 6);
  EXPECT_EQ(result.state.micro_step, 18);

  // Without clipping the scale is 1 / K.
  TempDir dir2;
  auto c2 = base_config(dir2, write_dataset(dir2, 2000, 200), tiny_config(0));
  c2.accum = 4;
  c2.clip = 0;
  c2.max_steps = 2;
  FakeModel model2(c2.model);
  train_run(c2, model2);
  for (float s : model2.grad_scales) EXPECT_EQ(s, 0.25f);
}

// K micro-batches of B windows make the same step as one batch of K B windows: the loader
// hands out the same windows in the same order, and the gradient is their mean.
void expect_accumulation_matches(const std::function<std::unique_ptr<GptModel>(const ModelConfig&, int64_t)>& make,
                                 double tolerance) {
  TempDir dir_a, dir_b;
  const auto data_a = write_dataset(dir_a, 3000, 300);
  const auto data_b = write_dataset(dir_b, 3000, 300);
  auto a = base_config(dir_a, data_a, tiny_config(0));
  a.batch = 4;
  a.accum = 1;
  a.max_steps = 4;
  a.adam.lr = a.schedule.lr = 1e-3;
  auto b = base_config(dir_b, data_b, tiny_config(0));
  b.batch = 2;
  b.accum = 2;
  b.max_steps = 4;
  b.adam.lr = b.schedule.lr = 1e-3;
  auto ma = make(a.model, 4);
  auto mb = make(b.model, 2);
  const auto ra = train_run(a, *ma);
  const auto rb = train_run(b, *mb);
  EXPECT_NEAR(ra.last_loss, rb.last_loss, tolerance * std::abs(ra.last_loss));
  const auto la = read_log(a.out_dir / "log.jsonl"), lb = read_log(b.out_dir / "log.jsonl");
  for (size_t i = 0; i < la.size(); ++i) {
    if (la[i]["type"] != "step") continue;
    EXPECT_NEAR(la[i]["loss"].get<double>(), lb[i]["loss"].get<double>(), tolerance * la[i]["loss"].get<double>());
    EXPECT_NEAR(la[i]["grad_norm"].get<double>(), lb[i]["grad_norm"].get<double>(),
                10 * tolerance * la[i]["grad_norm"].get<double>());
  }
  const auto pa = params_of(*ma), pb = params_of(*mb);
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(pa[i] - pb[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::abs(pa[i])));
  }
  EXPECT_LE(max_diff, 10 * tolerance * max_abs);
  // And the runs did move the weights (the comparison is not of two untouched inits).
  std::vector<float> init(pa.size());
  model_init_params(a.model, a.seed, init);
  EXPECT_NE(init, pa);
}

TEST(Trainer, AccumulationEqualsABiggerBatchFake) {
  expect_accumulation_matches([](const ModelConfig& mc, int64_t) { return std::make_unique<FakeModel>(mc); }, 1e-6);
}

TEST(Trainer, AccumulationEqualsABiggerBatchCpuModel) {
  expect_accumulation_matches(
      [](const ModelConfig& mc, int64_t B) {
        ModelOptions o;
        o.max_batch = B;
        o.max_context = 8;
        o.threads = 1;  // CI's 2 cores are shared: spinning OpenMP teams only slow a model this small
        return gpt_create_cpu(mc, o);
      },
      2e-5);
}

// A model wrapper that stores SIGINT into the stop flag at one micro-step, as a signal
// handler would, around any backend.
class StopAt final : public GptModel {
 public:
  StopAt(GptModel& inner, std::atomic<int>* stop, uint64_t at) : inner_(inner), stop_(stop), at_(at) {}
  const ModelConfig& config() const override { return inner_.config(); }
  Device device() const override { return inner_.device(); }
  void params_get(std::span<float> o) const override { inner_.params_get(o); }
  void params_set(std::span<const float> i) override { inner_.params_set(i); }
  void adam_state_get(std::span<float> m, std::span<float> v) const override { inner_.adam_state_get(m, v); }
  void adam_state_set(std::span<const float> m, std::span<const float> v) override { inner_.adam_state_set(m, v); }
  void grads_get(std::span<float> o) const override { inner_.grads_get(o); }
  double forward_backward(std::span<const TokenId> w, int64_t B, int64_t T, StepRng rng, float s) override {
    if (rng.step == at_) stop_->store(SIGTERM);
    return inner_.forward_backward(w, B, T, rng, s);
  }
  double forward_loss(std::span<const TokenId> w, int64_t B, int64_t T) override { return inner_.forward_loss(w, B, T); }
  void forward_logits(std::span<const TokenId> i, int64_t B, int64_t T, std::span<float> o) override {
    inner_.forward_logits(i, B, T, o);
  }
  void grads_zero() override { inner_.grads_zero(); }
  double grads_norm() override { return inner_.grads_norm(); }
  void adamw_step(const AdamWConfig& a, int64_t t, float g) override { inner_.adamw_step(a, t, g); }

 private:
  GptModel& inner_;
  std::atomic<int>* stop_;
  uint64_t at_;
};

// Runs straight, then again stopped by a "signal" at micro-step `stop_at` and resumed with
// a fresh model: the logs (losses, norms, validation, epochs) and weights must be identical.
void expect_resume_bit_exact(const std::function<std::unique_ptr<GptModel>(const ModelConfig&)>& make, float dropout,
                             uint64_t stop_at) {
  TempDir dir_a, dir_b;
  const auto data_a = write_dataset(dir_a, 400, 100);
  const auto data_b = write_dataset(dir_b, 400, 100);
  auto a = base_config(dir_a, data_a, tiny_config(dropout));
  a.accum = 2;
  a.epochs = 3;  // several epoch ends, one of them inside an optimizer step
  a.eval_every = 4;
  a.save_every = 5;
  a.schedule.kind = LrSchedule::cosine;
  a.schedule.warmup_steps = 3;
  a.adam.lr = a.schedule.lr = 1e-3;
  auto b = a;
  b.out_dir = dir_b.path() / "run";
  b.train_shards = data_b.train;
  b.val_shards = data_b.val;
  std::filesystem::create_directories(b.out_dir);

  auto straight = make(a.model);
  const auto ra = train_run(a, *straight);
  ASSERT_EQ(ra.stopped_by_signal, 0);
  ASSERT_GT(ra.total_steps, 8);

  std::atomic<int> stop{0};
  b.stop = &stop;
  auto first = make(b.model);
  StopAt stopping(*first, &stop, stop_at);
  const auto rb1 = train_run(b, stopping);
  ASSERT_EQ(rb1.stopped_by_signal, SIGTERM);
  EXPECT_LT(rb1.state.step, ra.total_steps);
  EXPECT_EQ(rb1.state.micro_step, (static_cast<int64_t>(stop_at) / 2 + 1) * 2);

  b.stop = nullptr;
  b.resume = true;
  auto second = make(b.model);  // a fresh process would start from a fresh model
  const auto rb2 = train_run(b, *second);
  EXPECT_EQ(rb2.state.step, ra.state.step);
  EXPECT_EQ(rb2.state.adam_t, ra.state.adam_t);
  EXPECT_EQ(comparable(read_log(a.out_dir / "log.jsonl")), comparable(read_log(b.out_dir / "log.jsonl")));
  EXPECT_EQ(params_of(*straight), params_of(*second));
  EXPECT_EQ(ra.last_val_loss, rb2.last_val_loss);
}

TEST(Trainer, ResumeEqualsUninterruptedFake) {
  expect_resume_bit_exact([](const ModelConfig& mc) { return std::make_unique<FakeModel>(mc); }, 0, 9);
}

TEST(Trainer, ResumeEqualsUninterruptedCpuModel) {
  ModelOptions o;
  o.max_batch = 2;
  o.max_context = 8;
  o.threads = 1;
  expect_resume_bit_exact([&](const ModelConfig& mc) { return gpt_create_cpu(mc, o); }, 0.1f, 6);
}

TEST(Trainer, NonFiniteStepsAreSkippedAndCounted) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 2000, 200), tiny_config(0));
  c.max_steps = 6;
  FakeModel model(c.model);
  model.nan_loss_steps = {2};  // step 3
  model.inf_grad_steps = {4};  // step 5
  const auto result = train_run(c, model);
  EXPECT_EQ(result.state.step, 6);
  EXPECT_EQ(result.state.skipped_steps, 2);
  EXPECT_EQ(result.state.adam_t, 4);
  EXPECT_EQ(model.adam_ts, (std::vector<int64_t>{1, 2, 3, 4}));
  std::vector<int64_t> skipped;
  for (const auto& j : read_log(c.out_dir / "log.jsonl")) {
    if (j["type"] == "skip") skipped.push_back(j["step"]);
  }
  EXPECT_EQ(skipped, (std::vector<int64_t>{3, 5}));
}

TEST(Trainer, TooManyNonFiniteStepsInARowStop) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 2000, 200), tiny_config(0));
  c.max_steps = 20;
  c.max_bad_steps = 3;
  FakeModel model(c.model);
  model.nan_loss_steps = {1, 3, 4, 5, 6, 7, 8};  // one alone, then a run of them
  try {
    train_run(c, model);
    FAIL() << "no error after 3 non-finite steps in a row";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 steps in a row had a non-finite loss"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("step 6"), std::string::npos) << e.what();
  }
  EXPECT_EQ(model.adam_ts.size(), 2u);  // steps 1 and 3 only
}

TEST(Trainer, TimeLimitStopsCleanlyWithThePlannedSchedule) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 20000, 200), tiny_config(0));
  c.max_steps = 1000;
  c.schedule.kind = LrSchedule::cosine;
  c.schedule.warmup_steps = 2;
  c.time_limit = 0.2;
  FakeModel model(c.model);
  model.step_sleep = std::chrono::milliseconds(10);
  const auto result = train_run(c, model);
  EXPECT_TRUE(result.stopped_by_time);
  EXPECT_EQ(result.stopped_by_signal, 0);
  EXPECT_GE(result.state.step, 2);
  EXPECT_LT(result.state.step, 100);
  EXPECT_EQ(result.total_steps, 1000);
  // The rates are those of the 1000 planned steps, not of a schedule squeezed into the budget.
  LrScheduleConfig planned = c.schedule;
  planned.total_steps = 1000;
  ASSERT_EQ(model.lrs.size(), static_cast<size_t>(result.state.step));
  for (size_t i = 0; i < model.lrs.size(); ++i) EXPECT_DOUBLE_EQ(model.lrs[i], lr_at(planned, static_cast<int64_t>(i)));
  const auto log = read_log(c.out_dir / "log.jsonl");
  ASSERT_GE(log.size(), 2u);
  EXPECT_EQ(log[log.size() - 2]["type"], "val");  // the final validation
  EXPECT_EQ(log[log.size() - 2]["step"], result.state.step);
  EXPECT_EQ(log.back()["type"], "end");
  EXPECT_EQ(log.back()["stopped"], "time limit");
  const SafetensorsFile file(c.out_dir / "checkpoint.safetensors");
  EXPECT_EQ(checkpoint_read_meta(file).state.step, result.state.step);
}

// Validations at steps 2, 4, 6 and 8 (and the last step's, which is the step-8 one).
TrainResult run_keep_best(const TrainConfig& c, std::vector<double> val_losses, std::vector<float>* params_at_4) {
  FakeModel model(c.model);
  model.val_script = [=](int64_t call) { return val_losses.at(static_cast<size_t>(call / c.eval_batches)); };
  const auto result = train_run(c, model);
  if (params_at_4) {
    TrainConfig four = c;
    four.out_dir = c.out_dir / "four";
    four.keep_best = false;
    four.max_steps = 4;
    std::filesystem::create_directories(four.out_dir);
    FakeModel reference(c.model);
    train_run(four, reference);
    *params_at_4 = params_of(reference);
  }
  return result;
}

TEST(Trainer, KeepBestWritesTheLowestValidationLossCheckpointAsARunDirectory) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 4000, 200), tiny_config(0));
  c.max_steps = 8;
  c.eval_every = 2;
  c.keep_best = true;
  testing::write_file(c.out_dir / "config.json", "{\"options\": {\"data\": \"somewhere\"}}\n");
  std::vector<float> at_4;
  const auto result = run_keep_best(c, {5, 3, 4, 6}, &at_4);
  EXPECT_EQ(result.best_step, 4);
  EXPECT_DOUBLE_EQ(result.best_val_loss, 3);
  const auto best = c.out_dir / "best";
  const SafetensorsFile file(best / "checkpoint.safetensors");
  const CheckpointMeta meta = checkpoint_read_meta(file);
  EXPECT_EQ(meta.state.step, 4);
  EXPECT_EQ(checkpoint_read_params(file, c.model), at_4);
  EXPECT_NE(checkpoint_read_params(file, c.model),
            checkpoint_read_params(SafetensorsFile(c.out_dir / "checkpoint.safetensors"), c.model));
  EXPECT_EQ(testing::read_file_bytes(best / "config.json"), testing::read_file_bytes(c.out_dir / "config.json"));
  const auto j = nlohmann::json::parse(testing::read_file_bytes(best / "best.json"));
  EXPECT_EQ(j["step"], 4);
  EXPECT_EQ(j["val_loss"], 3.0);
  EXPECT_EQ(j["final_step"], 8);
  bool logged = false;
  for (const auto& r : read_log(c.out_dir / "log.jsonl")) logged = logged || (r["type"] == "best" && r["step"] == 4);
  EXPECT_TRUE(logged);
  EXPECT_FALSE(std::filesystem::exists(best / ".checkpoint.safetensors.tmp"));
}

TEST(Trainer, KeepBestLinksTheFinalCheckpointWhenItIsTheBest) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 4000, 200), tiny_config(0));
  c.max_steps = 8;
  c.eval_every = 2;
  c.keep_best = true;
  const auto result = run_keep_best(c, {5, 4, 3, 2}, nullptr);
  EXPECT_EQ(result.best_step, 8);
  EXPECT_TRUE(std::filesystem::equivalent(c.out_dir / "best" / "checkpoint.safetensors",
                                          c.out_dir / "checkpoint.safetensors"));
}

TEST(Trainer, CheckpointRoundTripAndMismatches) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 2000, 200), tiny_config(0));
  c.max_steps = 3;
  FakeModel model(c.model);
  train_run(c, model);
  const auto path = c.out_dir / "checkpoint.safetensors";
  FakeModel other(c.model);
  const CheckpointMeta meta = checkpoint_load(path, other);
  EXPECT_EQ(meta.encoding, "test_tokens");
  EXPECT_EQ(meta.state.step, 3);
  EXPECT_EQ(meta.state.adam_t, 3);
  EXPECT_EQ(params_of(model), params_of(other));
  const auto n = static_cast<size_t>(model_param_count(c.model));
  std::vector<float> m1(n), v1(n), m2(n), v2(n);
  model.adam_state_get(m1, v1);
  other.adam_state_get(m2, v2);
  EXPECT_EQ(m1, m2);
  EXPECT_EQ(v1, v2);
  EXPECT_EQ(model_config_diff(meta.model, c.model), "");

  ModelConfig wider = model_preset("tiny", 1000);
  FakeModel mismatch(wider);
  try {
    checkpoint_load(path, mismatch);
    FAIL() << "a checkpoint of another configuration loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("another configuration"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("vocab_size 200 vs 1000"), std::string::npos) << e.what();
  }
  // Resume refuses another tokenizer and another data position.
  auto r = c;
  r.resume = true;
  r.encoding = "cl100k_base";
  FakeModel m3(c.model);
  EXPECT_THROW(train_run(r, m3), Error);
  r.encoding = c.encoding;
  r.batch = 3;
  try {
    train_run(r, m3);
    FAIL() << "resumed with another batch size";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("resume with the options the run was started with"), std::string::npos)
        << e.what();
  }
  // Without --resume a fresh model is initialised and the old log is replaced.
  EXPECT_FALSE(read_log(c.out_dir / "log.jsonl").empty());
}

TEST(Trainer, BadConfigurationsGiveClearErrors) {
  TempDir dir;
  auto c = base_config(dir, write_dataset(dir, 2000, 200), tiny_config(0));
  FakeModel model(c.model);
  c.context = c.model.context + 1;
  try {
    train_run(c, model);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("longer than the model's position table"), std::string::npos) << e.what();
  }
  c.context = 8;
  c.accum = 1000;
  EXPECT_THROW(train_run(c, model), Error);  // no full optimizer step in one epoch
  c.accum = 1;
  c.resume = true;
  std::filesystem::remove_all(c.out_dir);
  std::filesystem::create_directories(c.out_dir);
  try {
    train_run(c, model);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no checkpoint"), std::string::npos) << e.what();
  }
}

TEST(Memory, EstimateGrowsWithTheBatchAndCountsTheOptimizer) {
  const ModelConfig seed = model_preset("seed", 100277);
  const auto small = train_memory_estimate(seed, 1, 512, Device::cpu);
  const auto big = train_memory_estimate(seed, 64, 512, Device::cpu);
  const auto P = static_cast<uint64_t>(model_param_count(seed));
  EXPECT_EQ(small.params + small.gradients + small.optimizer, 16 * P);
  EXPECT_GT(big.activations, 60 * small.activations);
  // The logits of 64 x 512 tokens over 100k words alone are 13 GB in fp32.
  EXPECT_GT(big.activations, 64ull * 512 * 100277 * 4);
  EXPECT_LT(train_memory_estimate(seed, 64, 512, Device::cuda).total(), big.total());
  EXPECT_GT(memory_available(Device::cpu), 0u);
  EXPECT_GT(cpu_peak_flops_measure(1, 0.01), 1e8);
}

TEST(ModelConfigJson, RoundTrip) {
  ModelConfig mc = model_preset("tiny", 321);
  mc.dropout = 0.25f;
  const ModelConfig back = model_config_from_json(model_config_to_json(mc));
  EXPECT_EQ(model_config_diff(mc, back), "");
  EXPECT_EQ(back.preset, mc.preset);
  EXPECT_THROW(model_config_from_json("{\"preset\": 1}"), Error);
  EXPECT_THROW(model_config_from_json("nope"), Error);
  TrainState s;
  s.step = 7;
  s.epoch_loss_sum = 0.1 + 0.2;  // not representable in few digits: must come back exactly
  s.loader.step_in_epoch = 3;
  const TrainState t = train_state_from_json(train_state_to_json(s));
  EXPECT_EQ(t.epoch_loss_sum, s.epoch_loss_sum);
  EXPECT_EQ(t.step, 7);
  EXPECT_EQ(t.loader.step_in_epoch, 3u);
}

}  // namespace
}  // namespace flashgpt

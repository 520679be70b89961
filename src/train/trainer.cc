// The training loop: micro-batches -> one AdamW step, validation, logs and checkpoints.
#include "data_parallel.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>
#include <flashgpt/process.h>
#include <flashgpt/train.h>


#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

std::string duration_string(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, s % 3600 / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

std::string si(double v) {
  if (v >= 1e9) return fmt::format("{:.2f}G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.1f}", v);
}

// RUN/log.jsonl, appended one flushed line at a time.
class JsonlLog {
 public:
  JsonlLog(const std::filesystem::path& path, bool truncate) : path_(path) {
    file_ = std::fopen(path.c_str(), truncate ? "w" : "a");
    FLASHGPT_CHECK(file_, "cannot open {} for writing", path.string());
  }
  ~JsonlLog() { std::fclose(file_); }
  JsonlLog(const JsonlLog&) = delete;
  JsonlLog& operator=(const JsonlLog&) = delete;
  void write(const Json& j) {
    const std::string line = j.dump() + "\n";
    FLASHGPT_CHECK(std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0,
                   "cannot append to {}", path_.string());
  }

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

// Keeps the log's records up to `step` (those a resumed run would otherwise write twice).
void log_truncate_after(const std::filesystem::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) continue;  // a line cut by a crash
    if (j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() > step) continue;
    if (j.value("type", "") == "end") continue;
    kept += line + "\n";
  }
  atomic_write_file(path, kept);
}

double mean_loss(GptModel& model, DataLoader& loader, int64_t batches, std::vector<TokenId>& windows, int64_t B,
                 int64_t T) {
  loader.restore(LoaderState{});
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    loader.next_batch(windows);
    sum += model.forward_loss(windows, B, T);
  }
  return sum / static_cast<double>(batches);
}

// Data parallel: the single-process loader position before micro-batch m (what restore
// takes) and after m micro-batches (what next_batch leaves: an epoch's end stays at
// step_in_epoch == spe until the next batch is drawn).
LoaderState loader_position_before(int64_t m, int64_t spe) {
  return LoaderState{static_cast<uint64_t>(m / spe), static_cast<uint64_t>(m % spe)};
}
LoaderState loader_position_after(int64_t m, int64_t spe) {
  if (m == 0) return LoaderState{};
  return LoaderState{static_cast<uint64_t>((m - 1) / spe), static_cast<uint64_t>((m - 1) % spe + 1)};
}

}  // namespace

void train_write_run_config(const std::filesystem::path& run_dir, std::string_view json) {
  atomic_write_file(run_dir / "config.json", json);
}

int train_plot_losses(const std::filesystem::path& run_dir, const std::filesystem::path& script) {
  try {
    return process_run({"python3", script.string(), (run_dir / "log.jsonl").string(), (run_dir / "loss.png").string()});
  } catch (const Error&) {
    return -1;  // no python3
  }
}

int64_t train_total_steps(const TrainConfig& config, uint64_t loader_steps_per_epoch) {
  if (config.max_steps > 0) return config.max_steps;
  return static_cast<int64_t>(static_cast<uint64_t>(config.epochs) * loader_steps_per_epoch /
                              static_cast<uint64_t>(config.accum));
}

TrainResult train_run(const TrainConfig& config, GptModel& model) {
  const auto run_start = Clock::now();
  const ModelConfig& mc = config.model;
  const std::string diff = model_config_diff(mc, model.config());
  FLASHGPT_CHECK(diff.empty(), "train_run: the model's configuration differs from the run's ({})", diff);
  const int64_t B = config.batch, K = config.accum;
  const int64_t T = config.context > 0 ? config.context : mc.context;
  FLASHGPT_CHECK(T <= mc.context, "context {} is longer than the model's position table ({} positions)", T, mc.context);
  FLASHGPT_CHECK(B >= 1 && K >= 1, "batch ({}) and accumulation steps ({}) must be at least 1", B, K);
  FLASHGPT_CHECK(config.epochs >= 1 || config.max_steps > 0, "give at least one epoch or a number of steps");
  FLASHGPT_CHECK(config.max_bad_steps >= 1, "max_bad_steps must be at least 1");
  FLASHGPT_CHECK(!config.train_shards.empty(), "no training shards");
  // Data parallel (W ranks): a step takes KW micro-batches of the one-process stream, rank r
  // those with index j = r, r + W, ... within the step, so the windows, the dropout keys
  // (the global micro-batch index) and the state are those of one process with --accum KW.
  std::unique_ptr<Communicator> local_comm;
  Communicator* comm = config.comm;
  if (comm == nullptr) {
    local_comm = comm_create_local();
    comm = local_comm.get();
  }
  const int W = comm->world(), rank = comm->rank();
  const bool lead = rank == 0;  // logs, progress, validation and checkpoint files
  const int64_t KW = K * W;
  DataParallel dp(*comm, model, config.zero1, static_cast<int64_t>(config.bucket_mb * (1 << 20) / sizeof(float)),
                  config.overlap);
  // best/ copies rank 0's moments outside any collective: with sharded moments it would
  // hold rank 0's slice only.
  FLASHGPT_CHECK(!(config.keep_best && dp.sharded() && W > 1),
                 "keep_best cannot be combined with ZeRO-1 on {} ranks (rank 0 keeps its slice of the AdamW moments only)",
                 W);
  if (dp.sharded() && config.progress && lead) {
    const GptModel::MemoryReport mem = model.memory_report();
    fmt::print(stderr, "ZeRO-1: rank 0 keeps the AdamW moments of [{}, {}) of {} parameters: {:.1f} MiB of {:.1f} "
               "MiB\n", mem.adam_begin, mem.adam_end, model_param_count(mc), mem.adam_bytes / 1048576.0,
               2.0 * static_cast<double>(model_param_count(mc)) * sizeof(float) / 1048576.0);
  }

  LoaderConfig lc;
  lc.shards = config.train_shards;
  lc.context = T;
  lc.batch = B;
  lc.order = WindowOrder::random;
  lc.seed = config.seed;
  DataLoader loader(lc);
  const auto spe = static_cast<int64_t>(loader.steps_per_epoch());
  TrainConfig global_config = config;
  global_config.accum = KW;
  const int64_t total = train_total_steps(global_config, loader.steps_per_epoch());
  FLASHGPT_CHECK(total > 0,
                 "{} epoch(s) of {} micro-batches of {} x {} tokens give no optimizer step of {} micro-batches ({} "
                 "per rank x {} ranks); lower --accum or --batch, or give --steps",
                 config.epochs, spe, B, T, KW, K, W);
  LrScheduleConfig schedule = config.schedule;
  if (schedule.total_steps <= 0) schedule.total_steps = total;

  std::optional<DataLoader> val_loader;
  int64_t val_batches = 0;
  if (!config.val_shards.empty()) {
    LoaderConfig vc = lc;
    vc.shards = config.val_shards;
    vc.order = WindowOrder::sequential;
    try {
      val_loader.emplace(vc);
      val_batches = static_cast<int64_t>(val_loader->steps_per_epoch());
      if (config.eval_batches > 0) val_batches = std::min(val_batches, config.eval_batches);
    } catch (const Error& e) {
      fmt::print(stderr, "warning: validation disabled: {}\n", e.what());
      val_loader.reset();
    }
  }

  const std::filesystem::path checkpoint_path = config.out_dir / "checkpoint.safetensors";
  const std::filesystem::path log_path = config.out_dir / "log.jsonl";
  TrainState state;
  state.seed = config.seed;
  state.batch = B;
  state.context = T;
  state.accum = KW;
  if (config.resume) {
    FLASHGPT_CHECK(std::filesystem::exists(checkpoint_path), "--resume: {} has no checkpoint ({} is missing)",
                   config.out_dir.string(), checkpoint_path.string());
    const CheckpointMeta meta = checkpoint_load(checkpoint_path, model);
    FLASHGPT_CHECK(meta.encoding == config.encoding,
                   "{} was trained on {} tokens, this dataset is encoded with {}", checkpoint_path.string(),
                   meta.encoding, config.encoding);
    state = meta.state;
    FLASHGPT_CHECK(state.seed == config.seed, "{} was trained with seed {}, this run has seed {}",
                   checkpoint_path.string(), state.seed, config.seed);
    FLASHGPT_CHECK(state.batch == B && state.context == T && state.accum == KW,
                   "{} was trained with batch {}, context {} and {} micro-batches per step (accumulation x ranks); "
                   "this run has {}, {} and {} ({} x {} ranks): resume with the options the run was started with (the "
                   "same batch, context and accumulation x ranks: they fix the data order)",
                   checkpoint_path.string(), state.batch, state.context, state.accum, B, T, KW, K, W);
    FLASHGPT_CHECK(state.micro_step == static_cast<int64_t>(state.loader.epoch) * spe +
                                           static_cast<int64_t>(state.loader.step_in_epoch) &&
                       state.micro_step == state.step * KW,
                   "{}: its data position (epoch {}, micro-batch {} of the epoch, {} micro-batches in all after {} "
                   "steps) does not fit this run's batch {}, context {} and accumulation {} ({} micro-batches per "
                   "epoch): resume with the options the run was started with",
                   checkpoint_path.string(), state.loader.epoch, state.loader.step_in_epoch, state.micro_step,
                   state.step, B, T, KW, spe);
    loader.restore(state.loader);
    if (lead) log_truncate_after(log_path, state.step);
    if (config.progress && lead) {
      fmt::print(stderr, "resuming {} at step {} of {} (epoch {}, micro-batch {} of {})\n", config.out_dir.string(),
                 state.step, total, state.loader.epoch, state.loader.step_in_epoch, spe);
    }
  } else {
    const auto n = static_cast<size_t>(model_param_count(mc));
    std::vector<float> buffer(n);
    model_init_params(mc, config.seed, buffer);
    model.params_set(buffer);
    std::fill(buffer.begin(), buffer.end(), 0.0f);
    model.adam_state_set(buffer, buffer);
  }
  // Only rank 0 writes the log; the other ranks' writes go nowhere.
  std::optional<JsonlLog> lead_log;
  if (lead) lead_log.emplace(log_path, /*truncate=*/!config.resume);
  struct LogSink {
    std::optional<JsonlLog>& log;
    void write(const Json& j) {
      if (log) log->write(j);
    }
  } log{lead_log};

  // Every rank takes part (ZeRO-1 gathers the moments), rank 0 writes.
  const auto save = [&] {
    const DataParallel::AdamState adam_state = dp.gather_optimizer_state();
    if (!lead) return;
    CheckpointMeta meta;
    meta.model = mc;
    meta.encoding = config.encoding;
    meta.options_json = config.options_json;
    meta.state = state;
    if (adam_state.m.empty()) {
      checkpoint_save(checkpoint_path, model, meta);
    } else {
      checkpoint_save(checkpoint_path, model, meta, adam_state.m, adam_state.v);
    }
  };

  TrainResult result;
  result.total_steps = total;
  std::vector<TokenId> windows(static_cast<size_t>(B * (T + 1)));
  const double flops_per_token = model_train_flops_per_token(mc, T);
  const int64_t step_tokens = B * T * KW;
  const int64_t first_step = state.step;
  auto window_start = Clock::now();
  int64_t window_steps = 0;
  int64_t last_val_step = -1;

  // keep_best: the lowest validation loss so far and, when it is not the final state, a
  // copy of that state.
  struct Best {
    double loss = std::numeric_limits<double>::infinity();
    int64_t step = -1;
    bool in_memory = false;
    std::vector<float> params, m, v;
    TrainState state;
  } best;
  const std::filesystem::path best_dir = config.out_dir / "best";
  if (config.keep_best && config.resume) {
    std::ifstream in(best_dir / "best.json");
    const Json j = in ? Json::parse(in, nullptr, /*allow_exceptions=*/false) : Json();
    if (j.is_object() && j.contains("val_loss") && j["val_loss"].is_number()) best.loss = j["val_loss"].get<double>();
  }

  // `final`: the state that is checkpointed right after (no copy needed).
  const auto validate = [&](bool final = false) -> std::optional<double> {
    if (!val_loader || !lead) return std::nullopt;
    const double v = mean_loss(model, *val_loader, val_batches, windows, B, T);
    last_val_step = state.step;
    result.last_val_loss = v;
    if (config.keep_best && v < best.loss) {
      best.loss = v;
      best.step = state.step;
      best.state = state;
      best.in_memory = !final;
      if (!final) {
        const auto n = static_cast<size_t>(model_param_count(mc));
        best.params.resize(n);
        best.m.resize(n);
        best.v.resize(n);
        model.params_get(best.params);
        model.adam_state_get(best.m, best.v);
      }
    }
    return v;
  };

  std::vector<double> micro_losses(static_cast<size_t>(KW));
  std::vector<double> stop_signals(static_cast<size_t>(W));
  while (state.step < total) {
    int stop_signal = config.stop ? config.stop->load() : 0;
    if (W > 1) {  // a signal that reached one rank stops them all at the same step
      std::fill(stop_signals.begin(), stop_signals.end(), 0.0);
      stop_signals[static_cast<size_t>(rank)] = stop_signal;
      comm->allreduce_sum_host(stop_signals);
      for (const double s : stop_signals) {
        if (stop_signal == 0 && s != 0) stop_signal = static_cast<int>(s);
      }
    }
    if (stop_signal != 0) {
      result.stopped_by_signal = stop_signal;
      break;
    }
    if (config.time_limit > 0 && std::chrono::duration<double>(Clock::now() - run_start).count() >= config.time_limit) {
      result.stopped_by_time = true;
      if (config.progress) {
        fmt::print(stderr, "time limit of {} s reached at step {} of {}: stopping\n", config.time_limit, state.step,
                   total);
      }
      break;
    }
    const double lr = lr_at(schedule, state.step);
    model.grads_zero();
    // This rank's micro-batches of the step; the others' losses stay 0 for the sum below.
    std::fill(micro_losses.begin(), micro_losses.end(), 0.0);
    for (int64_t j = rank; j < KW; j += W) {
      const int64_t m = state.micro_step + j;  // the micro-batch's index in the one-process stream
      if (W > 1) loader.restore(loader_position_before(m, spe));
      loader.next_batch(windows);
      if (j + W >= KW) dp.arm();
      micro_losses[static_cast<size_t>(j)] =
          model.forward_backward(windows, B, T, StepRng{config.seed, static_cast<uint64_t>(m)}, /*loss_scale=*/1.0f);
    }
    dp.reduce_gradients();
    // Each loss comes from exactly one rank: the sum gathers them bit for bit.
    comm->allreduce_sum_host(micro_losses);
    double loss_sum = 0;
    bool finite = true;
    std::optional<Json> epoch_record;
    for (int64_t j = 0; j < KW; ++j) {
      const double loss = micro_losses[static_cast<size_t>(j)];
      finite = finite && std::isfinite(loss);
      loss_sum += loss;
      if (std::isfinite(loss)) {
        state.epoch_loss_sum += loss;
        state.epoch_loss_count += 1;
      }
      state.micro_step += 1;
      if (state.micro_step % spe == 0) {
        // The micro-batch that ended an epoch: its mean is complete.
        const int64_t epoch = state.micro_step / spe;
        epoch_record = Json{{"type", "epoch"},
                            {"epoch", epoch},
                            {"loss", state.epoch_loss_count ? state.epoch_loss_sum / static_cast<double>(state.epoch_loss_count)
                                                            : std::nan("")},
                            {"micro_batches", state.epoch_loss_count}};
        state.epoch_loss_sum = 0;
        state.epoch_loss_count = 0;
      }
    }
    state.loader = loader_position_after(state.micro_step, spe);
    const double step_loss = loss_sum / static_cast<double>(KW);
    const double norm = model.grads_norm() / static_cast<double>(KW);
    finite = finite && std::isfinite(norm);
    double scale = 1.0;
    if (finite) {
      state.bad_in_row = 0;
      scale = clip_scale(norm, config.clip);
      AdamWConfig adam = config.adam;
      adam.lr = lr;
      state.adam_t += 1;
      dp.adamw_step(adam, state.adam_t, static_cast<float>(scale / static_cast<double>(KW)));
    } else {
      state.skipped_steps += 1;
      state.bad_in_row += 1;
      model.grads_zero();
    }
    state.step += 1;
    state.last_lr = lr;
    state.tokens += static_cast<double>(step_tokens);
    result.last_loss = step_loss;
    const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
    const double epoch_pos = static_cast<double>(state.micro_step) / static_cast<double>(spe);
    if (finite) {
      log.write(Json{{"type", "step"}, {"step", state.step}, {"epoch", epoch_pos}, {"loss", step_loss},
                     {"lr", lr}, {"grad_norm", norm}, {"clip_scale", scale}, {"tokens", state.tokens},
                     {"seconds", elapsed}});
    } else {
      // nan/inf are not JSON: the values go in as strings.
      log.write(Json{{"type", "skip"}, {"step", state.step}, {"epoch", epoch_pos}, {"loss", fmt::format("{}", step_loss)},
                     {"grad_norm", fmt::format("{}", norm)}, {"in_a_row", state.bad_in_row},
                     {"skipped_total", state.skipped_steps}});
      if (lead) fmt::print(stderr, "warning: step {}: non-finite loss {} or gradient norm {}; update skipped ({} in a row, {} in all)\n",
                 state.step, step_loss, norm, state.bad_in_row, state.skipped_steps);
      FLASHGPT_CHECK(state.bad_in_row < config.max_bad_steps,
                     "stopping: {} steps in a row had a non-finite loss or gradient norm (last: step {}, loss {}, "
                     "gradient norm {}); none of them was applied; the last checkpoint is {}",
                     state.bad_in_row, state.step, step_loss, norm,
                     std::filesystem::exists(checkpoint_path) ? checkpoint_path.string() : std::string("(none)"));
    }
    window_steps += 1;
    if (config.progress && lead && (state.step % std::max<int64_t>(1, config.log_every) == 0 || state.step == total ||
                            state.step == first_step + 1)) {
      const auto now = Clock::now();
      const double window_seconds = std::chrono::duration<double>(now - window_start).count();
      const double tok_per_s = window_seconds > 0 ? static_cast<double>(window_steps * step_tokens) / window_seconds : 0;
      const double per_step = elapsed / static_cast<double>(state.step - first_step);
      std::string mfu;
      // peak_flops is one device's: W of them ran.
      if (config.peak_flops > 0) mfu = fmt::format(" MFU {:.1f}%", 100.0 * tok_per_s * flops_per_token / (config.peak_flops * W));
      fmt::print(stderr, "step {}/{} epoch {:.3f} loss {:.4f} lr {:.2e} norm {:.3f} | {} tok/s{} | ETA {}\n",
                 state.step, total, epoch_pos, step_loss, lr, norm, si(tok_per_s), mfu,
                 duration_string(per_step * static_cast<double>(total - state.step)));
      window_start = now;
      window_steps = 0;
    }
    if (epoch_record) {
      if (const auto v = validate()) (*epoch_record)["val_loss"] = *v;
      (*epoch_record)["step"] = state.step;
      log.write(*epoch_record);
      if (config.progress && lead) {
        fmt::print(stderr, "epoch {} done: train loss {:.4f}{}\n", (*epoch_record)["epoch"].get<int64_t>(),
                   (*epoch_record)["loss"].get<double>(),
                   epoch_record->contains("val_loss") ? fmt::format(", val loss {:.4f}", (*epoch_record)["val_loss"].get<double>()) : "");
      }
    } else if (config.eval_every > 0 && state.step % config.eval_every == 0) {
      if (const auto v = validate()) {
        log.write(Json{{"type", "val"}, {"step", state.step}, {"epoch", epoch_pos}, {"loss", *v}});
        if (config.progress) fmt::print(stderr, "step {}: val loss {:.4f}\n", state.step, *v);
      }
    }
    if (config.save_every > 0 && state.step % config.save_every == 0 && state.step < total) save();
  }

  if (result.stopped_by_signal == 0 && (state.step >= total || result.stopped_by_time) && last_val_step != state.step &&
      state.step > first_step) {
    if (const auto v = validate(/*final=*/true)) {
      log.write(Json{{"type", "val"}, {"step", state.step}, {"epoch", static_cast<double>(state.micro_step) / spe}, {"loss", *v}});
      if (config.progress) fmt::print(stderr, "step {}: val loss {:.4f}\n", state.step, *v);
    }
  }
  save();
  if (config.keep_best && best.step >= 0) {
    // Written under a temporary name and renamed: best/ always holds a whole checkpoint.
    std::filesystem::create_directories(best_dir);
    const auto tmp = best_dir / ".checkpoint.safetensors.tmp";
    std::filesystem::remove(tmp);
    if (best.in_memory && best.step != state.step) {
      model.params_set(best.params);
      model.adam_state_set(best.m, best.v);
      CheckpointMeta meta;
      meta.model = mc;
      meta.encoding = config.encoding;
      meta.options_json = config.options_json;
      meta.state = best.state;
      checkpoint_save(tmp, model, meta);
    } else {
      std::filesystem::create_hard_link(checkpoint_path, tmp);
    }
    std::filesystem::rename(tmp, best_dir / "checkpoint.safetensors");
    if (std::filesystem::exists(config.out_dir / "config.json")) {
      std::ifstream in(config.out_dir / "config.json", std::ios::binary);
      atomic_write_file(best_dir / "config.json", std::string(std::istreambuf_iterator<char>(in), {}));
    }
    atomic_write_file(best_dir / "best.json",
                      Json{{"step", best.step}, {"val_loss", best.loss}, {"final_step", state.step}}.dump() + "\n");
    log.write(Json{{"type", "best"}, {"step", best.step}, {"val_loss", best.loss}});
    if (config.progress) {
      fmt::print(stderr, "best validation loss {:.4f} at step {}: {}\n", best.loss, best.step,
                 (best_dir / "checkpoint.safetensors").string());
    }
    result.best_step = best.step;
    result.best_val_loss = best.loss;
  }
  result.state = state;
  result.seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
  if (config.progress && lead && dp.buckets_overlapped() + dp.buckets_after() > 0) {
    fmt::print(stderr, "data parallel: {} gradient buckets started during the backward, {} after it\n",
               dp.buckets_overlapped(), dp.buckets_after());
  }
  if (result.stopped_by_signal == 0) {
    Json end{{"type", "end"}, {"step", state.step}, {"skipped_steps", state.skipped_steps},
             {"tokens", state.tokens}, {"seconds", result.seconds}};
    if (result.stopped_by_time) end["stopped"] = "time limit";
    log.write(end);
  }
  return result;
}

}  // namespace flashgpt

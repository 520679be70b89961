// The trainer: AdamW with a learning-rate schedule, gradient clipping and accumulation,
// epochs over the token shards, validation, checkpoints that resume bit for bit, and the
// Hugging Face export.
//
// One optimizer step takes `accum` micro-batches of (B, T + 1) windows from the DataLoader
// in order; each adds the gradient of its mean loss, so the step's gradient is the sum of K
// means and the update uses grad_scale = clip_scale / K (the mean over B K windows). The
// step's loss is the mean of its K micro-batch losses; its gradient norm is that of the
// mean gradient (before clipping).
//
// Determinism: everything a step does depends on (seed, micro-step index) and the state in
// the checkpoint, never on wall time, so a resumed run repeats the uninterrupted one.
//
// Files of a run directory RUN:
//   RUN/config.json              the options and the derived model configuration
//   RUN/log.jsonl                one JSON object per line: step, val, epoch, skip, end
//   RUN/checkpoint.safetensors   weights, AdamW m and v, and the state (see checkpoint_*)
//   RUN/loss.png                 train and validation loss (scripts/plot_loss.py)
#pragma once

#include <flashgpt/data_loader.h>
#include <flashgpt/model.h>
#include <flashgpt/safetensors.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

class Communicator;  // dist.h

// ---------------------------------------------------------------------------------------
// Learning-rate schedule.

enum class LrSchedule { constant, cosine, linear };
LrSchedule lr_schedule_from_name(std::string_view name);  // throws naming the choices
std::string_view lr_schedule_name(LrSchedule schedule);

struct LrScheduleConfig {
  LrSchedule kind = LrSchedule::constant;  // the seed's: a constant 1e-4
  double lr = 1e-4;                        // peak
  int64_t warmup_steps = 0;                // linear from lr / warmup to lr over these steps
  int64_t total_steps = 0;                 // the decay reaches min_lr at this step
  double min_lr_ratio = 0.0;               // floor of the decay, as a fraction of lr
};

// The learning rate of optimizer step `step` (0-based): warmup (step + 1) / warmup * lr,
// then constant, or cosine / linear from lr to min_lr_ratio * lr over the remaining steps.
double lr_at(const LrScheduleConfig& schedule, int64_t step);

// The factor that brings a gradient of global L2 norm `norm` to at most `max_norm`
// (1 when it already is, or when max_norm <= 0: clipping off).
double clip_scale(double norm, double max_norm);

// ---------------------------------------------------------------------------------------
// Memory: what a run needs, estimated before the first step.

struct MemoryEstimate {
  uint64_t params = 0;       // master weights
  uint64_t gradients = 0;
  uint64_t optimizer = 0;    // AdamW m and v
  uint64_t activations = 0;  // what forward keeps for backward, logits included
  uint64_t total() const { return params + gradients + optimizer + activations; }
};
MemoryEstimate train_memory_estimate(const ModelConfig& config, int64_t batch, int64_t context, Device device);
// Memory the run may use: MemAvailable on the CPU, free memory on the current GPU.
uint64_t memory_available(Device device);

// A rough peak of this machine's fp32 FMA throughput over `threads` threads (0: all),
// measured in about `seconds`: the denominator of the CPU MFU when none is given.
double cpu_peak_flops_measure(int threads, double seconds = 0.2);

// ---------------------------------------------------------------------------------------
// Model configuration as JSON (config.json, checkpoints).

std::string model_config_to_json(const ModelConfig& config);
ModelConfig model_config_from_json(std::string_view json);
// "" when equal, else the fields that differ, e.g. "d_model 64 vs 128, n_layer 2 vs 4".
std::string model_config_diff(const ModelConfig& a, const ModelConfig& b);

// ---------------------------------------------------------------------------------------
// Checkpoints: one safetensors file. Tensors "model.<name>", "adam_m.<name>",
// "adam_v.<name>" for each ParamSpec (F32, the spec's shape); __metadata__:
//   format      "flashgpt-checkpoint-1"
//   model       model_config_to_json
//   encoding    the tokenizer name (e.g. cl100k_base)
//   options     the run's options as JSON (informative)
//   state       TrainState as JSON

inline constexpr std::string_view kCheckpointFormat = "flashgpt-checkpoint-1";

struct TrainState {
  int64_t step = 0;          // optimizer steps taken (applied or skipped)
  int64_t adam_t = 0;        // AdamW updates applied: the bias-correction step
  int64_t micro_step = 0;    // micro-batches consumed: dropout streams are keyed by it
  LoaderState loader;        // the data position
  uint64_t seed = 0;         // the seed of init, data order and dropout
  double epoch_loss_sum = 0;  // micro-batch losses of the epoch in progress
  int64_t epoch_loss_count = 0;
  int64_t skipped_steps = 0;  // non-finite loss or gradient, all run long
  int64_t bad_in_row = 0;
  double last_lr = 0;         // schedule state: the rate of the last step
  double tokens = 0;          // tokens trained on
  // The shape of the data stream: a resumed run must keep it to see the same windows.
  int64_t batch = 0, context = 0, accum = 0;
};
std::string train_state_to_json(const TrainState& state);
TrainState train_state_from_json(std::string_view json);

struct CheckpointMeta {
  ModelConfig model;
  std::string encoding;
  std::string options_json;  // "{}" when none
  TrainState state;
};

// Writes the model's weights and moments and `meta` to PATH atomically.
void checkpoint_save(const std::filesystem::path& path, const GptModel& model, const CheckpointMeta& meta);
// The same with the moments given (model_param_count floats each): ZeRO-1's, gathered from
// the ranks' slices.
void checkpoint_save(const std::filesystem::path& path, const GptModel& model, const CheckpointMeta& meta,
                     std::span<const float> adam_m, std::span<const float> adam_v);
// The metadata of a checkpoint; throws naming the file when it is not one of ours.
CheckpointMeta checkpoint_read_meta(const SafetensorsFile& file);
// model_param_count floats of weights ("model.*"), checked against the config's shapes.
std::vector<float> checkpoint_read_params(const SafetensorsFile& file, const ModelConfig& config);
// Loads weights and moments into `model`, whose config must equal the checkpoint's
// (else an error naming the differing fields).
CheckpointMeta checkpoint_load(const std::filesystem::path& path, GptModel& model);

// ---------------------------------------------------------------------------------------
// The training loop.

struct TrainConfig {
  ModelConfig model;
  std::string encoding;  // the dataset's tokenizer
  std::vector<std::filesystem::path> train_shards, val_shards;
  std::filesystem::path out_dir;
  int64_t batch = 8;    // B per micro-batch
  int64_t context = 0;  // T; 0: model.context
  int64_t accum = 1;    // micro-batches per optimizer step
  int64_t epochs = 1;
  int64_t max_steps = 0;  // optimizer steps; 0: as many as `epochs` allow
  AdamWConfig adam;
  LrScheduleConfig schedule;  // total_steps 0: the run's total
  double clip = 1.0;          // max global gradient norm; 0: off
  int64_t eval_every = 0;     // steps between validations (0: only at epoch ends and the end)
  int64_t eval_batches = 20;  // validation micro-batches (0: the whole validation set)
  int64_t save_every = 0;     // steps between checkpoints (0: only at the end)
  int64_t log_every = 10;     // steps between progress lines
  uint64_t seed = 1234;
  int64_t max_bad_steps = 5;  // stop after this many non-finite steps in a row
  double peak_flops = 0;      // MFU denominator; 0: no MFU
  bool resume = false;        // continue from out_dir/checkpoint.safetensors
  bool progress = true;       // progress lines on stderr
  std::string options_json = "{}";  // stored in checkpoints
  // Checked between steps: when it holds a signal number, the run checkpoints and returns.
  const std::atomic<int>* stop = nullptr;
  // Wall-clock budget in seconds (0: none), checked between steps: once train_run has run
  // this long it ends as after its last step (final validation, checkpoint, end record
  // with "stopped": "time limit"). The schedule stays that of the planned steps.
  double time_limit = 0;
  // Keep the checkpoint of the lowest validation loss in out_dir/best/ (checkpoint.safetensors,
  // a copy of config.json, best.json with its step and loss), so that best/ is a run
  // directory `eval translate --run` takes. An improvement copies the weights and AdamW
  // moments to host memory (3 x 4 bytes a parameter, outside the step); the file is written
  // once, at the end (a hard link when the final checkpoint is the best). A resumed run
  // starts from best/best.json's loss.
  bool keep_best = false;
  // Data parallel (dist.h): null runs one process. With W ranks, `batch` and `accum` are per
  // rank: a step takes accum x W micro-batches, and the run is that of one process with
  // --accum accum x W (same windows, dropout, state and checkpoint; see docs/train.md).
  Communicator* comm = nullptr;
  bool zero1 = false;      // shard the AdamW moments and update over the ranks (ZeRO-1)
  double bucket_mb = 25;   // gradient all-reduce bucket size, MiB of fp32
  // Start each bucket's all-reduce as the backward finishes it (on CUDA that step runs
  // without its CUDA graph); off: the whole buffer after the backward.
  bool overlap = true;
};

struct TrainResult {
  TrainState state;
  int64_t total_steps = 0;
  double last_loss = 0;
  double last_val_loss = -1;  // -1: never validated
  int stopped_by_signal = 0;  // the signal that ended the run early, 0 if none
  bool stopped_by_time = false;  // ended by time_limit before the planned steps
  int64_t best_step = -1;        // keep_best: the step of out_dir/best (-1: none kept)
  double best_val_loss = -1;
  double seconds = 0;
};

// Runs (or resumes) a training run on `model`, whose config must be config.model: a new
// run initialises the weights (model_init_params with config.seed) and zeroes the moments;
// a resumed one loads them from out_dir/checkpoint.safetensors. Writes log.jsonl (appended
// a flushed line at a time; on resume rewritten atomically up to the checkpoint's step) and
// checkpoints under out_dir (which must exist).
TrainResult train_run(const TrainConfig& config, GptModel& model);

// RUN/config.json, written atomically (temporary file, fsync, rename).
void train_write_run_config(const std::filesystem::path& run_dir, std::string_view json);
// Draws RUN/loss.png from RUN/log.jsonl with `script` (scripts/plot_loss.py: python3 and
// matplotlib), started from an argument vector. Returns its exit status (0: drawn; -1:
// python3 could not be started).
int train_plot_losses(const std::filesystem::path& run_dir, const std::filesystem::path& script);

// The number of optimizer steps a run takes.
int64_t train_total_steps(const TrainConfig& config, uint64_t loader_steps_per_epoch);

// ---------------------------------------------------------------------------------------
// Export.

// From a checkpoint to OUT/config.json + OUT/model.safetensors that Hugging Face
// transformers' GPT2LMHeadModel.from_pretrained loads: GPT-2 tensor names, Conv1D weights
// as (in, out), the token embedding sliced to the real vocabulary V (the padding rows are
// never predicted), the head tied to it.
void export_hf(const std::filesystem::path& checkpoint, const std::filesystem::path& out_dir);

}  // namespace flashgpt

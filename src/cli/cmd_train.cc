// `flashgpt train`: one option table fills TrainOptions; the same table prints the
// configuration at start, stores it in RUN/config.json and, with --resume, fills the
// options not given on the command line from the run's saved configuration.
#include "commands.h"
#include "recipes.h"
#include "stop_signal.h"

#include <flashgpt/data_shard.h>
#include <flashgpt/dist.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>
#include <flashgpt/process.h>
#include <flashgpt/train.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <variant>
#include <vector>

namespace flashgpt {
namespace {

using Json = nlohmann::ordered_json;

struct TrainOptions {
  std::string recipe;  // recipes.h: fills the options not given
  std::string preset;
  std::string data;
  std::string out;
  std::string device = "cpu";
  int64_t epochs = 1;
  int64_t steps = 0;
  int64_t batch = 8;
  int64_t context = 0;
  int64_t accum = 1;
  double lr = 1e-4;
  double min_lr_ratio = 0.0;
  int64_t warmup = 0;
  std::string schedule = "constant";
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  double clip = 1.0;
  double dropout = -1;
  int64_t eval_every = 0;
  int64_t eval_batches = 20;
  int64_t save_every = 1000;
  int64_t log_every = 10;
  uint64_t seed = 1234;
  int64_t max_bad_steps = 5;
  double peak_flops = 0;
  double time_limit = 0;
  bool keep_best = false;
  int threads = 0;
  bool resume = false;
  bool deterministic = false;
  bool no_plot = false;
  bool quiet = false;
  bool zero1 = false;
  double bucket_mb = 25;
  bool no_overlap = false;
};

using Field = std::variant<std::string*, int64_t*, uint64_t*, int*, double*, bool*>;
struct OptionEntry {
  std::string name;  // without the dashes
  Field field;
  std::string help;
  bool from_run = true;  // --resume takes it from the saved run unless given
};

std::vector<OptionEntry> train_option_table(TrainOptions& o) {
  return {
      {"preset", &o.preset, "Model preset: tiny, small or seed"},
      {"data", &o.data, "Prepared dataset directory (train_*.bin, val_*.bin, summary.json)"},
      {"out", &o.out, "Run directory (created): config, log, checkpoint, plot", /*from_run=*/false},
      {"device", &o.device, "cpu or cuda"},
      {"epochs", &o.epochs, "Passes over the training shards"},
      {"steps", &o.steps, "Optimizer steps (0: as many as --epochs give); overrides --epochs"},
      {"batch", &o.batch, "Windows per micro-batch (B)"},
      {"context", &o.context, "Tokens per window (T; 0: the preset's context)"},
      {"accum", &o.accum, "Micro-batches per optimizer step (gradient accumulation)"},
      {"lr", &o.lr, "Peak learning rate"},
      {"min-lr-ratio", &o.min_lr_ratio, "Where cosine/linear decay ends, as a fraction of --lr"},
      {"warmup", &o.warmup, "Linear warmup steps"},
      {"schedule", &o.schedule, "Learning-rate schedule after warmup: constant, cosine or linear"},
      {"beta1", &o.beta1, "AdamW beta1"},
      {"beta2", &o.beta2, "AdamW beta2"},
      {"eps", &o.eps, "AdamW epsilon"},
      {"weight-decay", &o.weight_decay, "AdamW decoupled weight decay (matrices only)"},
      {"clip", &o.clip, "Clip the global gradient norm to this (0: off)"},
      {"dropout", &o.dropout, "Dropout rate (negative: the preset's)"},
      {"eval-every", &o.eval_every, "Steps between validation losses (0: at epoch ends and the end)"},
      {"eval-batches", &o.eval_batches, "Validation micro-batches per evaluation (0: all)"},
      {"save-every", &o.save_every, "Steps between checkpoints (0: only at the end and on a signal)"},
      {"log-every", &o.log_every, "Steps between progress lines", /*from_run=*/false},
      {"seed", &o.seed, "Seed of the initialisation, data order and dropout"},
      {"max-bad-steps", &o.max_bad_steps, "Stop after this many non-finite steps in a row"},
      {"peak-flops", &o.peak_flops, "MFU denominator in FLOP/s (0: 989e12 on cuda, measured on cpu)", false},
      {"time-limit", &o.time_limit, "Wall-clock budget in seconds: stop cleanly (validate, checkpoint) once the "
       "training loop has run this long; the schedule stays that of the planned steps (0: none)", false},
      {"keep-best", &o.keep_best, "Keep the checkpoint of the lowest validation loss as RUN/best (a run directory)"},
      {"threads", &o.threads, "CPU threads (0: all cores)"},
      {"resume", &o.resume, "Continue RUN from its checkpoint (options not given come from RUN/config.json)", false},
      {"deterministic", &o.deterministic, "Bit-identical results run to run (CUDA)"},
      {"no-plot", &o.no_plot, "Do not draw RUN/loss.png", false},
      {"quiet", &o.quiet, "No progress lines", false},
      {"zero1", &o.zero1, "Data parallel: shard the AdamW moments and update over the ranks (ZeRO-1)", false},
      {"bucket-mb", &o.bucket_mb, "Data parallel: gradient all-reduce bucket size in MiB", false},
      {"no-overlap", &o.no_overlap, "Data parallel: all-reduce the gradients after the backward instead of in buckets "
       "during it (CUDA: keeps the step's CUDA graph)", false},
      // Last, so that the start-up line keeps its order; a second line lists what it set.
      {"recipe", &o.recipe, "Named recipe (translate: recipe 2 v2 of docs/experiments.md): its values fill the "
       "options not given here", /*from_run=*/false},
  };
}

Json options_to_json(const std::vector<OptionEntry>& table) {
  Json j = Json::object();
  for (const auto& e : table) std::visit([&](auto* p) { j[e.name] = *p; }, e.field);
  return j;
}

std::string options_to_text(const std::vector<OptionEntry>& table) {
  std::string s;
  for (const auto& e : table) {
    std::visit([&](auto* p) { s += fmt::format("{}{}={}", s.empty() ? "" : " ", e.name, *p); }, e.field);
  }
  return s;
}

std::string gib(uint64_t bytes) { return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30)); }

// The dataset's shards and the tokenizer they were encoded with (every shard must agree).
struct Dataset {
  std::vector<std::filesystem::path> train, val;
  std::string encoding;
  int64_t vocab_size = 0;
};

Dataset dataset_open(const std::string& dir) {
  FLASHGPT_CHECK(!dir.empty(), "--data DIR is required (a directory written by `flashgpt data prepare`)");
  FLASHGPT_CHECK(std::filesystem::is_directory(dir), "--data {}: no such directory", dir);
  const auto summary = std::filesystem::path(dir) / "summary.json";
  FLASHGPT_CHECK(std::filesystem::exists(summary),
                 "--data {} is not a prepared dataset: it has no summary.json (write one with `flashgpt data prepare "
                 "--out {}`)", dir, dir);
  Dataset d;
  d.train = shard_list(dir, "train");
  d.val = shard_list(dir, "val");
  FLASHGPT_CHECK(!d.train.empty(), "--data {}: no training shards (train_*.bin)", dir);
  for (const auto* list : {&d.train, &d.val}) {
    for (const auto& path : *list) {
      const ShardView shard(path, VerifyPayload::no);
      if (d.encoding.empty()) {
        d.encoding = shard.header().encoding;
        d.vocab_size = shard.header().vocab_size;
      }
      FLASHGPT_CHECK(shard.header().encoding == d.encoding && shard.header().vocab_size == d.vocab_size,
                     "{} is encoded with {} (vocabulary {}), {} with {} (vocabulary {}): one dataset, one tokenizer",
                     path.string(), shard.header().encoding, shard.header().vocab_size, d.train.front().string(),
                     d.encoding, d.vocab_size);
    }
  }
  // A summary that names its tokenizer must name this one.
  std::ifstream in(summary);
  const Json s = Json::parse(in, nullptr, /*allow_exceptions=*/false);
  FLASHGPT_CHECK(!s.is_discarded(), "{} is not valid JSON", summary.string());
  if (s.contains("encoding") && s["encoding"].is_string()) {
    FLASHGPT_CHECK(s["encoding"].get<std::string>() == d.encoding, "{} names the tokenizer {} but the shards hold {}",
                   summary.string(), s["encoding"].get<std::string>(), d.encoding);
  }
  if (s.contains("vocab_size") && s["vocab_size"].is_number_integer()) {
    FLASHGPT_CHECK(s["vocab_size"].get<int64_t>() == d.vocab_size,
                   "{} gives a vocabulary of {} but the shards hold {}", summary.string(), s["vocab_size"].get<int64_t>(),
                   d.vocab_size);
  }
  return d;
}

std::filesystem::path plot_script() {
  const char* source = std::getenv("FLASHGPT_SOURCE_DIR");
  return std::filesystem::path(source && *source ? source : FLASHGPT_SOURCE_DIR) / "scripts" / "plot_loss.py";
}

// The data-parallel layout of this process (dist.h): one process, or rank r of W started
// by mpirun (OpenMPI's variables) or by a torchrun-style launcher (RANK, WORLD_SIZE, ...).
struct Ranks {
  DistEnv env;
  bool lead() const { return env.rank == 0; }
};

void run_train(CLI::App* app, TrainOptions& o, std::vector<OptionEntry>& table, const std::string& recipe_line) {
  // Before anything that could start NCCL: multicast off, whatever the launcher passed.
  dist_disable_multicast();
  const Ranks ranks{dist_env_from_environment()};
  FLASHGPT_CHECK(!o.out.empty(), "--out RUN is required");
  const std::filesystem::path run_dir = o.out;
  const auto checkpoint = run_dir / "checkpoint.safetensors";
  if (o.resume) {
    const auto saved_path = run_dir / "config.json";
    FLASHGPT_CHECK(std::filesystem::exists(checkpoint), "--resume: {} has no checkpoint.safetensors to continue from",
                   run_dir.string());
    std::ifstream in(saved_path);
    FLASHGPT_CHECK(in, "--resume: cannot read {}", saved_path.string());
    const Json saved = Json::parse(in, nullptr, /*allow_exceptions=*/false);
    FLASHGPT_CHECK(!saved.is_discarded() && saved.contains("options"), "--resume: {} is not a run configuration",
                   saved_path.string());
    for (auto& e : table) {
      if (!e.from_run || app->get_option("--" + e.name)->count() > 0 || !saved["options"].contains(e.name)) continue;
      std::visit([&](auto* p) { *p = saved["options"][e.name].get<std::remove_pointer_t<decltype(p)>>(); }, e.field);
    }
  } else {
    FLASHGPT_CHECK(!std::filesystem::exists(checkpoint),
                   "{} already holds a run (checkpoint.safetensors): pass --resume to continue it, or choose another "
                   "--out", run_dir.string());
  }
  if (ranks.lead()) fmt::print(stderr, "train: {}\n", options_to_text(table));
  if (ranks.lead() && !recipe_line.empty()) fmt::print(stderr, "train: {}\n", recipe_line);
  FLASHGPT_CHECK(!o.preset.empty(), "--preset is required (one of: {})", fmt::join(model_preset_names(), ", "));
  FLASHGPT_CHECK(o.device == "cpu" || o.device == "cuda", "--device {}: expected cpu or cuda", o.device);
  FLASHGPT_CHECK(o.batch >= 1, "--batch {} must be at least 1", o.batch);
  FLASHGPT_CHECK(o.accum >= 1, "--accum {} must be at least 1", o.accum);
  FLASHGPT_CHECK(o.epochs >= 1 || o.steps > 0, "--epochs {} and --steps {}: nothing to train", o.epochs, o.steps);
  FLASHGPT_CHECK(o.context >= 0 && o.steps >= 0 && o.warmup >= 0, "--context, --steps and --warmup cannot be negative");
  FLASHGPT_CHECK(std::isfinite(o.time_limit) && o.time_limit >= 0, "--time-limit {} must be a number of seconds (0: "
                 "none)", o.time_limit);
  FLASHGPT_CHECK(o.bucket_mb > 0, "--bucket-mb {} must be positive", o.bucket_mb);
  FLASHGPT_CHECK(o.lr > 0 && o.eps > 0 && o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1,
                 "AdamW needs lr > 0, eps > 0 and betas in [0, 1) (given lr {}, eps {}, betas {} {})", o.lr, o.eps,
                 o.beta1, o.beta2);
  const Device device = o.device == "cuda" ? Device::cuda : Device::cpu;

  const Dataset data = dataset_open(o.data);
  ModelConfig mc = model_preset(o.preset, data.vocab_size);
  if (o.dropout >= 0) mc.dropout = static_cast<float>(o.dropout);
  model_config_validate(mc);
  const int64_t T = o.context > 0 ? o.context : mc.context;
  FLASHGPT_CHECK(T <= mc.context, "--context {} is longer than the {} preset's position table ({} positions)", T,
                 o.preset, mc.context);
  if (o.resume) {
    const SafetensorsFile file(checkpoint);
    const CheckpointMeta meta = checkpoint_read_meta(file);
    FLASHGPT_CHECK(meta.encoding == data.encoding,
                   "{} was trained on {} tokens (vocabulary {}) but --data {} is encoded with {} (vocabulary {})",
                   checkpoint.string(), meta.encoding, meta.model.vocab_size, o.data, data.encoding, data.vocab_size);
    const std::string diff = model_config_diff(meta.model, mc);
    FLASHGPT_CHECK(diff.empty(), "{} is a checkpoint of another model configuration (checkpoint vs --preset {}: {})",
                   checkpoint.string(), o.preset, diff);
  }

  MemoryEstimate mem = train_memory_estimate(mc, o.batch, T, device);
  // ZeRO-1: each rank allocates the moments of its slice.
  if (o.zero1) mem.optimizer = (mem.optimizer + uint64_t(ranks.env.world) - 1) / uint64_t(ranks.env.world);
  const uint64_t available = memory_available(device);
  FLASHGPT_CHECK(available == 0 || mem.total() <= available,
                 "batch {} x {} tokens of the {} preset needs about {} ({} weights, {} gradients, {} AdamW state, {} "
                 "activations) but {} has {} available: lower --batch or --context and use --accum for the same "
                 "tokens per step",
                 o.batch, T, o.preset, gib(mem.total()), gib(mem.params), gib(mem.gradients), gib(mem.optimizer),
                 gib(mem.activations), o.device, gib(available));
  double peak = o.peak_flops;
  std::string peak_source = "given";
  if (peak <= 0 && device == Device::cuda) {
    peak = 989e12;
    peak_source = "H100 dense bf16";
  } else if (peak <= 0) {
    peak = cpu_peak_flops_measure(o.threads);
    peak_source = "measured fp32 FMA loop";
  }

  std::filesystem::create_directories(run_dir);
  const Json options = options_to_json(table);
  const bool lead = ranks.lead();
  Json config;
  config["options"] = options;
  config["model"] = Json::parse(model_config_to_json(mc));
  config["encoding"] = data.encoding;
  config["train_shards"] = data.train.size();
  config["val_shards"] = data.val.size();
  config["params"] = model_param_count(mc);
  config["params_unpadded"] = model_param_count_unpadded(mc);
  config["flops_per_token"] = model_train_flops_per_token(mc, T);
  config["peak_flops"] = peak;
  config["peak_flops_source"] = peak_source;
  config["memory_estimate_bytes"] = mem.total();
  config["ranks"] = ranks.env.world;
  config["launcher"] = ranks.env.launcher;
  if (lead) train_write_run_config(run_dir, config.dump(2) + "\n");
  if (lead) fmt::print(stderr,
             "model: {} preset, V {} (padded {}), C {}, L {}, NH {}, F {}, T {}, dropout {}; {:.2f} M parameters; "
             "{} tokens ({}); memory about {}; peak {:.3g} FLOP/s ({})\n",
             mc.preset, mc.vocab_size, mc.padded_vocab_size, mc.d_model, mc.n_layer, mc.n_head, mc.d_ff, T,
             mc.dropout, model_param_count_unpadded(mc) / 1e6, data.encoding, o.data, gib(mem.total()), peak,
             peak_source);

  ModelOptions mo;
  mo.max_batch = o.batch;
  mo.max_context = T;
  mo.deterministic = o.deterministic;
  mo.threads = o.threads;
  if (o.zero1 && ranks.env.world > 1) {  // ZeRO-1: this rank's moments only, from the start
    const std::vector<int64_t> slices = dist_slices(model_param_count(mc), ranks.env.world);
    mo.adam_begin = slices[static_cast<size_t>(ranks.env.rank)];
    mo.adam_end = slices[static_cast<size_t>(ranks.env.rank) + 1];
  }
  // One GPU per process: LOCAL_RANK picks it before the model allocates.
  if (device == Device::cuda && ranks.env.world > 1) dist_select_gpu(ranks.env.local_rank);
  std::unique_ptr<GptModel> model = gpt_create(device, mc, mo);
  std::unique_ptr<Communicator> comm;
  if (ranks.env.world > 1 || ranks.env.launcher != "none") {
    if (device == Device::cuda) {
      comm = comm_create_nccl(ranks.env, model->flat_buffers().stream);
    } else {
      FLASHGPT_CHECK(ranks.env.launcher == "openmpi" || ranks.env.world == 1,
                     "data-parallel training on the CPU runs over MPI: start it with mpirun -np {} (the {} launcher's "
                     "variables are for GPUs and NCCL)", ranks.env.world, ranks.env.launcher);
      comm = ranks.env.launcher == "openmpi" ? comm_create_mpi() : comm_create_local();
    }
    FLASHGPT_CHECK(comm->rank() == ranks.env.rank && comm->world() == ranks.env.world,
                   "the {} communicator sees rank {} of {}, the environment says rank {} of {}", comm->backend(),
                   comm->rank(), comm->world(), ranks.env.rank, ranks.env.world);
    const std::string multicast = dist_multicast_check();
    FLASHGPT_CHECK(multicast.empty(), "NVLink multicast must stay off: {}", multicast);
    if (lead) {
      fmt::print(stderr, "data parallel: {} ranks over {} ({} launch), global batch {} x {} micro-batches of {} tokens, "
                 "ZeRO-1 {}, buckets of {} MiB {}; multicast off (NCCL_NVLS_ENABLE={} TORCH_SYMM_MEM_DISABLE_MULTICAST={} "
                 "NVSHMEM_DISABLE_NVLS={})\n",
                 comm->world(), comm->backend(), ranks.env.launcher, o.batch, o.accum * comm->world(), T,
                 o.zero1 ? "on" : "off", o.bucket_mb, o.no_overlap ? "after the backward" : "during the backward",
                 std::getenv("NCCL_NVLS_ENABLE"),
                 std::getenv("TORCH_SYMM_MEM_DISABLE_MULTICAST"), std::getenv("NVSHMEM_DISABLE_NVLS"));
    }
  }

  TrainConfig tc;
  tc.model = mc;
  tc.encoding = data.encoding;
  tc.train_shards = data.train;
  tc.val_shards = data.val;
  tc.out_dir = run_dir;
  tc.batch = o.batch;
  tc.context = T;
  tc.accum = o.accum;
  tc.epochs = o.epochs;
  tc.max_steps = o.steps;
  tc.adam = AdamWConfig{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay};
  tc.schedule.kind = lr_schedule_from_name(o.schedule);
  tc.schedule.lr = o.lr;
  tc.schedule.warmup_steps = o.warmup;
  tc.schedule.min_lr_ratio = o.min_lr_ratio;
  tc.clip = o.clip;
  tc.eval_every = o.eval_every;
  tc.eval_batches = o.eval_batches;
  tc.save_every = o.save_every;
  tc.log_every = o.log_every;
  tc.seed = o.seed;
  tc.max_bad_steps = o.max_bad_steps;
  tc.peak_flops = peak;
  tc.resume = o.resume;
  tc.progress = !o.quiet && lead;
  tc.comm = comm.get();
  tc.zero1 = o.zero1;
  tc.bucket_mb = o.bucket_mb;
  tc.overlap = !o.no_overlap;
  tc.options_json = options.dump();
  tc.time_limit = o.time_limit;
  tc.keep_best = o.keep_best;
  // best/ copies rank 0's AdamW moments outside any collective; under ZeRO-1 those are
  // current only in rank 0's slice.
  FLASHGPT_CHECK(!(o.keep_best && o.zero1), "--keep-best and --zero1 cannot be combined (the best checkpoint would hold "
                 "rank 0's slice of the AdamW moments only)");
  FLASHGPT_CHECK(!o.keep_best || !data.val.empty(), "--keep-best needs validation shards (val_*.bin) in --data {}", o.data);
  tc.stop = &cli_stop_flag();

  TrainResult result;
  {
    StopSignalGuard guard;
    result = train_run(tc, *model);
  }
  if (!o.no_plot && lead) {
    const int rc = train_plot_losses(run_dir, plot_script());
    if (rc != 0) {
      fmt::print(stderr, "warning: the loss plot failed (python3 {} exited with {}; it needs matplotlib); the losses "
                 "are in {}\n", plot_script().string(), rc, (run_dir / "log.jsonl").string());
    }
  }
  if (result.stopped_by_signal != 0) {
    if (lead) fmt::print(stderr, "stopped by {} at step {} of {}; checkpoint written to {}; continue with: flashgpt train --out "
               "{} --resume\n", strsignal(result.stopped_by_signal), result.state.step, result.total_steps,
               checkpoint.string(), run_dir.string());
    throw CliExit{128 + result.stopped_by_signal};
  }
  if (!lead) return;
  fmt::print("trained {} steps{} ({} skipped) in {:.1f} s: last loss {:.4f}{}; checkpoint {}{}\n", result.state.step,
             result.stopped_by_time ? fmt::format(" of {} (time limit)", result.total_steps) : "",
             result.state.skipped_steps, result.seconds, result.last_loss,
             result.last_val_loss >= 0 ? fmt::format(", val loss {:.4f}", result.last_val_loss) : "",
             checkpoint.string(),
             result.best_step >= 0 ? fmt::format("; best val loss {:.4f} at step {} in {}", result.best_val_loss,
                                                 result.best_step, (run_dir / "best").string())
                                   : "");
}

}  // namespace

void cli_add_train(CLI::App& app) {
  auto options = std::make_shared<TrainOptions>();
  auto table = std::make_shared<std::vector<OptionEntry>>(train_option_table(*options));
  auto* t = app.add_subcommand("train", "Train the GPT model on a prepared dataset (checkpoints, resume, logs)");
  for (const auto& e : *table) {
    const std::string flag = "--" + e.name;
    std::visit(
        [&](auto* p) {
          using V = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<V, bool>) {
            t->add_flag(flag, *p, e.help);
          } else {
            t->add_option(flag, *p, e.help)->capture_default_str();
          }
        },
        e.field);
  }
  t->get_option("--device")->check(CLI::IsMember({"cpu", "cuda"}));
  t->get_option("--schedule")->check(CLI::IsMember({"constant", "cosine", "linear"}));
  t->get_option("--recipe")->check(cli_recipe_check());
  t->callback([t, options, table] {
    // The recipe first: its values count as given, so --resume keeps them over the saved run's.
    const std::string recipe_line = options->recipe.empty() ? std::string()
        : cli_recipe_apply(*t, options->recipe, recipe_train_values(recipe_find(options->recipe)));
    run_train(t, *options, *table, recipe_line);
  });
}

}  // namespace flashgpt

// Checkpoints: weights and AdamW moments as safetensors tensors, the configuration and the
// training state as JSON strings in __metadata__.
#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace flashgpt {
namespace {

using Json = nlohmann::ordered_json;

Json parse_object(std::string_view text, std::string_view what) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  FLASHGPT_CHECK(!j.is_discarded() && j.is_object(), "{} is not a JSON object", what);
  return j;
}

template <class T>
T field(const Json& j, const char* name, std::string_view what) {
  FLASHGPT_CHECK(j.contains(name), "{} has no '{}'", what, name);
  try {
    return j[name].get<T>();
  } catch (const nlohmann::json::exception& e) {
    FLASHGPT_FAIL("{}: '{}' has the wrong type ({})", what, name, j[name].dump());
  }
}

}  // namespace

std::string model_config_to_json(const ModelConfig& c) {
  Json j;
  j["preset"] = c.preset;
  j["vocab_size"] = c.vocab_size;
  j["padded_vocab_size"] = c.padded_vocab_size;
  j["context"] = c.context;
  j["d_model"] = c.d_model;
  j["n_layer"] = c.n_layer;
  j["n_head"] = c.n_head;
  j["d_ff"] = c.d_ff;
  j["dropout"] = std::stod(fmt::format("{}", c.dropout));  // the shortest decimal: reads back to the same float
  return j.dump();
}

ModelConfig model_config_from_json(std::string_view text) {
  const Json j = parse_object(text, "the model configuration");
  const std::string_view what = "the model configuration";
  ModelConfig c;
  c.preset = field<std::string>(j, "preset", what);
  c.vocab_size = field<int64_t>(j, "vocab_size", what);
  c.padded_vocab_size = field<int64_t>(j, "padded_vocab_size", what);
  c.context = field<int64_t>(j, "context", what);
  c.d_model = field<int64_t>(j, "d_model", what);
  c.n_layer = field<int64_t>(j, "n_layer", what);
  c.n_head = field<int64_t>(j, "n_head", what);
  c.d_ff = field<int64_t>(j, "d_ff", what);
  c.dropout = field<float>(j, "dropout", what);
  return c;
}

std::string model_config_diff(const ModelConfig& a, const ModelConfig& b) {
  std::string out;
  auto cmp = [&](const char* name, const auto& x, const auto& y) {
    if (x == y) return;
    if (!out.empty()) out += ", ";
    out += fmt::format("{} {} vs {}", name, x, y);
  };
  cmp("vocab_size", a.vocab_size, b.vocab_size);
  cmp("padded_vocab_size", a.padded_vocab_size, b.padded_vocab_size);
  cmp("context", a.context, b.context);
  cmp("d_model", a.d_model, b.d_model);
  cmp("n_layer", a.n_layer, b.n_layer);
  cmp("n_head", a.n_head, b.n_head);
  cmp("d_ff", a.d_ff, b.d_ff);
  cmp("dropout", a.dropout, b.dropout);
  return out;
}

std::string train_state_to_json(const TrainState& s) {
  Json j;
  j["step"] = s.step;
  j["adam_t"] = s.adam_t;
  j["micro_step"] = s.micro_step;
  j["loader_epoch"] = s.loader.epoch;
  j["loader_step_in_epoch"] = s.loader.step_in_epoch;
  j["seed"] = s.seed;
  // nlohmann writes doubles with 17 significant digits: they read back bit for bit.
  j["epoch_loss_sum"] = s.epoch_loss_sum;
  j["epoch_loss_count"] = s.epoch_loss_count;
  j["skipped_steps"] = s.skipped_steps;
  j["bad_in_row"] = s.bad_in_row;
  j["last_lr"] = s.last_lr;
  j["tokens"] = s.tokens;
  j["batch"] = s.batch;
  j["context"] = s.context;
  j["accum"] = s.accum;
  return j.dump();
}

TrainState train_state_from_json(std::string_view text) {
  const Json j = parse_object(text, "the training state");
  const std::string_view what = "the training state";
  TrainState s;
  s.step = field<int64_t>(j, "step", what);
  s.adam_t = field<int64_t>(j, "adam_t", what);
  s.micro_step = field<int64_t>(j, "micro_step", what);
  s.loader.epoch = field<uint64_t>(j, "loader_epoch", what);
  s.loader.step_in_epoch = field<uint64_t>(j, "loader_step_in_epoch", what);
  s.seed = field<uint64_t>(j, "seed", what);
  s.epoch_loss_sum = field<double>(j, "epoch_loss_sum", what);
  s.epoch_loss_count = field<int64_t>(j, "epoch_loss_count", what);
  s.skipped_steps = field<int64_t>(j, "skipped_steps", what);
  s.bad_in_row = field<int64_t>(j, "bad_in_row", what);
  s.last_lr = field<double>(j, "last_lr", what);
  s.tokens = field<double>(j, "tokens", what);
  s.batch = field<int64_t>(j, "batch", what);
  s.context = field<int64_t>(j, "context", what);
  s.accum = field<int64_t>(j, "accum", what);
  return s;
}

void checkpoint_save(const std::filesystem::path& path, const GptModel& model, const CheckpointMeta& meta) {
  const auto n = static_cast<size_t>(model_param_count(model.config()));
  std::vector<float> m(n), v(n);
  model.adam_state_get(m, v);
  checkpoint_save(path, model, meta, m, v);
}

void checkpoint_save(const std::filesystem::path& path, const GptModel& model, const CheckpointMeta& meta,
                     std::span<const float> m, std::span<const float> v) {
  const ModelConfig& config = model.config();
  const auto n = static_cast<size_t>(model_param_count(config));
  FLASHGPT_CHECK(m.size() == n && v.size() == n, "checkpoint_save: {} and {} moments for a model of {} parameters",
                 m.size(), v.size(), n);
  std::vector<float> params(n);
  model.params_get(params);
  SafetensorsWriter writer;
  for (const auto& spec : model_param_specs(config)) {
    const auto slice = [&](std::span<const float> buf) {
      return buf.subspan(static_cast<size_t>(spec.offset), static_cast<size_t>(spec.numel));
    };
    writer.add_f32("model." + spec.name, spec.shape, slice(params));
    writer.add_f32("adam_m." + spec.name, spec.shape, slice(m));
    writer.add_f32("adam_v." + spec.name, spec.shape, slice(v));
  }
  writer.set_metadata("format", std::string(kCheckpointFormat));
  writer.set_metadata("model", model_config_to_json(config));
  writer.set_metadata("encoding", meta.encoding);
  writer.set_metadata("options", meta.options_json.empty() ? "{}" : meta.options_json);
  writer.set_metadata("state", train_state_to_json(meta.state));
  writer.write(path);
}

CheckpointMeta checkpoint_read_meta(const SafetensorsFile& file) {
  const auto& md = file.metadata();
  const std::string name = file.path().string();
  const auto get = [&](const char* key) -> const std::string& {
    auto it = md.find(key);
    FLASHGPT_CHECK(it != md.end(), "{} is not a flashgpt checkpoint: its __metadata__ has no '{}'", name, key);
    return it->second;
  };
  FLASHGPT_CHECK(get("format") == kCheckpointFormat, "{} is a checkpoint of format '{}', this build reads '{}'", name,
                 get("format"), kCheckpointFormat);
  CheckpointMeta meta;
  try {
    meta.model = model_config_from_json(get("model"));
    meta.state = train_state_from_json(get("state"));
  } catch (const Error& e) {
    FLASHGPT_FAIL("{}: {}", name, e.what());
  }
  meta.encoding = get("encoding");
  meta.options_json = get("options");
  return meta;
}

namespace {

void read_tensors(const SafetensorsFile& file, const ModelConfig& config, std::string_view prefix, std::span<float> out) {
  for (const auto& spec : model_param_specs(config)) {
    const std::string name = std::string(prefix) + spec.name;
    file.require_f32(name, spec.shape);
    file.read_f32(name, out.subspan(static_cast<size_t>(spec.offset), static_cast<size_t>(spec.numel)));
  }
}

}  // namespace

std::vector<float> checkpoint_read_params(const SafetensorsFile& file, const ModelConfig& config) {
  std::vector<float> params(static_cast<size_t>(model_param_count(config)));
  read_tensors(file, config, "model.", params);
  return params;
}

CheckpointMeta checkpoint_load(const std::filesystem::path& path, GptModel& model) {
  const SafetensorsFile file(path);
  CheckpointMeta meta = checkpoint_read_meta(file);
  const std::string diff = model_config_diff(meta.model, model.config());
  FLASHGPT_CHECK(diff.empty(), "{} holds a model of another configuration (checkpoint vs this run: {})",
                 path.string(), diff);
  const auto n = static_cast<size_t>(model_param_count(meta.model));
  std::vector<float> params(n), m(n), v(n);
  read_tensors(file, meta.model, "model.", params);
  read_tensors(file, meta.model, "adam_m.", m);
  read_tensors(file, meta.model, "adam_v.", v);
  model.params_set(params);
  model.adam_state_set(m, v);
  return meta;
}

}  // namespace flashgpt

// The training data loader. Windows of T + 1 tokens start at multiples of T inside each
// shard; the global window index w maps to (shard, start) through prefix sums. An epoch's
// order is the identity or a Fisher-Yates shuffle driven by Philox keyed by (seed, epoch),
// so every rank computes the same permutation without communicating, and a (epoch, step)
// pair pins the position exactly.
#include <flashgpt/data_loader.h>
#include <flashgpt/error.h>
#include <flashgpt/philox.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>

namespace flashgpt {

struct DataLoader::Impl {
  LoaderConfig config;
  std::vector<ShardView> shards;
  std::vector<uint64_t> window_prefix;  // window_prefix[s]: windows in shards before s
  uint64_t windows = 0, tokens = 0;
  LoaderState state;
  std::vector<uint64_t> order;          // this epoch's window order (random mode)
  uint64_t order_epoch = UINT64_MAX;

  uint64_t steps_per_epoch() const { return windows / (static_cast<uint64_t>(config.batch) * config.world); }

  void build_order(uint64_t epoch) {
    if (config.order == WindowOrder::sequential || order_epoch == epoch) return;
    order.resize(windows);
    std::iota(order.begin(), order.end(), uint64_t{0});
    // Fisher-Yates; draw i uses Philox counter (i, epoch) under the seed. The modulo bias
    // of a 64-bit draw over at most 2^40 windows is below 2^-24: irrelevant for shuffling.
    for (uint64_t i = windows; i > 1; --i) {
      const Philox4x32 r = philox4x32_10({static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                          static_cast<uint32_t>(epoch), static_cast<uint32_t>(epoch >> 32)},
                                         static_cast<uint32_t>(config.seed), static_cast<uint32_t>(config.seed >> 32));
      const uint64_t draw = (static_cast<uint64_t>(r.x) << 32) | r.y;
      std::swap(order[i - 1], order[draw % i]);
    }
    order_epoch = epoch;
  }

  void copy_window(uint64_t window, TokenId* out) const {
    const auto it = std::upper_bound(window_prefix.begin(), window_prefix.end(), window);
    const size_t shard = static_cast<size_t>(it - window_prefix.begin()) - 1;
    const uint64_t start = (window - window_prefix[shard]) * static_cast<uint64_t>(config.context);
    const auto tokens_in = shards[shard].tokens();
    std::memcpy(out, tokens_in.data() + start, (config.context + 1) * sizeof(TokenId));
  }
};

DataLoader::DataLoader(LoaderConfig config) : impl_(std::make_unique<Impl>()) {
  auto& s = *impl_;
  FLASHGPT_CHECK(!config.shards.empty(), "the data loader needs at least one shard");
  FLASHGPT_CHECK(config.context >= 1 && config.batch >= 1, "context ({}) and batch ({}) must be positive",
                 config.context, config.batch);
  FLASHGPT_CHECK(config.world >= 1 && config.rank >= 0 && config.rank < config.world,
                 "rank {} is not in [0, world={})", config.rank, config.world);
  s.config = std::move(config);
  s.window_prefix.push_back(0);
  for (const auto& path : s.config.shards) {
    s.shards.emplace_back(path, s.config.verify);
    if (s.shards.size() > 1) {
      FLASHGPT_CHECK(s.shards.back().header().encoding == s.shards.front().header().encoding,
                     "{} is encoded with {} but {} with {}", path.string(), s.shards.back().header().encoding,
                     s.config.shards.front().string(), s.shards.front().header().encoding);
    }
    const uint64_t n = s.shards.back().header().token_count;
    s.tokens += n;
    s.windows += n > 0 ? (n - 1) / static_cast<uint64_t>(s.config.context) : 0;
    s.window_prefix.push_back(s.windows);
  }
  s.window_prefix.pop_back();
  FLASHGPT_CHECK(s.steps_per_epoch() > 0,
                 "the shards hold {} tokens: {} windows of {} + 1 tokens, fewer than one step of batch {} x world {}",
                 s.tokens, s.windows, s.config.context, s.config.batch, s.config.world);
}

DataLoader::DataLoader(DataLoader&&) noexcept = default;
DataLoader& DataLoader::operator=(DataLoader&&) noexcept = default;
DataLoader::~DataLoader() = default;

void DataLoader::next_batch(std::span<TokenId> out) {
  auto& s = *impl_;
  const auto T1 = static_cast<size_t>(s.config.context + 1);
  const auto B = static_cast<uint64_t>(s.config.batch);
  FLASHGPT_CHECK(out.size() == B * T1, "next_batch: the output holds {} ids, not B x (T + 1) = {} x {}", out.size(),
                 B, T1);
  if (s.state.step_in_epoch == s.steps_per_epoch()) {
    ++s.state.epoch;
    s.state.step_in_epoch = 0;
  }
  s.build_order(s.state.epoch);
  const uint64_t first = s.state.step_in_epoch * B * s.config.world + static_cast<uint64_t>(s.config.rank) * B;
  for (uint64_t b = 0; b < B; ++b) {
    const uint64_t slot = first + b;
    const uint64_t window = s.config.order == WindowOrder::random ? s.order[slot] : slot;
    s.copy_window(window, out.data() + b * T1);
  }
  ++s.state.step_in_epoch;
}

LoaderState DataLoader::state() const { return impl_->state; }

void DataLoader::restore(const LoaderState& state) {
  FLASHGPT_CHECK(state.step_in_epoch <= impl_->steps_per_epoch(),
                 "cannot restore step {} of an epoch that has {} steps (were the shards or batch size changed?)",
                 state.step_in_epoch, impl_->steps_per_epoch());
  impl_->state = state;
}

uint64_t DataLoader::windows_per_epoch() const { return impl_->windows; }
uint64_t DataLoader::steps_per_epoch() const { return impl_->steps_per_epoch(); }
uint64_t DataLoader::tokens_per_epoch() const { return impl_->tokens; }

uint64_t DataLoader::tokens_consumed() const {
  const auto& s = *impl_;
  const uint64_t per_step = static_cast<uint64_t>(s.config.batch) * s.config.world * s.config.context;
  return (s.state.epoch * s.steps_per_epoch() + s.state.step_in_epoch) * per_step;
}

double DataLoader::epochs_consumed() const {
  const auto& s = *impl_;
  const uint64_t per_epoch = s.steps_per_epoch() * s.config.batch * s.config.world * s.config.context;
  return static_cast<double>(tokens_consumed()) / static_cast<double>(per_epoch);
}

std::vector<std::filesystem::path> dataset_shards(const std::filesystem::path& dir, std::string_view split) {
  FLASHGPT_CHECK(split == "train" || split == "val", "unknown split '{}' (train or val)", split);
  std::error_code ec;
  FLASHGPT_CHECK(std::filesystem::is_directory(dir, ec), "{} is not a dataset directory ({})", dir.string(),
                 std::filesystem::exists(dir, ec) ? "not a directory" : "it does not exist");
  const auto summary_path = dir / "summary.json";
  FLASHGPT_CHECK(std::filesystem::exists(summary_path, ec),
                 "{} is not a complete dataset: it has no summary.json, which `data prepare` writes last (an "
                 "interrupted or foreign directory); run `flashgpt data prepare --out {}`", dir.string(), dir.string());
  std::ifstream in(summary_path);
  FLASHGPT_CHECK(in, "cannot read {}", summary_path.string());
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    FLASHGPT_FAIL("{}: not valid JSON ({}); the dataset is damaged, run `data prepare` again", summary_path.string(),
                  e.what());
  }
  const std::string key = std::string(split) + "_shards";
  FLASHGPT_CHECK(j.is_object() && j.contains(key) && j[key].is_array(), "{}: no {} list; not a dataset summary",
                 summary_path.string(), key);
  std::vector<std::string> listed;
  for (const auto& shard : j[key]) {
    FLASHGPT_CHECK(shard.is_object() && shard.contains("path") && shard["path"].is_string(),
                   "{}: a {} entry has no path", summary_path.string(), key);
    listed.push_back(std::filesystem::path(shard["path"].get<std::string>()).filename().string());
  }
  auto shards = shard_list(dir, split);
  std::vector<std::string> present;
  for (const auto& p : shards) present.push_back(p.filename().string());
  std::sort(listed.begin(), listed.end());
  FLASHGPT_CHECK(listed == present, "{}: the {} shards present ({}) are not the {} that summary.json lists; the "
                 "dataset is damaged, run `data prepare` again", dir.string(), split, present.size(), listed.size());
  return shards;
}

}  // namespace flashgpt

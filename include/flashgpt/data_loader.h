// The training data loader: batches of windows of context + 1 tokens from memory-mapped
// shards, data-parallel across ranks, resumable bit for bit from a LoaderState.
#pragma once

#include <flashgpt/data_shard.h>
#include <flashgpt/tokenizer.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

namespace flashgpt {

// The shards of one split ("train" or "val") of a dataset `data prepare` published, in
// order: what LoaderConfig::shards should be. Refuses a directory without summary.json
// (not a dataset, or one whose prepare never finished) and one whose shard files differ
// from those summary.json lists.
std::vector<std::filesystem::path> dataset_shards(const std::filesystem::path& dir, std::string_view split);

enum class WindowOrder { sequential, random };

struct LoaderConfig {
  std::vector<std::filesystem::path> shards;
  int64_t context = 1024;  // T: each window holds T + 1 tokens (inputs and shifted targets)
  int64_t batch = 8;       // B windows per rank per step
  int rank = 0, world = 1;  // data parallel: rank r of `world` takes a disjoint slice
  WindowOrder order = WindowOrder::random;
  uint64_t seed = 0;
  VerifyPayload verify = VerifyPayload::yes;
};

// The exact position: restoring it reproduces the following batches bit for bit.
struct LoaderState {
  uint64_t epoch = 0;
  uint64_t step_in_epoch = 0;  // global steps (all ranks) already taken in this epoch
};

// Windows start at multiples of T inside each shard (never across a shard boundary); an
// epoch is one pass over all windows in sequential or Philox-shuffled order, one
// permutation per epoch, the same on every rank. Step s of an epoch takes windows
// [s B W, (s+1) B W) of the order; rank r gets [s B W + r B, s B W + (r+1) B). The
// windows left over at the end of an epoch (fewer than B W) are skipped.
class DataLoader {
 public:
  explicit DataLoader(LoaderConfig config);
  DataLoader(DataLoader&&) noexcept;
  DataLoader& operator=(DataLoader&&) noexcept;
  ~DataLoader();

  // Fills `out` (B, T + 1) with the next batch of this rank and advances.
  void next_batch(std::span<TokenId> out);
  LoaderState state() const;
  void restore(const LoaderState& state);

  uint64_t windows_per_epoch() const;   // all ranks
  uint64_t steps_per_epoch() const;
  uint64_t tokens_per_epoch() const;    // sum of the shards' token counts
  // Tokens (all ranks, T per window, as training counts them) consumed so far, and that
  // as a fraction of an epoch's usable tokens.
  uint64_t tokens_consumed() const;
  double epochs_consumed() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashgpt

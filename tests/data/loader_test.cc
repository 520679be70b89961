#include <flashgpt/data_loader.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "data/fixtures.h"

namespace flashgpt {
namespace {

using testing::TempDir;

// Shards whose token at position p of shard s is s * 100000 + p: a window's first token
// says where it came from.
std::vector<std::filesystem::path> make_shards(const TempDir& dir, const std::vector<size_t>& sizes) {
  std::vector<std::filesystem::path> paths;
  for (size_t s = 0; s < sizes.size(); ++s) {
    const auto path = dir / ("train_" + std::to_string(s) + ".bin");
    ShardWriter writer(path, "test", 1'000'000, 0);
    std::vector<TokenId> tokens(sizes[s]);
    for (size_t p = 0; p < sizes[s]; ++p) tokens[p] = static_cast<TokenId>(s * 100000 + p);
    writer.append(tokens);
    writer.finish();
    paths.push_back(path);
  }
  return paths;
}

std::vector<TokenId> take(DataLoader& loader, const LoaderConfig& config) {
  std::vector<TokenId> batch(config.batch * (config.context + 1));
  loader.next_batch(batch);
  return batch;
}

TEST(DataLoader, SequentialWindowsStayInsideShards) {
  TempDir dir;
  LoaderConfig config;
  config.shards = make_shards(dir, {41, 30});  // (41-1)/8 = 5 and (30-1)/8 = 3 windows
  config.context = 8;
  config.batch = 2;
  config.order = WindowOrder::sequential;
  DataLoader loader(config);
  EXPECT_EQ(loader.windows_per_epoch(), 8u);
  EXPECT_EQ(loader.steps_per_epoch(), 4u);
  EXPECT_EQ(loader.tokens_per_epoch(), 71u);
  std::vector<TokenId> starts;
  for (int step = 0; step < 4; ++step) {
    const auto batch = take(loader, config);
    for (int b = 0; b < 2; ++b) {
      const TokenId* w = batch.data() + b * 9;
      starts.push_back(w[0]);
      for (int i = 1; i < 9; ++i) EXPECT_EQ(w[i], w[0] + i);  // contiguous: never across a shard
    }
  }
  EXPECT_EQ(starts, (std::vector<TokenId>{0, 8, 16, 24, 32, 100000, 100008, 100016}));
  EXPECT_DOUBLE_EQ(loader.epochs_consumed(), 1.0);
  EXPECT_EQ(take(loader, config)[0], 0u);  // epoch 2 starts over
  EXPECT_EQ(loader.state().epoch, 1u);
}

TEST(DataLoader, RanksTakeDisjointSlicesThatCoverTheEpoch) {
  TempDir dir;
  LoaderConfig config;
  config.shards = make_shards(dir, {1001, 517, 64});
  config.context = 16;
  config.batch = 3;
  config.world = 3;
  config.seed = 42;
  std::multiset<TokenId> seen;
  uint64_t steps = 0;
  for (int rank = 0; rank < 3; ++rank) {
    config.rank = rank;
    DataLoader loader(config);
    steps = loader.steps_per_epoch();
    for (uint64_t s = 0; s < steps; ++s) {
      const auto batch = take(loader, config);
      for (int b = 0; b < 3; ++b) seen.insert(batch[b * 17]);
    }
  }
  EXPECT_EQ(seen.size(), steps * 9);
  EXPECT_EQ(std::set<TokenId>(seen.begin(), seen.end()).size(), seen.size()) << "a window went to two ranks";
}

TEST(DataLoader, RandomOrderIsASeededPermutationPerEpoch) {
  TempDir dir;
  LoaderConfig config;
  config.shards = make_shards(dir, {4001});
  config.context = 4;
  config.batch = 10;
  config.seed = 7;
  auto epoch_starts = [&](uint64_t seed, int epochs) {
    config.seed = seed;
    DataLoader loader(config);
    std::vector<TokenId> starts;
    for (uint64_t s = 0; s < loader.steps_per_epoch() * epochs; ++s) {
      const auto batch = take(loader, config);
      for (int b = 0; b < 10; ++b) starts.push_back(batch[b * 5]);
    }
    return starts;
  };
  const auto a = epoch_starts(7, 2);
  ASSERT_EQ(a.size(), 2000u);
  std::vector<TokenId> first(a.begin(), a.begin() + 1000), second(a.begin() + 1000, a.end());
  EXPECT_NE(first, second) << "each epoch needs its own order";
  std::sort(first.begin(), first.end());
  for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first[i], i * 4) << "not a permutation of the windows";
  EXPECT_EQ(epoch_starts(7, 2), a);
  EXPECT_NE(epoch_starts(8, 1), std::vector<TokenId>(a.begin(), a.begin() + 1000));
}

TEST(DataLoader, ResumesExactly) {
  TempDir dir;
  LoaderConfig config;
  config.shards = make_shards(dir, {3001, 999});
  config.context = 32;
  config.batch = 4;
  config.world = 2;
  config.rank = 1;
  config.seed = 3;
  DataLoader straight(config);
  std::vector<std::vector<TokenId>> expected;
  LoaderState saved;
  for (int s = 0; s < 40; ++s) {  // crosses the epoch boundary (15 steps per epoch)
    if (s == 23) saved = straight.state();
    expected.push_back(take(straight, config));
  }
  DataLoader resumed(config);
  resumed.restore(saved);
  EXPECT_EQ(resumed.tokens_consumed(), 23u * 4 * 2 * 32);
  for (int s = 23; s < 40; ++s) EXPECT_EQ(take(resumed, config), expected[s]) << "step " << s;
}

TEST(DataLoader, ValidatesItsInputs) {
  TempDir dir;
  LoaderConfig config;
  config.shards = make_shards(dir, {20});
  config.context = 8;
  config.batch = 4;  // 2 windows < one batch
  EXPECT_THROW(DataLoader{config}, Error);
  config.batch = 1;
  config.rank = 1;
  EXPECT_THROW(DataLoader{config}, Error);
  config.rank = 0;
  DataLoader loader(config);
  std::vector<TokenId> wrong(5);
  EXPECT_THROW(loader.next_batch(wrong), Error);
  EXPECT_THROW(loader.restore({0, 99}), Error);
}

}  // namespace
}  // namespace flashgpt

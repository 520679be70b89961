#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <cstring>

#include <numeric>

#include "common/test_support.h"
#include "data/fixtures.h"

namespace flashgpt {
namespace {

using testing::TempDir;

std::filesystem::path write_shard(const std::filesystem::path& path, const std::vector<TokenId>& tokens) {
  ShardWriter writer(path, "test_bytes", 1000, 999);
  writer.append(std::span(tokens).subspan(0, tokens.size() / 2));
  writer.append(std::span(tokens).subspan(tokens.size() / 2));
  const ShardHeader header = writer.finish();
  EXPECT_EQ(header.token_count, tokens.size());
  return path;
}

std::string error_of(const std::filesystem::path& path) {
  return testing::error_of([&] { ShardView view(path); });
}

TEST(Shard, RoundTripsTokensAndHeader) {
  TempDir dir;
  std::vector<TokenId> tokens(10'001);
  std::iota(tokens.begin(), tokens.end(), 0);
  for (auto& t : tokens) t %= 1000;
  const auto path = write_shard(dir / "train_000000.bin", tokens);
  EXPECT_FALSE(std::filesystem::exists(dir / "train_000000.bin.tmp"));
  EXPECT_EQ(std::filesystem::file_size(path), kShardHeaderBytes + 4 * tokens.size());
  const ShardView view(path);
  EXPECT_EQ(view.header().encoding, "test_bytes");
  EXPECT_EQ(view.header().vocab_size, 1000u);
  EXPECT_EQ(view.header().end_of_text, 999u);
  EXPECT_EQ(view.header().payload_crc32, crc32_update(0, tokens.data(), tokens.size() * 4));
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.end(), view.tokens().begin(), view.tokens().end()));
  EXPECT_EQ(shard_list(dir.path(), "train"), std::vector<std::filesystem::path>{path});
}

TEST(Shard, EmptyShardIsValid) {
  TempDir dir;
  const auto path = write_shard(dir / "e.bin", {});
  EXPECT_EQ(ShardView(path).tokens().size(), 0u);
}

TEST(Shard, RejectsBadMagicTruncationAndCorruption) {
  TempDir dir;
  std::vector<TokenId> tokens(5000, 7);
  const auto good = testing::read_file_bytes(write_shard(dir / "good.bin", tokens));

  auto bytes = good;
  bytes[0] = 'X';
  EXPECT_NE(error_of(testing::write_file(dir / "magic.bin", bytes)).find("bad magic"), std::string::npos);

  const std::string truncated = error_of(testing::write_file(dir / "cut.bin", good.substr(0, good.size() - 6)));
  EXPECT_NE(truncated.find("truncated"), std::string::npos) << truncated;

  bytes = good;
  bytes[kShardHeaderBytes + 4 * 1234] ^= 1;
  const std::string payload = error_of(testing::write_file(dir / "payload.bin", bytes));
  EXPECT_NE(payload.find("payload CRC-32"), std::string::npos) << payload;
  EXPECT_NO_THROW(ShardView(dir / "payload.bin", VerifyPayload::no));  // only when asked not to look

  bytes = good;
  bytes[16] ^= 1;  // token count
  EXPECT_NE(error_of(testing::write_file(dir / "header.bin", bytes)).find("corrupt shard header"), std::string::npos);

  EXPECT_NE(error_of(testing::write_file(dir / "tiny.bin", "FGPT")).find("shorter than"), std::string::npos);
}

TEST(Shard, ACraftedTokenCountIsRefusedBeforeAnythingIsRead) {
  TempDir dir;
  std::vector<TokenId> tokens(16, 7);
  auto bytes = testing::read_file_bytes(write_shard(dir / "good.bin", tokens));
  // 4 (2^62 + 16) wraps around to 64, the payload's true size; the header checksum is
  // recomputed, so only the size check stands between this file and a 2^62-token span.
  const uint64_t count = (uint64_t{1} << 62) + 16;
  std::memcpy(bytes.data() + 16, &count, 8);
  const uint32_t crc = crc32_update(0, bytes.data(), 124);
  std::memcpy(bytes.data() + 124, &crc, 4);
  const std::string message = error_of(testing::write_file(dir / "crafted.bin", bytes));
  EXPECT_NE(message.find("promises 4611686018427387920 tokens"), std::string::npos) << message;
}

TEST(Shard, WriterRejectsIdsOutsideTheVocabulary) {
  TempDir dir;
  ShardWriter writer(dir / "v.bin", "test", 10, 9);
  const std::vector<TokenId> bad = {3, 10};
  EXPECT_THROW(writer.append(bad), Error);
}

TEST(Shard, UnfinishedWriterLeavesNothing) {
  TempDir dir;
  {
    ShardWriter writer(dir / "u.bin", "test", 10, 9);
    const std::vector<TokenId> some = {1, 2};
    writer.append(some);
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "u.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir / "u.bin.tmp"));
}

TEST(Crc32, KnownAnswerAndPieces) {
  EXPECT_EQ(crc32_update(0, "123456789", 9), 0xCBF43926u);
  const std::string text = "The quick brown fox jumps over the lazy dog";
  EXPECT_EQ(crc32_update(0, text.data(), text.size()), 0x414FA339u);
  const uint32_t first = crc32_update(0, text.data(), 13);
  EXPECT_EQ(crc32_update(first, text.data() + 13, text.size() - 13), 0x414FA339u);
}

}  // namespace
}  // namespace flashgpt

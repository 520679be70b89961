// Shards: the binary token files that prepare writes and training reads (format below),
// their writer, a validating read-only view and the CRC-32 that guards them.
#pragma once

#include <flashgpt/tokenizer.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

//
// Layout (little-endian), 128-byte header then the payload:
//   0  char[8]   magic "FGPTTOK\0"
//   8  uint32    version (1)
//  12  uint32    header bytes (128)
//  16  uint64    token count N
//  24  uint32    bytes per token (4: uint32 ids)
//  28  uint32    vocabulary size (every id is below it)
//  32  uint32    end-of-text id
//  36  uint32    CRC-32 (IEEE, as zlib's crc32) of the payload bytes
//  40  char[64]  encoding name, NUL-padded
// 104  uint8[20] reserved (zero)
// 124  uint32    CRC-32 of header bytes 0..123
// 128  uint32[N] token ids
// A reader rejects a wrong magic or version, a header or payload checksum mismatch, and
// a file whose size is not 128 + 4 N (truncated or padded).

inline constexpr std::array<char, 8> kShardMagic = {'F', 'G', 'P', 'T', 'T', 'O', 'K', '\0'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 128;

struct ShardHeader {
  uint64_t token_count = 0;
  uint32_t vocab_size = 0;
  uint32_t end_of_text = 0;
  uint32_t payload_crc32 = 0;
  std::string encoding;
};

// CRC-32 (IEEE 802.3 polynomial, reflected; crc32(0, "123456789") = 0xCBF43926),
// continued from `crc` so that it can be computed in pieces.
uint32_t crc32_update(uint32_t crc, const void* data, size_t size);

// Writes one shard incrementally; finish() fills in the count and checksum. The file is
// written to PATH.tmp and renamed, so a shard that exists is complete.
class ShardWriter {
 public:
  ShardWriter(const std::filesystem::path& path, std::string encoding, uint32_t vocab_size, uint32_t end_of_text);
  ShardWriter(ShardWriter&&) noexcept;
  ShardWriter& operator=(ShardWriter&&) noexcept;
  ~ShardWriter();  // an unfinished shard is removed

  void append(std::span<const TokenId> tokens);
  uint64_t token_count() const;
  ShardHeader finish();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// A shard mapped read-only into memory, validated when opened (the payload checksum only
// when asked: it reads the whole file).
enum class VerifyPayload { no, yes };
class ShardView {
 public:
  explicit ShardView(const std::filesystem::path& path, VerifyPayload verify = VerifyPayload::yes);
  ShardView(ShardView&&) noexcept;
  ShardView& operator=(ShardView&&) noexcept;
  ~ShardView();

  const ShardHeader& header() const;
  std::span<const TokenId> tokens() const;
  const std::filesystem::path& path() const;

 private:
  std::filesystem::path path_;
  ShardHeader header_;
  const void* map_ = nullptr;
  size_t map_bytes_ = 0;
};

// The shards of a prepared dataset, in order: DIR/PREFIX_000000.bin, ...
std::vector<std::filesystem::path> shard_list(const std::filesystem::path& dir, std::string_view prefix);

}  // namespace flashgpt

// The token-shard format (documented in include/flashgpt/data.h) and CRC-32.
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace flashgpt {
namespace {

// Slicing-by-8 tables for the reflected IEEE polynomial 0xEDB88320.
struct Crc32Tables {
  uint32_t t[8][256];
  constexpr Crc32Tables() : t{} {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};
constexpr Crc32Tables kCrc;

void put_u32(unsigned char* p, uint32_t v) { std::memcpy(p, &v, 4); }  // little-endian hosts only
void put_u64(unsigned char* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get_u32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
static_assert(std::endian::native == std::endian::little, "the shard format is little-endian; add byte swaps");

std::array<unsigned char, kShardHeaderBytes> header_encode(const ShardHeader& h) {
  std::array<unsigned char, kShardHeaderBytes> b{};
  std::memcpy(b.data(), kShardMagic.data(), 8);
  put_u32(b.data() + 8, kShardVersion);
  put_u32(b.data() + 12, kShardHeaderBytes);
  put_u64(b.data() + 16, h.token_count);
  put_u32(b.data() + 24, sizeof(TokenId));
  put_u32(b.data() + 28, h.vocab_size);
  put_u32(b.data() + 32, h.end_of_text);
  put_u32(b.data() + 36, h.payload_crc32);
  std::memcpy(b.data() + 40, h.encoding.data(), std::min<size_t>(h.encoding.size(), 63));
  put_u32(b.data() + 124, crc32_update(0, b.data(), 124));
  return b;
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  while (size >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = kCrc.t[7][lo & 0xFF] ^ kCrc.t[6][(lo >> 8) & 0xFF] ^ kCrc.t[5][(lo >> 16) & 0xFF] ^ kCrc.t[4][lo >> 24] ^
          kCrc.t[3][hi & 0xFF] ^ kCrc.t[2][(hi >> 8) & 0xFF] ^ kCrc.t[1][(hi >> 16) & 0xFF] ^ kCrc.t[0][hi >> 24];
    p += 8;
    size -= 8;
  }
  while (size--) crc = kCrc.t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

struct ShardWriter::Impl {
  std::filesystem::path path, tmp;
  ShardHeader header;
  FILE* file = nullptr;
  bool finished = false;

  ~Impl() {
    if (file) std::fclose(file);
    if (!finished && !tmp.empty()) {
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
    }
  }
};

ShardWriter::ShardWriter(const std::filesystem::path& path, std::string encoding, uint32_t vocab_size,
                         uint32_t end_of_text)
    : impl_(std::make_unique<Impl>()) {
  FLASHGPT_CHECK(encoding.size() < 64, "encoding name '{}' is longer than the shard header's 63 bytes", encoding);
  auto& s = *impl_;
  s.path = path;
  s.tmp = path;
  s.tmp += ".tmp";
  s.header.encoding = std::move(encoding);
  s.header.vocab_size = vocab_size;
  s.header.end_of_text = end_of_text;
  s.file = std::fopen(s.tmp.c_str(), "wb");
  FLASHGPT_CHECK(s.file, "cannot create {}: {}", s.tmp.string(), std::strerror(errno));
  const auto blank = header_encode(s.header);  // rewritten by finish()
  FLASHGPT_CHECK(std::fwrite(blank.data(), 1, blank.size(), s.file) == blank.size(), "{}: write failed: {}",
                 s.tmp.string(), std::strerror(errno));
}

ShardWriter::ShardWriter(ShardWriter&&) noexcept = default;
ShardWriter& ShardWriter::operator=(ShardWriter&&) noexcept = default;
ShardWriter::~ShardWriter() = default;

void ShardWriter::append(std::span<const TokenId> tokens) {
  auto& s = *impl_;
  FLASHGPT_CHECK(!s.finished, "{}: append after finish", s.path.string());
  if (tokens.empty()) return;  // an empty span may have a null data(), which fwrite must not get
  for (TokenId id : tokens) {
    FLASHGPT_CHECK(id < s.header.vocab_size, "{}: token id {} is not below the vocabulary size {}", s.path.string(),
                   id, s.header.vocab_size);
  }
  s.header.payload_crc32 = crc32_update(s.header.payload_crc32, tokens.data(), tokens.size_bytes());
  s.header.token_count += tokens.size();
  FLASHGPT_CHECK(std::fwrite(tokens.data(), sizeof(TokenId), tokens.size(), s.file) == tokens.size(),
                 "{}: write failed: {}", s.tmp.string(), std::strerror(errno));
}

uint64_t ShardWriter::token_count() const { return impl_->header.token_count; }

ShardHeader ShardWriter::finish() {
  auto& s = *impl_;
  FLASHGPT_CHECK(!s.finished, "{}: finished twice", s.path.string());
  const auto header = header_encode(s.header);
  const bool ok = std::fseek(s.file, 0, SEEK_SET) == 0 &&
                  std::fwrite(header.data(), 1, header.size(), s.file) == header.size() && std::fflush(s.file) == 0;
  const int close_rc = std::fclose(s.file);
  s.file = nullptr;
  FLASHGPT_CHECK(ok && close_rc == 0, "{}: write failed: {}", s.tmp.string(), std::strerror(errno));
  std::filesystem::rename(s.tmp, s.path);
  s.finished = true;
  return s.header;
}

ShardView::ShardView(const std::filesystem::path& path, VerifyPayload verify) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  FLASHGPT_CHECK(fd >= 0, "cannot open shard {}: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    FLASHGPT_FAIL("cannot stat shard {}: {}", path.string(), std::strerror(errno));
  }
  const auto file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    ::close(fd);
    FLASHGPT_FAIL("{}: not a token shard: {} bytes, shorter than the {}-byte header", path.string(), file_bytes,
                  kShardHeaderBytes);
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  FLASHGPT_CHECK(map != MAP_FAILED, "cannot map shard {}: {}", path.string(), std::strerror(errno));
  map_ = map;
  map_bytes_ = file_bytes;
  const auto* b = static_cast<const unsigned char*>(map);
  FLASHGPT_CHECK(std::memcmp(b, kShardMagic.data(), 8) == 0, "{}: not a token shard (bad magic)", path.string());
  FLASHGPT_CHECK(get_u32(b + 8) == kShardVersion, "{}: shard version {} is not the supported version {}",
                 path.string(), get_u32(b + 8), kShardVersion);
  FLASHGPT_CHECK(get_u32(b + 124) == crc32_update(0, b, 124), "{}: corrupt shard header (checksum mismatch)",
                 path.string());
  FLASHGPT_CHECK(get_u32(b + 12) == kShardHeaderBytes && get_u32(b + 24) == sizeof(TokenId),
                 "{}: unsupported shard layout (header {} bytes, {} bytes per token)", path.string(), get_u32(b + 12),
                 get_u32(b + 24));
  header_.token_count = get_u64(b + 16);
  header_.vocab_size = get_u32(b + 28);
  header_.end_of_text = get_u32(b + 32);
  header_.payload_crc32 = get_u32(b + 36);
  header_.encoding.assign(reinterpret_cast<const char*>(b + 40), strnlen(reinterpret_cast<const char*>(b + 40), 64));
  const uint64_t expected = kShardHeaderBytes + header_.token_count * sizeof(TokenId);
  FLASHGPT_CHECK(file_bytes == expected, "{}: {} bytes but the header promises {} tokens ({} bytes): {}",
                 path.string(), file_bytes, header_.token_count, expected,
                 file_bytes < expected ? "truncated" : "trailing bytes");
  if (verify == VerifyPayload::yes) {
    const uint32_t crc = crc32_update(0, b + kShardHeaderBytes, file_bytes - kShardHeaderBytes);
    FLASHGPT_CHECK(crc == header_.payload_crc32, "{}: corrupt shard: payload CRC-32 {:08x}, header says {:08x}",
                   path.string(), crc, header_.payload_crc32);
  }
}

ShardView::ShardView(ShardView&& other) noexcept
    : path_(std::move(other.path_)), header_(std::move(other.header_)), map_(other.map_), map_bytes_(other.map_bytes_) {
  other.map_ = nullptr;
  other.map_bytes_ = 0;
}

ShardView& ShardView::operator=(ShardView&& other) noexcept {
  if (this != &other) {
    if (map_) ::munmap(const_cast<void*>(map_), map_bytes_);
    path_ = std::move(other.path_);
    header_ = std::move(other.header_);
    map_ = other.map_;
    map_bytes_ = other.map_bytes_;
    other.map_ = nullptr;
    other.map_bytes_ = 0;
  }
  return *this;
}

ShardView::~ShardView() {
  if (map_) ::munmap(const_cast<void*>(map_), map_bytes_);
}

const ShardHeader& ShardView::header() const { return header_; }
std::span<const TokenId> ShardView::tokens() const {
  return {reinterpret_cast<const TokenId*>(static_cast<const unsigned char*>(map_) + kShardHeaderBytes),
          static_cast<size_t>(header_.token_count)};
}
const std::filesystem::path& ShardView::path() const { return path_; }

std::vector<std::filesystem::path> shard_list(const std::filesystem::path& dir, std::string_view prefix) {
  FLASHGPT_CHECK(std::filesystem::is_directory(dir), "{} is not a directory of shards", dir.string());
  std::vector<std::filesystem::path> out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.starts_with(std::string(prefix) + "_") && name.ends_with(".bin")) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace flashgpt

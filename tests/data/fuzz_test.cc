// Seeded mutation fuzzing of the readers that take files from outside: the shard reader,
// the gzip/xz line reader and the tar unpacker. Each target starts from valid inputs,
// mutates them (byte flips, interesting values, truncation, header fields rewritten with
// a correct checksum so that the deeper checks are reached) and requires that the reader
// either succeeds and stays in bounds or throws flashgpt::Error; under ASan/UBSan (CI)
// any out-of-bounds access fails the test.
//
// FLASHGPT_FUZZ_ITERATIONS (default 100 per target) and FLASHGPT_FUZZ_SEED (default 1)
// make longer runs. Inputs are written to files under the test's temporary directory, so
// after a crash the last input is still there: copy it into tests/data/fuzz_regressions/
// TARGET/ and it is replayed by the Regressions tests on every run.
#include <flashgpt/data.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>

#include "data/fixtures.h"

namespace flashgpt {
namespace {

using testing::TempDir;
using testing::read_file_bytes;
using testing::write_file;

int iterations() {
  const char* env = std::getenv("FLASHGPT_FUZZ_ITERATIONS");
  return env ? std::max(1, std::atoi(env)) : 100;
}
uint64_t seed() {
  const char* env = std::getenv("FLASHGPT_FUZZ_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 1;
}

std::filesystem::path regressions_dir(const std::string& target) {
  const char* source = std::getenv("FLASHGPT_SOURCE_DIR");
  return std::filesystem::path(source ? source : ".") / "tests" / "data" / "fuzz_regressions" / target;
}

// One mutation of `bytes`, chosen at random.
std::string mutate(std::string bytes, std::mt19937_64& rng) {
  static const std::vector<std::string> interesting = {
      std::string("\0", 1), "\xFF", "\x7F", "\x80", "/", "..", "../", "\x1F\x8B", "\xFD" "7zXZ", "0", "3", "4",
      "5", "6", "2", "1", std::string("\xFF\xFF\xFF\xFF\xFF\xFF\xFF\x3F", 8), std::string("\0\0\0\0", 4)};
  const int rounds = 1 + static_cast<int>(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    const size_t n = bytes.size();
    switch (rng() % 6) {
      case 0:  // flip a bit
        if (n) bytes[rng() % n] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:  // random byte
        if (n) bytes[rng() % n] = static_cast<char>(rng());
        break;
      case 2: {  // overwrite with an interesting value
        const auto& v = interesting[rng() % interesting.size()];
        if (n >= v.size()) bytes.replace(rng() % (n - v.size() + 1), v.size(), v);
        break;
      }
      case 3:  // truncate
        if (n) bytes.resize(rng() % n);
        break;
      case 4:  // append garbage
        for (int i = 0, k = static_cast<int>(rng() % 64); i < k; ++i) bytes.push_back(static_cast<char>(rng()));
        break;
      case 5:  // duplicate a slice
        if (n) {
          const size_t at = rng() % n, len = rng() % std::min<size_t>(n - at, 256) + 1;
          bytes.insert(at, bytes.substr(at, len));
        }
        break;
    }
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------
// Shards.

uint32_t get_u32(const std::string& b, size_t at) {
  uint32_t v;
  std::memcpy(&v, b.data() + at, 4);
  return v;
}
void set_u32(std::string& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }
void set_u64(std::string& b, size_t at, uint64_t v) { std::memcpy(b.data() + at, &v, 8); }
void fix_header_crc(std::string& b) {
  if (b.size() >= kShardHeaderBytes) set_u32(b, 124, crc32_update(0, b.data(), 124));
}

std::string valid_shard(const std::filesystem::path& path, size_t tokens) {
  ShardWriter writer(path, "test_bytes", 300, 299);
  std::vector<TokenId> ids(tokens);
  for (size_t i = 0; i < tokens; ++i) ids[i] = static_cast<TokenId>((i * 7919) % 300);
  writer.append(ids);
  writer.finish();
  return read_file_bytes(path);
}

// Opens the shard both ways; when it opens, every token is read (ASan checks the bounds).
void shard_target(const std::filesystem::path& path) {
  for (const VerifyPayload verify : {VerifyPayload::no, VerifyPayload::yes}) {
    try {
      const ShardView view(path, verify);
      uint64_t sum = 0;
      for (TokenId id : view.tokens()) sum += id;
      EXPECT_EQ(view.tokens().size(), view.header().token_count);
      EXPECT_EQ(std::filesystem::file_size(path), kShardHeaderBytes + 4 * view.header().token_count);
      (void)sum;
    } catch (const Error&) {
    }
  }
}

TEST(Fuzz, ShardReader) {
  TempDir dir;
  const std::string base = valid_shard(dir / "base.bin", 1000);
  std::mt19937_64 rng(seed());
  for (int i = 0; i < iterations(); ++i) {
    std::string bytes = mutate(base, rng);
    // Half the time, rewrite a header field and fix the header checksum, so that the size
    // and payload checks (not only the header CRC) meet hostile values.
    if (bytes.size() >= kShardHeaderBytes && rng() % 2) {
      switch (rng() % 4) {
        case 0: set_u64(bytes, 16, rng()); break;                                      // any count
        case 1: set_u64(bytes, 16, (uint64_t{1} << 62) + (bytes.size() - 128) / 4); break;  // wraps to the size
        case 2: set_u64(bytes, 16, (bytes.size() - 128) / 4 + (rng() % 3) - 1); break;    // off by one
        case 3: set_u32(bytes, 12, static_cast<uint32_t>(rng() % 256)); break;          // header size
      }
      fix_header_crc(bytes);
    }
    SCOPED_TRACE("seed " + std::to_string(seed()) + " iteration " + std::to_string(i));
    shard_target(write_file(dir / "input.bin", bytes));
  }
  EXPECT_EQ(get_u32(base, 8), kShardVersion);
}

// ---------------------------------------------------------------------------------------
// gzip and xz through LineReader.

void line_reader_target(const std::filesystem::path& path) {
  for (const Prefetch prefetch : {Prefetch::no, Prefetch::yes}) {
    try {
      LineReader reader(path, prefetch);
      std::string line;
      uint64_t lines = 0;
      while (reader.next(line)) ++lines;
      EXPECT_EQ(reader.line_number(), lines);
    } catch (const Error&) {
    }
  }
}

std::string corpus_text() {
  std::string text;
  for (int i = 0; i < 400; ++i) text += "ligne " + std::to_string(i * 31337) + " de l'été\r\n" + (i % 7 ? "" : "\n");
  return text;
}

void fuzz_compressed(const char* ext) {
  TempDir dir;
  const std::string base = read_file_bytes(testing::write_compressed(dir / (std::string("base") + ext), corpus_text()));
  std::mt19937_64 rng(seed() + 1);
  for (int i = 0; i < iterations(); ++i) {
    SCOPED_TRACE("seed " + std::to_string(seed()) + " iteration " + std::to_string(i));
    const std::string bytes = mutate(base, rng);
    line_reader_target(write_file(dir / (std::string("input") + ext), bytes));
    line_reader_target(write_file(dir / "input.txt", bytes));  // the name promises nothing
  }
}

TEST(Fuzz, GzipReader) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  fuzz_compressed(".gz");
}

TEST(Fuzz, XzReader) {
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  fuzz_compressed(".xz");
}

// ---------------------------------------------------------------------------------------
// tar (plain and gzip) through archive_unpack.

// A ustar header block for one entry, with its checksum.
std::string tar_header(const std::string& name, char type, size_t size, const std::string& link = "") {
  std::string h(512, '\0');
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  std::memcpy(h.data() + 100, "0000644", 7);
  std::memcpy(h.data() + 108, "0000000", 7);
  std::memcpy(h.data() + 116, "0000000", 7);
  const std::string octal_size = fmt::format("{:011o}", size);
  std::memcpy(h.data() + 124, octal_size.data(), 11);
  std::memcpy(h.data() + 136, "00000000000", 11);
  h[156] = type;
  std::memcpy(h.data() + 157, link.data(), std::min<size_t>(link.size(), 100));
  std::memcpy(h.data() + 257, "ustar\0" "00", 8);
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  const std::string octal_sum = fmt::format("{:06o}", sum);
  std::memcpy(h.data() + 148, octal_sum.data(), 6);
  h[154] = '\0';
  return h;
}

void fix_tar_checksums(std::string& tar) {
  for (size_t at = 0; at + 512 <= tar.size(); at += 512) {
    if (tar.compare(at + 257, 5, "ustar") != 0) continue;
    std::memset(tar.data() + at + 148, ' ', 8);
    unsigned sum = 0;
    for (size_t i = 0; i < 512; ++i) sum += static_cast<unsigned char>(tar[at + i]);
    const std::string octal_sum = fmt::format("{:06o}", sum);
    std::memcpy(tar.data() + at + 148, octal_sum.data(), 6);
    tar[at + 154] = '\0';
  }
}

std::string valid_tar() {
  std::string tar;
  auto file = [&](const std::string& name, const std::string& body) {
    tar += tar_header(name, '0', body.size());
    tar += body;
    tar.append((512 - body.size() % 512) % 512, '\0');
  };
  tar += tar_header("training/", '5', 0);
  file("training/a.en", "Hello\nWorld\n");
  file("training/a.fr", "Bonjour\nle monde\n");
  tar += tar_header("training/link.en", '2', 0, "a.en");
  tar += tar_header("training/hard.en", '1', 0, "training/a.en");
  tar.append(1024, '\0');
  return tar;
}

// Unpacks into SANDBOX/dest; nothing may appear in SANDBOX beside dest, whatever happens.
void tar_target(const std::filesystem::path& archive, const std::filesystem::path& sandbox) {
  std::filesystem::remove_all(sandbox);
  std::filesystem::create_directories(sandbox / "dest");
  try {
    archive_unpack(archive, sandbox / "dest");
  } catch (const Error&) {
  }
  for (const auto& e : std::filesystem::directory_iterator(sandbox)) {
    EXPECT_EQ(e.path().filename(), "dest") << "an entry escaped the destination";
  }
  for (const auto& e : std::filesystem::recursive_directory_iterator(sandbox / "dest")) {
    const auto type = std::filesystem::symlink_status(e.path()).type();
    EXPECT_TRUE(type == std::filesystem::file_type::regular || type == std::filesystem::file_type::directory ||
                type == std::filesystem::file_type::symlink)
        << e.path() << " is a device, FIFO or socket";
    if (type == std::filesystem::file_type::symlink) {
      const auto target = std::filesystem::read_symlink(e.path());
      EXPECT_FALSE(target.is_absolute()) << e.path();
      const auto resolved = (e.path().parent_path() / target).lexically_normal();
      const auto rel = resolved.lexically_relative(sandbox / "dest");
      EXPECT_FALSE(rel.empty() || *rel.begin() == "..") << e.path() << " -> " << target;
    }
  }
}

TEST(Fuzz, TarUnpacker) {
  if (!unpack_supported()) GTEST_SKIP() << "built without libarchive";
  TempDir dir;
  const std::string tar = valid_tar();
  tar_target(write_file(dir / "valid.tar", tar), dir / "sandbox");
  ASSERT_TRUE(std::filesystem::exists(dir / "sandbox" / "dest" / "training" / "hard.en")) << "the valid tar unpacks";
  EXPECT_EQ(read_file_bytes(dir / "sandbox" / "dest" / "training" / "hard.en"), "Hello\nWorld\n");
  std::mt19937_64 rng(seed() + 2);
  for (int i = 0; i < iterations(); ++i) {
    SCOPED_TRACE("seed " + std::to_string(seed()) + " iteration " + std::to_string(i));
    std::string bytes = mutate(tar, rng);
    if (rng() % 2) fix_tar_checksums(bytes);  // so that libarchive takes the header and our checks see it
    tar_target(write_file(dir / "input.tar", bytes), dir / "sandbox");
  }
}

TEST(Fuzz, TarGzUnpacker) {
  if (!unpack_supported()) GTEST_SKIP() << "built without libarchive";
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  TempDir dir;
  const std::string base = read_file_bytes(testing::write_compressed(dir / "base.tar.gz", valid_tar()));
  std::mt19937_64 rng(seed() + 3);
  for (int i = 0; i < iterations() / 2; ++i) {
    SCOPED_TRACE("seed " + std::to_string(seed()) + " iteration " + std::to_string(i));
    tar_target(write_file(dir / "input.tgz", mutate(base, rng)), dir / "sandbox");
  }
}

// ---------------------------------------------------------------------------------------
// Inputs that once crashed or misbehaved, replayed every run.

void replay(const std::string& target, const std::function<void(const std::filesystem::path&)>& run) {
  const auto dir = regressions_dir(target);
  ASSERT_TRUE(std::filesystem::is_directory(dir)) << dir << " (set FLASHGPT_SOURCE_DIR)";
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    SCOPED_TRACE(e.path().string());
    run(e.path());
    ++n;
  }
  EXPECT_GT(n, 0u);
}

TEST(FuzzRegressions, Shards) {
  replay("shard", [](const std::filesystem::path& input) {
    // Each of these must be refused, not merely survived.
    EXPECT_THROW(ShardView(input, VerifyPayload::no), Error);
    shard_target(input);
  });
}

TEST(FuzzRegressions, Archives) {
  if (!unpack_supported()) GTEST_SKIP() << "built without libarchive";
  TempDir dir;
  replay("archive", [&](const std::filesystem::path& input) {
    EXPECT_THROW(archive_unpack(input, dir / "sandbox" / "dest"), Error);
    tar_target(input, dir / "sandbox");
  });
}

}  // namespace
}  // namespace flashgpt

#include <flashgpt/data_reader.h>
#include <flashgpt/digest.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <functional>
#include <tuple>

#include "common/test_support.h"
#include "data/fixtures.h"

namespace flashgpt {
namespace {

using testing::TempDir;
using testing::write_compressed;
using testing::write_file;

std::vector<std::string> read_all(const std::filesystem::path& path, Prefetch prefetch = Prefetch::no) {
  LineReader reader(path, prefetch);
  std::vector<std::string> lines;
  std::string line;
  while (reader.next(line)) lines.push_back(line);
  return lines;
}

using testing::error_of;

std::string many_lines(int n) {
  std::string text;
  for (int i = 0; i < n; ++i) text += "ligne numéro " + std::to_string(i) + " avec du texte\n";
  return text;
}

TEST(LineReader, PlainTextLinesEndingsAndLastLine) {
  TempDir dir;
  EXPECT_EQ(read_all(write_file(dir / "a.txt", "one\r\ntwo\n\nfour")),
            (std::vector<std::string>{"one", "two", "", "four"}));
  EXPECT_TRUE(read_all(write_file(dir / "empty.txt", "")).empty());
  EXPECT_EQ(read_all(write_file(dir / "nl.txt", "\n")), (std::vector<std::string>{""}));
}

TEST(LineReader, GzipAndXzGiveTheSameLinesAsPlainText) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  const std::string text = many_lines(50'000);  // several output buffers
  const auto plain = read_all(write_file(dir / "p.txt", text));
  ASSERT_EQ(plain.size(), 50'000u);
  LineReader gz(write_compressed(dir / "g.txt.gz", text));
  EXPECT_EQ(gz.compression(), Compression::gzip);
  EXPECT_EQ(read_all(dir / "g.txt.gz"), plain);
  LineReader xz(write_compressed(dir / "x.txt.xz", text));
  EXPECT_EQ(xz.compression(), Compression::xz);
  EXPECT_EQ(read_all(dir / "x.txt.xz"), plain);
}

TEST(LineReader, PrefetchGivesTheSameLinesAndTheSameErrors) {
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  const std::string text = many_lines(30'000) + "last line without newline";
  const auto path = write_compressed(dir / "p.txt.xz", text);
  const auto lines = read_all(path, Prefetch::yes);
  EXPECT_EQ(lines, read_all(path));
  EXPECT_EQ(lines.back(), "last line without newline");
  {
    LineReader early(path, Prefetch::yes);  // destroyed while its thread is still ahead
    std::string line;
    ASSERT_TRUE(early.next(line));
    EXPECT_EQ(early.line_number(), 1u);
  }
  const auto whole = testing::read_file_bytes(path);
  const auto cut = write_file(dir / "cut.txt.xz", whole.substr(0, whole.size() / 2));
  LineReader reader(cut, Prefetch::yes);
  std::string line;
  uint64_t read = 0;
  const std::string message = error_of([&] {
    while (reader.next(line)) ++read;
  });
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
  EXPECT_GT(read, 1000u) << "lines decoded before the damage come first";
  EXPECT_EQ(read, reader.line_number());
}

TEST(LineReader, ReadsConcatenatedGzipMembers) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  TempDir dir;
  const auto a = testing::read_file_bytes(write_compressed(dir / "a.gz", "first\nsecond\n"));
  const auto b = testing::read_file_bytes(write_compressed(dir / "b.gz", "third\n"));
  EXPECT_EQ(read_all(write_file(dir / "ab.gz", a + b)), (std::vector<std::string>{"first", "second", "third"}));
}

TEST(LineReader, TruncatedArchivesAreErrors) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  const std::string text = many_lines(20'000);
  for (const char* name : {"t.txt.gz", "t.txt.xz"}) {
    const auto whole = testing::read_file_bytes(write_compressed(dir / name, text));
    const auto cut = write_file(dir / (std::string("cut_") + name), whole.substr(0, whole.size() * 2 / 3));
    const std::string message = error_of([&] { read_all(cut); });
    EXPECT_NE(message.find("truncated"), std::string::npos) << message;
    EXPECT_NE(message.find(cut.string()), std::string::npos) << message;
  }
}

TEST(LineReader, CorruptArchivesAreErrors) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  const std::string text = many_lines(20'000);
  for (const char* name : {"c.txt.gz", "c.txt.xz"}) {
    auto bytes = testing::read_file_bytes(write_compressed(dir / name, text));
    bytes[bytes.size() / 2] ^= 0x55;
    const auto bad = write_file(dir / (std::string("bad_") + name), bytes);
    const std::string message = error_of([&] { read_all(bad); });
    EXPECT_NE(message.find("corrupt"), std::string::npos) << message;
  }
}

TEST(LineReader, CompressedFilesWithoutTheirLibraryAreClearErrors) {
  TempDir dir;
  const std::string xz_magic("\xFD" "7zXZ\0", 6), gzip_magic("\x1F\x8B\x08\x00", 4);
  for (const auto& [kind, magic, package] : {std::tuple{Compression::xz, xz_magic, "liblzma-dev"},
                                             std::tuple{Compression::gzip, gzip_magic, "zlib1g-dev"}}) {
    if (compression_supported(kind)) continue;
    const auto path = write_file(dir / "f", magic + "rest");
    const std::string message = error_of([&] { read_all(path); });
    EXPECT_NE(message.find(package), std::string::npos) << message;
  }
}

TEST(LineReader, TheBytesDecideTheFormatNotTheName) {
  TempDir dir;
  // A failed download: the server's error page saved under the archive's name.
  const std::string page = "<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n";
  for (const char* name : {"train.en.xz", "train.en.gz"}) {
    const std::string message = error_of([&] { read_all(write_file(dir / name, page)); });
    EXPECT_NE(message.find(std::string(name) + ": named ."), std::string::npos) << message;
    EXPECT_NE(message.find("like HTML"), std::string::npos) << message;
  }
  // Compressed bytes under a plain name are still read as what they are.
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  const auto xz = write_compressed(dir / "real.xz", "une ligne\n");
  std::filesystem::rename(xz, dir / "real.txt");
  EXPECT_EQ(read_all(dir / "real.txt"), std::vector<std::string>{"une ligne"});
}

TEST(LineReader, MissingFileNamesIt) {
  const std::string message = error_of([] { LineReader("/nonexistent/corpus.en"); });
  EXPECT_NE(message.find("/nonexistent/corpus.en"), std::string::npos) << message;
}

TEST(PairReader, AlignedFilesInAnyCompression) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  write_compressed(dir / "c.en.xz", "Hello\nThank you\n");
  write_compressed(dir / "c.fr.gz", "Bonjour\nMerci\n");
  const PairSource source = pair_source_from_path(dir / "c.fr.gz");
  EXPECT_EQ(source.format, PairFormat::aligned);
  EXPECT_EQ(source.en, dir / "c.en.xz");
  EXPECT_EQ(source.name(), "c");
  PairReader reader(source);
  TextPair pair;
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.en, "Hello");
  EXPECT_EQ(pair.fr, "Bonjour");
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.fr, "Merci");
  EXPECT_EQ(pair.line, 2u);
  EXPECT_FALSE(reader.next(pair));
  EXPECT_EQ(reader.stats().read, 2u);
}

TEST(PairReader, UnalignedFilesNameBothFilesAndCounts) {
  TempDir dir;
  write_file(dir / "u.en", "a\nb\nc\nd\ne\n");
  write_file(dir / "u.fr", "a\nb\nc\n");
  PairReader reader(pair_source_from_path(dir / "u.en"));
  TextPair pair;
  const std::string message = error_of([&] {
    while (reader.next(pair)) {
    }
  });
  EXPECT_NE(message.find((dir / "u.en").string() + " has 5 lines"), std::string::npos) << message;
  EXPECT_NE(message.find((dir / "u.fr").string() + " has 3 lines"), std::string::npos) << message;
}

TEST(PairReader, InvalidUtf8IsSkippedAndCountedOrFailsByPolicy) {
  TempDir dir;
  write_file(dir / "b.en", "good\nbad \xFF here\ngood again\n");
  write_file(dir / "b.fr", "bon\nmauvais\nencore bon\n");
  PairReader skip(pair_source_from_path(dir / "b.en"), BadLinePolicy::skip);
  TextPair pair;
  std::vector<uint64_t> lines;
  while (skip.next(pair)) lines.push_back(pair.line);
  EXPECT_EQ(lines, (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(skip.stats().invalid_utf8, 1u);
  EXPECT_EQ(skip.stats().read, 3u);

  PairReader fail(pair_source_from_path(dir / "b.en"), BadLinePolicy::fail);
  const std::string message = error_of([&] {
    while (fail.next(pair)) {
    }
  });
  EXPECT_NE(message.find((dir / "b.en").string() + ":2: invalid UTF-8 at byte 4"), std::string::npos) << message;
}

TEST(PairReader, TabSeparatedPairs) {
  FLASHGPT_REQUIRE_COMPRESSION(gzip);
  TempDir dir;
  write_compressed(dir / "p.tsv.gz", "Hello\tBonjour\nno tab here\nYes\tOui\textra\n");
  const PairSource source = pair_source_from_path(dir / "p.tsv.gz");
  EXPECT_EQ(source.format, PairFormat::tsv);
  PairReader reader(source);
  TextPair pair;
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.fr, "Bonjour");
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.en, "Yes");
  EXPECT_EQ(pair.fr, "Oui");
  EXPECT_FALSE(reader.next(pair));
  EXPECT_EQ(reader.stats().malformed, 1u);
  PairReader strict(source, BadLinePolicy::fail);
  EXPECT_NE(error_of([&] {
              while (strict.next(pair)) {
              }
            }).find(":2: expected at least 2 tab-separated columns"),
            std::string::npos);
}

TEST(PairReader, SgmSegmentsAreExtractedAndNormalized) {
  TempDir dir;
  write_file(dir / "newstest2099-fren-src.en.sgm",
             "<srcset setid=\"x\" srclang=\"any\">\n<doc sysid=\"ref\" docid=\"1\">\n<p>\n"
             "<seg id=\"1\">  Spectacular   Jump </seg>\n<seg id=\"2\">Second\u00A0one</seg>\n</p>\n</doc>\n</srcset>\n");
  write_file(dir / "newstest2099-fren-ref.fr.sgm",
             "<refset>\n<doc docid=\"1\">\n<seg id=1>Saut spectaculaire</seg>\n<seg id=2>Le deuxième</seg>\n</doc>\n");
  const PairSource source = pair_source_from_path(dir / "newstest2099-fren-src.en.sgm");
  EXPECT_EQ(source.format, PairFormat::sgm);
  EXPECT_EQ(source.fr, dir / "newstest2099-fren-ref.fr.sgm");
  PairReader reader(source);
  TextPair pair;
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.en, "Spectacular Jump");
  EXPECT_EQ(pair.fr, "Saut spectaculaire");
  ASSERT_TRUE(reader.next(pair));
  EXPECT_EQ(pair.en, "Second one");
  EXPECT_EQ(pair.line, 2u);
  EXPECT_FALSE(reader.next(pair));
}

TEST(PairReader, UnknownNamesAreClearErrors) {
  TempDir dir;
  write_file(dir / "lonely.en", "x\n");
  EXPECT_NE(error_of([&] { pair_source_from_path(dir / "lonely.en"); }).find("lonely.fr"), std::string::npos);
  EXPECT_NE(error_of([&] { pair_source_from_path(dir / "corpus.txt"); }).find("cannot tell the format"),
            std::string::npos);
}

// The shared newstest2014 files, read through the xz reader, match the sha256 recorded
// in their SOURCES.md (of the decompressed bytes).
TEST(SharedData, Newstest2014MatchesItsPublishedChecksums) {
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  FLASHGPT_REQUIRE_SHARED_DATA();
  const auto data = testing::shared_data_dir();
  PairReader reader(pair_source_from_path(*data / "wmt14" / "newstest2014.fr-en.en.xz"), BadLinePolicy::fail);
  std::string en, fr;
  TextPair pair;
  while (reader.next(pair)) {
    en += pair.en + "\n";
    fr += pair.fr + "\n";
  }
  EXPECT_EQ(reader.stats().read, 3003u);
  EXPECT_EQ(sha256_hex(en), "9a12cb6e8efb3509ebede627e4a9c83ee64935509d561ff70f4b7bd5f93f6096");
  EXPECT_EQ(sha256_hex(fr), "9ed99a750c7818b7bbc62230ed0b1a1673325989bdcf9f81a7d7e67bde8ca473");
}

TEST(SharedData, EuroparlHeadKeepsItsEmptyLines) {
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  FLASHGPT_REQUIRE_SHARED_DATA();
  const auto data = testing::shared_data_dir();
  PairReader reader(pair_source_from_path(*data / "wmt14" / "train.europarl-v7-head3k.fr-en.en.xz"));
  TextPair pair;
  int empty_fr = 0;
  while (reader.next(pair)) empty_fr += pair.fr.empty();
  EXPECT_EQ(reader.stats().read, 3000u);
  EXPECT_EQ(empty_fr, 6);  // SOURCES.md: "The French file has 6 empty lines"
}

}  // namespace
}  // namespace flashgpt

// Streaming readers for the formats the WMT14 fr-en corpora come in: plain, gzip or xz
// text files (LineReader) and parallel corpora as aligned files, TSV or SGM (PairReader).
//
// Invariant: readers stream with constant memory (one line, one decompression buffer) and
// never drop anything silently: every skipped line is counted with its reason.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace flashgpt {

enum class Compression { none, gzip, xz };
// Whether this build can read it (zlib and liblzma are optional build dependencies).
bool compression_supported(Compression compression);
// What to do with a line (or pair) that is not valid UTF-8 or not well formed.
enum class BadLinePolicy { skip, fail };

// Streams the lines of a text file, decompressing gzip (zlib) or xz (liblzma) as its first
// bytes say. Lines lose their "\n" (and a "\r" before it). A compressed file that ends
// before its stream does, or fails its integrity check, is an error naming the file.
//
// With Prefetch::yes a thread decodes blocks of lines ahead (a few thousand lines, bounded),
// so decompression overlaps the caller's work; errors surface in order, at the line where
// they happened.
enum class Prefetch { no, yes };
class LineReader {
 public:
  explicit LineReader(const std::filesystem::path& path, Prefetch prefetch = Prefetch::no);
  LineReader(LineReader&&) noexcept;
  LineReader& operator=(LineReader&&) noexcept;
  ~LineReader();

  bool next(std::string& line);  // false at the end of the file
  uint64_t line_number() const;  // 1-based number of the line last returned
  uint64_t bytes_in() const;     // bytes read from disk so far
  uint64_t bytes_out() const;    // decompressed bytes returned so far
  const std::filesystem::path& path() const;
  Compression compression() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

struct TextPair {
  std::string en, fr;
  uint64_t line = 0;  // 1-based line (TSV, aligned files) or segment number (SGM)
};

enum class PairFormat { aligned, tsv, sgm };

// One parallel corpus: `en` and `fr` are two aligned files (plain, .gz or .xz, or two SGM
// files), or `en` alone is a TSV file with the English and French columns.
struct PairSource {
  PairFormat format = PairFormat::aligned;
  std::filesystem::path en, fr;
  int tsv_en_column = 0, tsv_fr_column = 1;  // 0-based
  std::string name() const;                  // e.g. "train.multi30k.fr-en"
};

struct ReadStats {
  uint64_t read = 0;            // pairs (or lines) read
  uint64_t invalid_utf8 = 0;    // skipped: not valid UTF-8
  uint64_t malformed = 0;       // skipped: TSV line without the columns, SGM line without <seg>
  uint64_t bytes = 0;           // decompressed bytes read
};

// Streams the pairs of a PairSource. Files of different lengths are an error naming both
// files and both line counts (found when the shorter one ends). Invalid UTF-8 and
// malformed lines are skipped and counted, or an error naming file and line, by policy.
// SGM segments are whitespace-normalised as sacrebleu does.
class PairReader {
 public:
  explicit PairReader(const PairSource& source, BadLinePolicy policy = BadLinePolicy::skip,
                      Prefetch prefetch = Prefetch::yes);
  PairReader(PairReader&&) noexcept;
  PairReader& operator=(PairReader&&) noexcept;
  ~PairReader();

  bool next(TextPair& pair);
  const ReadStats& stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Finds the parallel corpus a path belongs to: X.en[.gz|.xz] and X.fr[...] (either may be
// named), X.tsv[...], or an SGM pair (*-src.en.sgm / *-ref.fr.sgm and the like).
PairSource pair_source_from_path(const std::filesystem::path& path);

// The inner text of an SGM line's <seg ...>...</seg>, or nullopt for other lines.
std::optional<std::string_view> sgm_segment_text(std::string_view line);

}  // namespace flashgpt

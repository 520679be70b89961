// The WMT14 fr-en data pipeline: streaming readers for the formats the corpora come in,
// the binary token-shard format, `prepare` (raw text -> shards), the French-keyword
// analysis and the training data loader.
//
// Invariants:
// - Readers stream with constant memory (one line, one decompression buffer) and never
//   drop anything silently: every skipped line is counted with its reason.
// - Everything `prepare` writes depends on the seed and the inputs only, never on the
//   thread count: random choices are drawn from Philox keyed by (seed, document index).
#pragma once

#include <flashgpt/tokenizer.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

// ---------------------------------------------------------------------------------------
// Text: UTF-8 validation, whitespace normalisation, Unicode word characters.

// Byte offset of the first invalid UTF-8 sequence (overlongs, surrogates and code points
// above U+10FFFF are invalid), or nullopt when `text` is valid.
std::optional<size_t> utf8_first_invalid(std::string_view text);
// Strips, and collapses each run of whitespace (ASCII and Unicode White_Space, NBSP
// included, as Python's `\s`) into one space. `text` must be valid UTF-8.
std::string text_normalize_whitespace(std::string_view text);
// Whether text_normalize_whitespace(text) == text, without allocating (bytewise).
bool text_is_whitespace_normalized(std::string_view text);

// Letters (general category L*, from the tokenizer's Unicode tables) and decimal digits
// (Nd, Unicode 14): the characters of a "word" in the keyword analysis.
bool unicode_is_word_char(char32_t c);
// Unicode simple lowercase mapping (one code point to one code point): all of Unicode 14
// where the mapping is 1:1 (U+0130 İ, whose lowercase is two code points, maps to itself).
char32_t unicode_simple_lower(char32_t c);
// Decodes one code point of valid UTF-8 at `pos` and advances `pos`.
char32_t utf8_decode(std::string_view text, size_t& pos);
void utf8_append(std::string& out, char32_t c);

// ---------------------------------------------------------------------------------------
// Readers.

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

// ---------------------------------------------------------------------------------------
// Shards: the binary token files training reads.
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

// ---------------------------------------------------------------------------------------
// prepare: corpora -> documents -> token shards.

// What prepare needs of a tokenizer. From the real one: text_encoder_from(tokenizer).
struct TextEncoder {
  std::string name;
  uint32_t vocab_size = 0;
  TokenId end_of_text = 0;
  // Encodes each text (no special tokens); the result is in input order and must not
  // depend on `threads`.
  std::function<std::vector<std::vector<TokenId>>(std::span<const std::string_view> texts, int threads)> encode_batch;
};
TextEncoder text_encoder_from(const Tokenizer& tokenizer);

struct PrepareConfig {
  std::vector<PairSource> pairs;                 // parallel corpora
  std::vector<std::filesystem::path> mono;       // monolingual files, one text per line
  std::filesystem::path eval_dir;                // where newstest2012/13/14 are looked up
  std::filesystem::path out_dir;
  uint64_t seed = 1234;
  int threads = 0;                               // 0: all cores
  // The original recipe is bilingual_rate = 0: each pair contributes its English or its
  // French side, chosen at random. With rate r, a pair becomes a bilingual document with
  // probability r (a template below, direction at random) and a monolingual one otherwise.
  double bilingual_rate = 0.0;
  double val_fraction = 0.005;                   // documents held out for validation
  uint64_t shard_tokens = 100'000'000;           // tokens per shard (the last one is shorter)
  BadLinePolicy bad_lines = BadLinePolicy::skip;
  size_t batch_documents = 16384;                // documents tokenized per batch
  Prefetch prefetch = Prefetch::yes;             // decode input files on their own threads
  bool progress = true;                          // progress lines on stderr
};

// Bilingual templates: {en} and {fr} are replaced by the sentences.
inline constexpr std::array<std::string_view, 4> kBilingualTemplates = {
    "English: {en}\nFrench: {fr}", "French: {fr}\nEnglish: {en}",
    "{en}\nIn French: {fr}", "{fr}\nEn anglais : {en}"};

struct ShardInfo {
  std::string path;
  uint64_t tokens = 0;
  uint32_t crc32 = 0;
};

struct PrepareSummary {
  struct Corpus {
    std::string name;
    uint64_t read = 0, used = 0;
    std::map<std::string, uint64_t> skipped;  // reason -> count
  };
  std::vector<Corpus> corpora;
  uint64_t documents = 0, val_documents = 0;
  uint64_t tokens_en = 0, tokens_fr = 0, tokens_bilingual = 0, tokens_eot = 0;
  uint64_t dev_overlap = 0;  // pairs with a side identical to a newstest2012/2013 line (kept, warned)
  std::vector<ShardInfo> train_shards, val_shards;
  uint64_t raw_bytes = 0;
  double seconds_read = 0, seconds_tokenize = 0, seconds_write = 0, seconds_total = 0;
  std::vector<std::string> warnings;
};

// Runs the pipeline and writes OUT/train_NNNNNN.bin, OUT/val_NNNNNN.bin and
// OUT/summary.json. Refuses (throws) newstest2014 as an input, by file name or by content
// (a pair identical to a newstest2014 pair); drops single lines identical to a
// newstest2014 line, counting them; warns about newstest2012/2013.
PrepareSummary data_prepare(const PrepareConfig& config, const TextEncoder& encoder);
std::string prepare_summary_json(const PrepareSummary& summary);

// The default inputs: every train.* pair in DATA/wmt14 and DATA/extra.
std::vector<PairSource> default_pair_sources(const std::filesystem::path& data_dir);
// FLASHGPT_DATA_DIR, else ../shared/data from the working directory; empty if neither exists.
std::filesystem::path data_dir_default();

// ---------------------------------------------------------------------------------------
// analyze: whole-word keyword counts.

inline constexpr std::array<std::string_view, 19> kDefaultFrenchKeywords = {
    "le", "la", "les", "et", "de", "du", "des", "que", "qui", "à",
    "est", "un", "une", "pour", "pas", "bonjour", "merci", "oui", "non"};

enum class CaseMode { sensitive, ignore };

// Counts occurrences of keywords as whole words: a word is a maximal run of Unicode
// letters and decimal digits (unicode_is_word_char), so "de," counts "de", "l'été" is
// "l" + "été", and "de de" counts twice. With CaseMode::ignore, words and keywords are
// compared after unicode_simple_lower.
class KeywordCounter {
 public:
  KeywordCounter(std::vector<std::string> keywords, CaseMode mode);
  void add_text(std::string_view text);  // invalid UTF-8 bytes separate words
  uint64_t texts() const { return texts_; }
  uint64_t total() const;
  // keyword -> count, in the order the keywords were given
  std::vector<std::pair<std::string, uint64_t>> counts() const;

 private:
  std::vector<std::string> keywords_;
  std::vector<uint64_t> counts_;
  std::vector<std::pair<std::string, size_t>> index_;  // folded keyword -> slot, sorted
  CaseMode mode_;
  uint64_t texts_ = 0;
  std::string scratch_;
};

// ---------------------------------------------------------------------------------------
// Loader: windows of context + 1 tokens from memory-mapped shards.

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

// ---------------------------------------------------------------------------------------
// download: the official WMT14 fr-en archives.

struct DownloadItem {
  std::string name;        // file name under the destination
  std::string url;
  std::string md5;         // published checksum, hex, or empty
  std::string sha256;      // hex, or empty
  uint64_t size = 0;       // published size, or 0
};

// The statmt.org archives fairseq's prepare-wmt14en2fr.sh and sacrebleu use. The md5 of
// test-full.tgz and test-filtered.tgz is the one sacrebleu publishes; statmt.org publishes
// none for the training archives, so those are verified by archive integrity and a sha256
// recorded in DEST/manifest.json on first download.
std::vector<DownloadItem> wmt14_download_items();
// A manifest file: JSON array of {name, url, md5?, sha256?, size?}.
std::vector<DownloadItem> download_items_from_json(const std::filesystem::path& path);

struct DownloadConfig {
  std::filesystem::path dest;
  std::vector<DownloadItem> items;
  int retries = 5;             // attempts per file after the first, resuming each time
  double timeout_seconds = 0;  // 0: none (low-speed limit still applies)
  bool unpack = true;
  bool progress = true;
};

bool download_supported();  // built with libcurl
bool unpack_supported();    // built with libarchive
// Fetches each item to DEST/NAME (resuming DEST/NAME.part), verifies it and unpacks it
// into DEST/. Throws on a checksum mismatch or a corrupt archive, naming the file.
void data_download(const DownloadConfig& config);
// Unpacks a tar/tgz/tar.gz archive into `dest`, rejecting paths that escape it.
void archive_unpack(const std::filesystem::path& archive, const std::filesystem::path& dest);

std::string md5_hex_file(const std::filesystem::path& path);
std::string sha256_hex_file(const std::filesystem::path& path);
std::string md5_hex(std::string_view bytes);
std::string sha256_hex(std::string_view bytes);  // defined by the tokenizer (src/tokenizer/sha256.cc)

}  // namespace flashgpt

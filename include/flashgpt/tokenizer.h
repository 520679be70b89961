// A byte-level BPE tokenizer that reproduces tiktoken's encodings exactly
// (r50k_base, cl100k_base, o200k_base).
//
// This header is the contract the data pipeline and generation code are written
// against; the tokenizer component implements it (and may add to it).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

using TokenId = uint32_t;
// The largest id a rank file or meta.json may give (the piece cache keeps ids in 24 bits).
inline constexpr TokenId kMaxTokenId = (1u << 24) - 1;

// Which special tokens may appear in text given to encode(), with tiktoken's semantics:
// allowed ones are encoded as their special id; a disallowed one found in the text is an
// error naming it; the rest are encoded as ordinary text.
struct SpecialTokenPolicy {
  bool allow_all = false;
  std::vector<std::string> allowed;     // used when allow_all is false
  bool disallow_all_others = true;      // tiktoken's default disallowed_special="all"
};

// The most threads the encoders accept (0 means all cores; more is an error naming the count).
inline constexpr int kMaxEncodeThreads = 1024;

enum class InvalidUtf8 { error, replace };  // replace: as bytes.decode(errors="replace")

class Tokenizer {
 public:
  // Loads ENCODING.tiktoken and ENCODING.meta.json from `vocab_dir` (or, when empty,
  // from FLASHGPT_TOKENIZER_DIR), verifying the rank file's sha256.
  static Tokenizer load(std::string_view encoding_name, const std::filesystem::path& vocab_dir = {});
  // load() from the texts of a rank file and of a meta.json (nullopt: tiktoken's pattern
  // and special tokens for `encoding_name`), without the sha256 check; `rank_source` and
  // `meta_source` name them in error messages. For tests and fuzzing of the loader.
  static Tokenizer from_text(std::string_view encoding_name, std::string_view rank_file, std::string_view rank_source,
                             std::optional<std::string_view> meta_json = std::nullopt,
                             std::string_view meta_source = "meta.json");

  const std::string& name() const;
  size_t vocab_size() const;  // max id + 1, specials included (the model's vocabulary)
  std::optional<TokenId> special_token(std::string_view text) const;
  std::vector<std::string> special_tokens() const;  // their texts
  TokenId end_of_text() const;  // <|endoftext|>

  std::vector<TokenId> encode_ordinary(std::string_view text, InvalidUtf8 invalid = InvalidUtf8::error) const;
  std::vector<TokenId> encode(std::string_view text, const SpecialTokenPolicy& policy = {},
                              InvalidUtf8 invalid = InvalidUtf8::error) const;
  // encode_ordinary over many documents on `threads` workers (0: all cores); the result
  // is in input order and independent of the thread count. A document that is not valid
  // UTF-8 is an error naming its index.
  std::vector<std::vector<TokenId>> encode_ordinary_batch(std::span<const std::string_view> texts,
                                                          int threads = 0) const;
  // encode_ordinary of one large text on `threads` workers (0: all cores), cut into chunks
  // of about `chunk_bytes` (0: a size chosen for speed, at least 64 KiB; tests force small
  // chunks so that many seams occur) where a piece boundary is certain under every
  // encoding's pattern: the same ids as encode_ordinary, any thread count, any chunk size.
  std::vector<TokenId> encode_ordinary_parallel(std::string_view text, int threads = 0,
                                                InvalidUtf8 invalid = InvalidUtf8::error,
                                                size_t chunk_bytes = 0) const;
  std::string decode(std::span<const TokenId> tokens) const;  // raw bytes, may be invalid UTF-8
  std::string_view token_bytes(TokenId token) const;          // the bytes of one id (throws if unknown)

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Token ids as files and pipes carry them: decimal text (separated by spaces, tabs, newlines
// or commas) or little-endian u32. Parsing names the offending bytes: a word that is not a
// whole number, a value beyond 32 bits, a u32 file whose size is not a multiple of 4.
enum class TokenIdFormat { text, u32 };
std::vector<TokenId> token_ids_parse(std::string_view input, TokenIdFormat format);
std::string token_ids_format(std::span<const TokenId> ids, TokenIdFormat format);  // text: ends with a newline

// Turns a stream of ids into text for generation: emits only complete UTF-8 characters
// and holds back an incomplete tail until the ids that complete it arrive.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer);
  // The newly completed text, possibly empty. Bytes that no later token can complete into a
  // character (a stray continuation byte, an impossible sequence) come out as U+FFFD at once.
  std::string push(TokenId token);
  std::string finish();             // whatever is held back, invalid bytes as U+FFFD

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;
};

}  // namespace flashgpt

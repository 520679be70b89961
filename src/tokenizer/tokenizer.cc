// Tokenizer: loading the rank files, encode/decode with tiktoken's semantics, batch and
// parallel encoding, and the streaming decoder. The per-piece work lives in pretokenize.h
// (splitting) and bpe.cc (merging).
#include <flashgpt/tokenizer.h>

#include "bpe.h"
#include "huge_pages.h"
#include "piece_cache.h"
#include "pretokenize.h"
#include "vocab_files.h"

#include <flashgpt/error.h>
#include <flashgpt/unicode.h>

#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstring>

namespace flashgpt {

namespace {

struct PatternEntry {
  std::string_view pat_str;
  PatternSpec spec;
};

// The pattern strings we reproduce: the spelled-out forms in the shared meta.json files and
// tiktoken's own (tiktoken_ext/openai_public.py, tiktoken 0.14).
constexpr std::string_view kR50kMeta = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kR50kGpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}]+| ?[\p{N}]+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kR50kTiktoken = R"('(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s)";
constexpr std::string_view kCl100kMeta =
    R"(('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kCl100kTiktoken =
    R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)";
constexpr std::string_view kO200kMeta =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kO200kTiktoken =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

constexpr PatternEntry kPatterns[] = {
    {kR50kMeta, {PatternKind::r50k, false, false}},
    {kR50kGpt2, {PatternKind::r50k, false, false}},
    {kR50kTiktoken, {PatternKind::r50k, false, true}},
    {kCl100kMeta, {PatternKind::cl100k, false, false}},
    {kCl100kTiktoken, {PatternKind::cl100k, true, true}},
    {kO200kMeta, {PatternKind::o200k, false, false}},
    {kO200kTiktoken, {PatternKind::o200k, true, false}},
};

struct BuiltinEncoding {
  std::string_view name;
  std::string_view pat_str;
  std::array<std::pair<std::string_view, TokenId>, 5> specials;  // empty name: unused
};
constexpr BuiltinEncoding kBuiltins[] = {
    {"r50k_base", kR50kTiktoken, {{{"<|endoftext|>", 50256}}}},
    {"p50k_base", kR50kTiktoken, {{{"<|endoftext|>", 50256}}}},
    {"cl100k_base",
     kCl100kTiktoken,
     {{{"<|endoftext|>", 100257},
       {"<|fim_prefix|>", 100258},
       {"<|fim_middle|>", 100259},
       {"<|fim_suffix|>", 100260},
       {"<|endofprompt|>", 100276}}}},
    {"o200k_base", kO200kTiktoken, {{{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}}}},
};

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool base64_decode(std::string_view in, std::string& out) {
  uint32_t bits = 0;
  int count = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '=') return in.find_first_not_of('=', i) == std::string_view::npos;  // padding ends it
    int v = base64_value(c);
    if (v < 0) return false;
    bits = bits << 6 | uint32_t(v);
    count += 6;
    if (count >= 8) {
      count -= 8;
      out.push_back(char((bits >> count) & 0xFF));
    }
  }
  return true;
}

std::atomic<uint64_t> g_tokenizer_uid{0};

// 0 means all cores. A count beyond kMaxEncodeThreads is a typo, not a machine (OpenMP
// crashed trying to start 100000 threads), and a negative one has no meaning.
int threads_resolve(int threads) {
  FLASHGPT_CHECK(threads >= 0 && threads <= kMaxEncodeThreads,
                 "the thread count must be 0 (all cores) or between 1 and {}, got {}", kMaxEncodeThreads, threads);
  return threads > 0 ? threads : std::max(1, omp_get_num_procs());
}

}  // namespace

std::optional<PatternSpec> pattern_spec_from_string(std::string_view pat_str) {
  for (const auto& entry : kPatterns)
    if (entry.pat_str == pat_str) return entry.spec;
  return std::nullopt;
}

std::optional<std::string_view> pattern_builtin(std::string_view encoding_name) {
  for (const auto& builtin : kBuiltins)
    if (builtin.name == encoding_name) return builtin.pat_str;
  return std::nullopt;
}

struct Tokenizer::Impl {
  std::string name;
  PatternSpec pattern;
  std::string arena;                          // bytes of every token, specials included
  std::vector<std::pair<uint32_t, uint32_t>> id_bytes;  // id -> (offset, length) in arena
  std::vector<bool> id_valid;
  RankMap ranks;
  std::vector<std::pair<std::string, TokenId>> specials;
  TokenId end_of_text = 0;
  uint64_t uid = ++g_tokenizer_uid;  // identifies this tokenizer to the per-thread piece caches

  std::string_view bytes_of(TokenId id) const { return {arena.data() + id_bytes[id].first, id_bytes[id].second}; }

  // Room in `out` for the ids of `bytes` more bytes of text: about 4 bytes a token in the
  // texts we see, and growing the vector as it goes costs page faults and copies (5% of the
  // time on 10 MB). A new buffer's untouched pages are asked to be huge pages.
  static void reserve_ids(std::vector<TokenId>& out, size_t bytes) {
    size_t expected = out.size() + bytes / 3 + 16;
    if (out.capacity() >= expected) return;
    out.reserve(std::max(expected, 2 * out.capacity()));
    advise_huge_pages(out.data() + out.size(), (out.capacity() - out.size()) * sizeof(TokenId));
  }

  // encode_ordinary of valid UTF-8.
  void encode_valid(std::string_view text, std::vector<TokenId>& out) const {
    reserve_ids(out, text.size());
    Pretokenizer pretokenizer(pattern, text);
    PieceCache& cache = PieceCache::for_tokenizer(uid);
    auto p = reinterpret_cast<const uint8_t*>(text.data());
    // Lookups of rare pieces miss the CPU caches (the rank map is 1.5 MB for cl100k_base,
    // the piece cache 2 MB), and one piece's lookup would wait for the last. So pieces go
    // through a short queue: on entry the hash is computed and every line the lookup may
    // read is prefetched (the home slot, the filter word, the cache entry; no load on
    // entry); kAhead pieces later, when the lines have arrived, the piece is looked up.
    constexpr size_t kAhead = 8;
    struct Queued {
      size_t begin, length;
      RankMap::Key key;
    };
    Queued queue[kAhead];
    size_t queued = 0;
    auto process = [&](const Queued& q) __attribute__((always_inline)) {
      const uint8_t* piece = p + q.begin;
      size_t length = q.length;
      if (length == 1) {
        out.push_back(ranks.find_byte(*piece));
        return;
      }
      if (uint32_t rank = ranks.find_home_first(piece, length, q.key); rank != kNoRank) {
        out.push_back(rank);
        return;
      }
      if (length > PieceCache::kMaxKey) {
        bpe_encode_piece(ranks, text.substr(q.begin, length), out);
        return;
      }
      uint64_t tail = length <= 8 ? 0 : RankMap::prefix8(piece + 8, length - 8);
      PieceCache::Set& set = cache.set_of(q.key.hash);
      if (const PieceCache::Entry* e = PieceCache::find(set, q.key.head, tail, length)) {
        for (size_t i = 0, n = e->count(); i < n; ++i) out.push_back(e->id(i));
        return;
      }
      size_t first = out.size();
      bpe_encode_piece(ranks, text.substr(q.begin, length), out);
      size_t count = out.size() - first;
      // Ids must fit the entry's 24 bits (checked when the rank file was read).
      if (count <= PieceCache::kMaxIds) PieceCache::insert(set, q.key.head, tail, length, out.data() + first, count);
    };
    auto enqueue = [&](size_t begin, size_t end) __attribute__((always_inline)) {
      size_t length = end - begin;
      Queued& slot = queue[queued % kAhead];
      if (queued >= kAhead) process(slot);
      const uint8_t* piece = p + begin;
      RankMap::Key key{};
      if (length > 1) {
        key = begin + 8 <= text.size() ? RankMap::key_overread(piece, length) : RankMap::key(piece, length);
        // Three lines a piece (four with a tail), where choosing between the slot and the
        // cache entry by the filter's answer made every piece wait for the filter word here,
        // an L2 or L3 hit (a third of this loop's samples in perf): the lines that a piece
        // does not read cost less than that wait.
        __builtin_prefetch(ranks.slot_address(key.hash));
        __builtin_prefetch(ranks.filter_address(key.hash));
        __builtin_prefetch(&cache.set_of(key.hash));
        // A key longer than 8 bytes also reads its tail. Behind a branch: the branchless
        // form requested home again for the other 84% of pieces, and requesting a line is
        // not free here (perf puts this loop's largest waits on the prefetch instructions
        // themselves); measured 1-3% faster this way.
        if (length > 8) __builtin_prefetch(ranks.tail_address(key.hash));
      }
      slot = {begin, length, key};
      ++queued;
    };
    // Out of line (the pretokenizer's AVX2 loop is `flatten`; inlined there, this measured
    // slower), with a block's pieces in one call.
    pretokenizer.for_each_piece([&](size_t begin, size_t end) __attribute__((noinline)) { enqueue(begin, end); },
                                [&](size_t base, uint64_t starts, size_t end) __attribute__((noinline)) {
                                  Pretokenizer::block_pieces(base, starts, end, enqueue);
                                });
    for (size_t i = queued > kAhead ? queued - kAhead : 0; i < queued; ++i) process(queue[i % kAhead]);
  }

  // Valid UTF-8 view of `text` (`storage` holds the replaced copy when needed).
  std::string_view valid_text(std::string_view text, InvalidUtf8 invalid, std::string& storage) const {
    size_t bad = unicode::utf8_find_invalid(text);
    if (bad == text.size()) return text;
    if (invalid == InvalidUtf8::replace) {
      storage = unicode::utf8_replace_invalid(text);
      return storage;
    }
    FLASHGPT_FAIL("the text is not valid UTF-8: invalid byte 0x{:02X} at byte offset {} (encode with invalid UTF-8 "
                  "replaced by U+FFFD to accept it)",
                  static_cast<uint8_t>(text[bad]), bad);
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(std::string_view encoding_name, const std::filesystem::path& vocab_dir) {
  VocabFile rank_file = vocab_rank_file_read(encoding_name, vocab_dir);
  std::optional<VocabFile> meta = vocab_meta_read(encoding_name, vocab_dir);
  return from_text(encoding_name, rank_file.contents, rank_file.path,
                   meta ? std::optional<std::string_view>(meta->contents) : std::nullopt, meta ? meta->path : "");
}

namespace {

// Rank file: one "base64-bytes rank" per line. Returns rank -> (offset, length) of its
// bytes, appended to `arena`; a missing rank has length 0.
std::vector<std::pair<uint32_t, uint32_t>> rank_file_parse(std::string_view contents, std::string_view source,
                                                            std::string& arena) {
  std::vector<std::pair<uint32_t, uint32_t>> rank_bytes;
  std::vector<uint32_t> rank_line;  // for the message about a rank given twice
  // Ranks are 0 to N-1 for N tokens in every official file; a larger one is an error here,
  // not gigabytes of empty slots.
  size_t tokens = 0;
  for (size_t start = 0; start < contents.size();) {
    size_t end = std::min(contents.find('\n', start), contents.size());
    tokens += end > start;
    start = end + 1;
  }
  size_t line_start = 0, line_number = 0;
  arena.reserve(contents.size());
  while (line_start < contents.size()) {
    size_t line_end = contents.find('\n', line_start);
    if (line_end == std::string::npos) line_end = contents.size();
    std::string_view line = contents.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_number;
    if (line.empty()) continue;
    size_t space = line.find(' ');
    FLASHGPT_CHECK(space != std::string_view::npos, "{}, line {}: expected '<base64 bytes> <rank>', got '{}'", source,
                   line_number, line.substr(0, 80));
    std::string_view encoded = line.substr(0, space), digits = line.substr(space + 1);
    size_t offset = arena.size();
    FLASHGPT_CHECK(base64_decode(encoded, arena) && arena.size() > offset,
                   "{}, line {}: '{}' is not the base64 of one or more bytes", source, line_number, encoded.substr(0, 80));
    uint32_t rank = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), rank);
    FLASHGPT_CHECK(ec == std::errc() && end == digits.data() + digits.size() && rank < kMaxTokenId + 1,
                   "{}, line {}: the rank '{}' is not a whole number from 0 to {}", source, line_number,
                   digits.substr(0, 80), kMaxTokenId);
    FLASHGPT_CHECK(rank < tokens, "{}, line {}: the rank {} is not below the number of tokens in the file ({})", source,
                   line_number, rank, tokens);
    if (rank_bytes.size() <= rank) rank_bytes.resize(rank + 1, {0, 0}), rank_line.resize(rank + 1, 0);
    FLASHGPT_CHECK(rank_bytes[rank].second == 0, "{}, line {}: rank {} appears twice (first on line {})", source,
                   line_number, rank, rank_line[rank]);
    rank_bytes[rank] = {uint32_t(offset), uint32_t(arena.size() - offset)};
    rank_line[rank] = uint32_t(std::min<size_t>(line_number, UINT32_MAX));
  }
  FLASHGPT_CHECK(!rank_bytes.empty(), "{}: no ranks (an empty rank file)", source);
  return rank_bytes;
}

struct MetaJson {
  std::string pat_str;
  std::vector<std::pair<std::string, TokenId>> specials;
};

// meta.json: {"pat_str": "...", "special_tokens": {"<|endoftext|>": 50256, ...}}.
MetaJson meta_json_parse(std::string_view text, std::string_view source) {
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    FLASHGPT_FAIL("{}: not valid JSON: {}", source, e.what());
  }
  FLASHGPT_CHECK(meta.is_object(), "{}: expected a JSON object with pat_str and special_tokens", source);
  MetaJson out;
  auto pat_str = meta.find("pat_str");
  FLASHGPT_CHECK(pat_str != meta.end() && pat_str->is_string(), "{}: pat_str is missing or not a string", source);
  out.pat_str = pat_str->get<std::string>();
  auto specials = meta.find("special_tokens");
  FLASHGPT_CHECK(specials != meta.end() && specials->is_object(),
                 "{}: special_tokens is missing or not an object of token -> id", source);
  for (const auto& [text, id] : specials->items()) {
    FLASHGPT_CHECK(!text.empty(), "{}: a special token is the empty string", source);
    FLASHGPT_CHECK(id.is_number_integer(), "{}: special token {} has the id {}, not a whole number", source, text,
                   id.dump());
    FLASHGPT_CHECK(id.is_number_unsigned() && id.get<uint64_t>() <= kMaxTokenId,
                   "{}: special token {} has the id {}, outside 0 to {}", source, text, id.dump(), kMaxTokenId);
    TokenId value = id.get<TokenId>();
    for (const auto& [other, other_id] : out.specials)
      FLASHGPT_CHECK(other_id != value, "{}: special tokens {} and {} both have the id {}", source, other, text, value);
    out.specials.emplace_back(text, value);
  }
  return out;
}

}  // namespace

Tokenizer Tokenizer::from_text(std::string_view encoding_name, std::string_view rank_file, std::string_view rank_source,
                               std::optional<std::string_view> meta_json, std::string_view meta_source) {
  auto impl = std::make_unique<Impl>();
  impl->name = std::string(encoding_name);
  std::vector<std::pair<uint32_t, uint32_t>> rank_bytes = rank_file_parse(rank_file, rank_source, impl->arena);

  // Pattern and special tokens: from meta.json when present, else tiktoken's own.
  std::string pat_str;
  if (meta_json) {
    MetaJson meta = meta_json_parse(*meta_json, meta_source);
    pat_str = std::move(meta.pat_str);
    impl->specials = std::move(meta.specials);
  } else {
    for (const auto& builtin : kBuiltins) {
      if (builtin.name != encoding_name) continue;
      pat_str = builtin.pat_str;
      for (const auto& [text, id] : builtin.specials)
        if (!text.empty()) impl->specials.emplace_back(std::string(text), id);
    }
  }
  auto spec = pattern_spec_from_string(pat_str);
  FLASHGPT_CHECK(spec, "{}: the pretokenization pattern is not one this tokenizer reproduces: {}",
                 meta_json ? meta_source : encoding_name, pat_str);
  impl->pattern = *spec;

  // Ids: ordinary ranks, then the special tokens.
  size_t vocab = rank_bytes.size();
  for (const auto& [text, id] : impl->specials) vocab = std::max<size_t>(vocab, size_t(id) + 1);
  impl->id_bytes.assign(vocab, {0, 0});
  impl->id_valid.assign(vocab, false);
  for (size_t rank = 0; rank < rank_bytes.size(); ++rank) {
    impl->id_bytes[rank] = rank_bytes[rank];
    impl->id_valid[rank] = rank_bytes[rank].second > 0;
  }
  for (const auto& [text, id] : impl->specials) {
    FLASHGPT_CHECK(!impl->id_valid[id], "{}: special token {} has the id {}, which {} gives to an ordinary token",
                   meta_source, text, id, rank_source);
    impl->id_bytes[id] = {uint32_t(impl->arena.size()), uint32_t(text.size())};
    impl->id_valid[id] = true;
    impl->arena += text;
  }
  std::vector<std::string_view> tokens(rank_bytes.size());
  for (size_t rank = 0; rank < rank_bytes.size(); ++rank)
    if (rank_bytes[rank].second > 0) tokens[rank] = impl->bytes_of(TokenId(rank));
  try {
    impl->ranks.build(tokens);
  } catch (const Error& e) {
    FLASHGPT_FAIL("{}: {}", rank_source, e.what());
  }
  for (int b = 0; b < 256; ++b) {
    uint8_t byte = uint8_t(b);
    FLASHGPT_CHECK(impl->ranks.find_byte(byte) != kNoRank, "{}: no token for the byte 0x{:02X}", rank_source, b);
  }
  auto eot = std::find_if(impl->specials.begin(), impl->specials.end(),
                          [](const auto& s) { return s.first == "<|endoftext|>"; });
  FLASHGPT_CHECK(eot != impl->specials.end(), "{}: no <|endoftext|> special token",
                 meta_json ? meta_source : encoding_name);
  impl->end_of_text = eot->second;
  return Tokenizer(std::move(impl));
}

const std::string& Tokenizer::name() const { return impl_->name; }
size_t Tokenizer::vocab_size() const { return impl_->id_bytes.size(); }
TokenId Tokenizer::end_of_text() const { return impl_->end_of_text; }

std::optional<TokenId> Tokenizer::special_token(std::string_view text) const {
  for (const auto& [special, id] : impl_->specials)
    if (special == text) return id;
  return std::nullopt;
}

std::vector<std::string> Tokenizer::special_tokens() const {
  std::vector<std::string> out;
  for (const auto& [special, id] : impl_->specials) out.push_back(special);
  return out;
}

std::string_view Tokenizer::token_bytes(TokenId token) const {
  FLASHGPT_CHECK(token < impl_->id_valid.size() && impl_->id_valid[token], "token id {} is not in the {} vocabulary",
                 token, impl_->name);
  return impl_->bytes_of(token);
}

std::vector<TokenId> Tokenizer::encode_ordinary(std::string_view text, InvalidUtf8 invalid) const {
  std::string storage;
  std::string_view valid = impl_->valid_text(text, invalid, storage);
  std::vector<TokenId> out;  // encode_valid reserves
  impl_->encode_valid(valid, out);
  return out;
}

std::vector<TokenId> Tokenizer::encode(std::string_view text, const SpecialTokenPolicy& policy,
                                       InvalidUtf8 invalid) const {
  std::string storage;
  std::string_view valid = impl_->valid_text(text, invalid, storage);
  // Like tiktoken: the leftmost disallowed special token in the text is an error.
  std::vector<const std::pair<std::string, TokenId>*> allowed;
  size_t disallowed_at = std::string_view::npos;
  const std::string* disallowed = nullptr;
  for (const auto& special : impl_->specials) {
    bool is_allowed = policy.allow_all ||
                      std::find(policy.allowed.begin(), policy.allowed.end(), special.first) != policy.allowed.end();
    if (is_allowed) {
      allowed.push_back(&special);
    } else if (policy.disallow_all_others) {
      size_t at = valid.find(special.first);
      if (at < disallowed_at) disallowed_at = at, disallowed = &special.first;
    }
  }
  FLASHGPT_CHECK(!disallowed,
                 "the text contains the disallowed special token {} at byte offset {}; allow it to encode it as its "
                 "special id, or stop disallowing it to encode it as ordinary text",
                 *disallowed, disallowed_at);
  std::vector<TokenId> out;
  Impl::reserve_ids(out, valid.size());  // for all segments, not just the first
  size_t pos = 0;
  while (pos < valid.size()) {
    // The leftmost allowed special token (the longest on a tie), else the end.
    size_t best_at = valid.size();
    const std::pair<std::string, TokenId>* best = nullptr;
    for (const auto* special : allowed) {
      size_t at = valid.find(special->first, pos);
      if (at == std::string_view::npos) continue;
      if (at < best_at || (at == best_at && special->first.size() > best->first.size())) best_at = at, best = special;
    }
    impl_->encode_valid(valid.substr(pos, best_at - pos), out);
    if (!best) break;
    out.push_back(best->second);
    pos = best_at + best->first.size();
  }
  return out;
}

std::vector<std::vector<TokenId>> Tokenizer::encode_ordinary_batch(std::span<const std::string_view> texts,
                                                                   int threads) const {
  std::vector<std::vector<TokenId>> out(texts.size());
  std::vector<std::string> errors(texts.size());
  const long count = static_cast<long>(texts.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_resolve(threads))
  for (long i = 0; i < count; ++i) {
    try {
      out[i] = encode_ordinary(texts[i]);
    } catch (const std::exception& e) {
      errors[i] = e.what();
    }
  }
  for (size_t i = 0; i < errors.size(); ++i)
    FLASHGPT_CHECK(errors[i].empty(), "document {} of the batch: {}", i, errors[i]);
  return out;
}

std::vector<TokenId> Tokenizer::encode_ordinary_parallel(std::string_view text, int threads, InvalidUtf8 invalid,
                                                         size_t chunk_bytes) const {
  std::string storage;
  std::string_view valid = impl_->valid_text(text, invalid, storage);
  int workers = threads_resolve(threads);
  // Cut points: after an ASCII letter or digit that an ASCII space, tab, CR or LF follows.
  // Under every pattern a piece holding such a letter or digit ends with it (no alternative
  // takes whitespace after a letter or digit), so a piece starts at the cut; and no pattern
  // looks behind, so the chunk after it splits exactly as the whole text does there. (Cutting
  // after the whitespace instead is wrong: at the end of a chunk r50k_base's `\s++$` takes a
  // run like "\n\n" as one piece, where before a word the text gives "\n" and "\n".)
  constexpr size_t kMinChunk = 1 << 16;
  size_t chunk_target =
      chunk_bytes > 0 ? chunk_bytes : std::max(kMinChunk, valid.size() / (size_t(workers) * 8) + 1);
  auto ascii_alnum = [](uint8_t c) { return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'); };
  auto ascii_space = [](uint8_t c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  std::vector<size_t> cuts = {0};
  while (cuts.back() < valid.size()) {
    size_t cut = std::min(valid.size(), cuts.back() + chunk_target);
    while (cut < valid.size() && !(ascii_space(uint8_t(valid[cut])) && ascii_alnum(uint8_t(valid[cut - 1])))) ++cut;
    cuts.push_back(cut);
  }
  const long chunks = static_cast<long>(cuts.size()) - 1;
  std::vector<std::vector<TokenId>> parts(chunks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(workers)
  for (long c = 0; c < chunks; ++c) {
    impl_->encode_valid(valid.substr(cuts[c], cuts[c + 1] - cuts[c]), parts[c]);
  }
  size_t total = 0;
  for (const auto& part : parts) total += part.size();
  std::vector<TokenId> out;
  out.reserve(total);
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

std::string Tokenizer::decode(std::span<const TokenId> tokens) const {
  std::string out;
  for (TokenId token : tokens) {
    FLASHGPT_CHECK(token < impl_->id_valid.size() && impl_->id_valid[token],
                   "cannot decode token id {}: not in the {} vocabulary", token, impl_->name);
    out += impl_->bytes_of(token);
  }
  return out;
}

std::vector<TokenId> token_ids_parse(std::string_view input, TokenIdFormat format) {
  std::vector<TokenId> ids;
  if (format == TokenIdFormat::u32) {
    FLASHGPT_CHECK(input.size() % 4 == 0, "u32 input has {} bytes, not a multiple of 4", input.size());
    ids.resize(input.size() / 4);
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto* b = reinterpret_cast<const uint8_t*>(input.data() + 4 * i);
      ids[i] = TokenId(b[0]) | TokenId(b[1]) << 8 | TokenId(b[2]) << 16 | TokenId(b[3]) << 24;
    }
    return ids;
  }
  auto separator = [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == ','; };
  const char* p = input.data();
  const char* end = p + input.size();
  while (p < end) {
    if (separator(*p)) {
      ++p;
      continue;
    }
    // A word of the input: up to the next separator, for the messages.
    const char* word_end = p;
    while (word_end < end && !separator(*word_end)) ++word_end;
    std::string_view word(p, std::min<size_t>(word_end - p, 40));
    TokenId id;
    auto [next, ec] = std::from_chars(p, end, id);
    FLASHGPT_CHECK(ec != std::errc::result_out_of_range,
                   "the token id {} at byte {} of the input does not fit in 32 bits (ids are 0 to 4294967295)", word,
                   p - input.data());
    FLASHGPT_CHECK(ec == std::errc() && next == word_end,
                   "expected a token id (a whole number from 0 to 4294967295) at byte {} of the input, got '{}'",
                   p - input.data(), word);
    ids.push_back(id);
    p = next;
  }
  return ids;
}

std::string token_ids_format(std::span<const TokenId> ids, TokenIdFormat format) {
  std::string out;
  if (format == TokenIdFormat::u32) {
    out.resize(ids.size() * 4);
    for (size_t i = 0; i < ids.size(); ++i)
      for (int k = 0; k < 4; ++k) out[4 * i + k] = char((ids[i] >> (8 * k)) & 0xFF);
    return out;
  }
  out.reserve(ids.size() * 6 + 1);
  char buffer[16];
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ' ';
    auto [end, ec] = std::to_chars(buffer, buffer + sizeof(buffer), ids[i]);
    out.append(buffer, end);
  }
  out += '\n';
  return out;
}

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}

// Emits every complete character of pending_; an invalid sequence that no later byte can
// complete becomes U+FFFD now, and a valid but incomplete tail waits for the next token.
std::string StreamingDecoder::push(TokenId token) {
  pending_ += tokenizer_->token_bytes(token);
  size_t pos = 0;
  std::string out;
  while (pos < pending_.size()) {
    bool truncated;
    size_t length = unicode::utf8_sequence_length(pending_, pos, &truncated);
    if (truncated) break;
    if (length == 0) {
      out += "\xEF\xBF\xBD";
      pos += unicode::utf8_invalid_length(pending_, pos);
      continue;
    }
    out.append(pending_, pos, length);
    pos += length;
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamingDecoder::finish() {
  std::string out = unicode::utf8_replace_invalid(pending_);
  pending_.clear();
  return out;
}

}  // namespace flashgpt

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
  for (char c : in) {
    if (c == '=') break;
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

int threads_resolve(int threads) { return threads > 0 ? threads : std::max(1, omp_get_num_procs()); }

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
  auto impl = std::make_unique<Impl>();
  impl->name = std::string(encoding_name);
  std::string contents = vocab_rank_file_read(encoding_name, vocab_dir);

  // Rank file: one "base64-bytes rank" per line.
  std::vector<std::pair<uint32_t, uint32_t>> rank_bytes;  // rank -> (offset, length)
  size_t line_start = 0, line_number = 0;
  impl->arena.reserve(contents.size());
  while (line_start < contents.size()) {
    size_t line_end = contents.find('\n', line_start);
    if (line_end == std::string::npos) line_end = contents.size();
    std::string_view line(contents.data() + line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_number;
    if (line.empty()) continue;
    size_t space = line.find(' ');
    uint32_t rank = 0;
    size_t offset = impl->arena.size();
    bool ok = space != std::string_view::npos && base64_decode(line.substr(0, space), impl->arena);
    if (ok) {
      auto digits = line.substr(space + 1);
      auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), rank);
      ok = ec == std::errc() && end == digits.data() + digits.size() && rank < (1u << 24);
    }
    FLASHGPT_CHECK(ok, "{} rank file, line {}: expected 'base64 rank', got '{}'", encoding_name, line_number,
                   line.substr(0, 80));
    if (rank_bytes.size() <= rank) rank_bytes.resize(rank + 1, {0, 0});
    FLASHGPT_CHECK(rank_bytes[rank].second == 0, "{} rank file: rank {} appears twice", encoding_name, rank);
    rank_bytes[rank] = {uint32_t(offset), uint32_t(impl->arena.size() - offset)};
  }

  // Pattern and special tokens: from meta.json when present, else tiktoken's own.
  std::string pat_str;
  if (auto meta_text = vocab_meta_read(encoding_name, vocab_dir)) {
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(*meta_text);
      pat_str = meta.at("pat_str").get<std::string>();
      for (const auto& [text, id] : meta.at("special_tokens").items())
        impl->specials.emplace_back(text, id.get<TokenId>());
    } catch (const nlohmann::json::exception& e) {
      FLASHGPT_FAIL("{}.meta.json: {}", encoding_name, e.what());
    }
  } else {
    for (const auto& builtin : kBuiltins) {
      if (builtin.name != encoding_name) continue;
      pat_str = builtin.pat_str;
      for (const auto& [text, id] : builtin.specials)
        if (!text.empty()) impl->specials.emplace_back(std::string(text), id);
    }
  }
  auto spec = pattern_spec_from_string(pat_str);
  FLASHGPT_CHECK(spec, "{}: the pretokenization pattern is not one this tokenizer reproduces: {}", encoding_name,
                 pat_str);
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
    FLASHGPT_CHECK(!impl->id_valid[id], "{}: special token {} has id {}, which is an ordinary token", encoding_name,
                   text, id);
    impl->id_bytes[id] = {uint32_t(impl->arena.size()), uint32_t(text.size())};
    impl->id_valid[id] = true;
    impl->arena += text;
  }
  std::vector<std::string_view> tokens(rank_bytes.size());
  for (size_t rank = 0; rank < rank_bytes.size(); ++rank)
    if (rank_bytes[rank].second > 0) tokens[rank] = impl->bytes_of(TokenId(rank));
  impl->ranks.build(tokens);
  for (int b = 0; b < 256; ++b) {
    uint8_t byte = uint8_t(b);
    FLASHGPT_CHECK(impl->ranks.find_byte(byte) != kNoRank, "{}: the rank file has no token for the byte 0x{:02X}",
                   encoding_name, b);
  }
  auto eot = std::find_if(impl->specials.begin(), impl->specials.end(),
                          [](const auto& s) { return s.first == "<|endoftext|>"; });
  FLASHGPT_CHECK(eot != impl->specials.end(), "{}: no <|endoftext|> special token", encoding_name);
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

std::vector<TokenId> Tokenizer::encode_ordinary_parallel(std::string_view text, int threads,
                                                         InvalidUtf8 invalid) const {
  std::string storage;
  std::string_view valid = impl_->valid_text(text, invalid, storage);
  int workers = threads_resolve(threads);
  // Cut points: a newline followed by an ASCII letter or digit. No alternative of the three
  // patterns matches across such a pair (newlines only end pieces before a letter or a
  // digit), so a piece ends there and encoding the chunks separately changes nothing.
  constexpr size_t kMinChunk = 1 << 16;
  size_t chunk_target = std::max(kMinChunk, valid.size() / (size_t(workers) * 8) + 1);
  std::vector<size_t> cuts = {0};
  while (cuts.back() < valid.size()) {
    size_t from = cuts.back() + chunk_target, cut = valid.size();
    while (from < valid.size()) {
      size_t newline = valid.find('\n', from);
      if (newline == std::string_view::npos || newline + 1 >= valid.size()) break;
      uint8_t next = static_cast<uint8_t>(valid[newline + 1]);
      bool alnum = (next >= '0' && next <= '9') || ((next | 0x20) >= 'a' && (next | 0x20) <= 'z');
      if (alnum) {
        cut = newline + 1;
        break;
      }
      from = newline + 1;
    }
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

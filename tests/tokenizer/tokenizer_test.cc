// Unit tests of the tokenizer's parts (the two merge
// methods, loading errors, specials, streaming decode, batch/parallel, linear time). The
// id-for-id comparison with tiktoken is compare_tiktoken.py.
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include "common/test_support.h"
#include "tokenizer/bpe.h"
#include "tokenizer/piece_cache.h"
#include "tokenizer/pretokenize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <random>
#include <unordered_map>

namespace flashgpt {
namespace {

// Tests that read the rank files start with FLASHGPT_REQUIRE_TOKENIZER_DIR(): without them
// they skip, naming what is missing (or fail under FLASHGPT_REQUIRE_DATA=1).
std::filesystem::path vocab_dir() {
  auto dir = testing::tokenizer_dir();
  if (!dir) throw Error(testing::kTokenizerMissing);
  return *dir;
}

const Tokenizer& cl100k() {
  static Tokenizer tokenizer = Tokenizer::load("cl100k_base", vocab_dir());
  return tokenizer;
}

// A RankMap over cl100k_base's ordinary tokens, to call the merge methods directly.
const RankMap& cl100k_ranks() {
  static const RankMap ranks = [] {
    std::vector<std::string_view> tokens;
    for (TokenId id = 0; id < 100256; ++id) tokens.push_back(cl100k().token_bytes(id));
    RankMap map;
    map.build(tokens);
    return map;
  }();
  return ranks;
}

using testing::error_of;

TEST(Invalid, EncodeNamesTheOffsetOrReplaces) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  std::string message = error_of([] { cl100k().encode_ordinary("abc\xFF" "def"); });
  EXPECT_NE(message.find("byte offset 3"), std::string::npos) << message;
  auto ids = cl100k().encode_ordinary("abc\xFF" "def", InvalidUtf8::replace);
  EXPECT_EQ(cl100k().decode(ids), "abc\xEF\xBF\xBD" "def");
}

// Random valid UTF-8 for the pretokenizer tests: fragments of every class the block path
// tells apart, and the ones it does not (non-ASCII punctuation and spaces, letters outside
// U+00C0..U+027F, U+00D7, U+0085), some repeated into runs longer than a block.
std::string pretokenizer_text(std::mt19937& rng, size_t target) {
  static const std::string fragments[] = {
      "a", "b", "Z", "s", "t", "re", "RE", "vE", "ll", "d", "M", "e", "x", "0", "7", "123", " ", " ", " ", "  ",
      "\t", "\n", "\r", "\r\n", "\v", "\f", "'", "'", "''", "'s", "'LL", "'Ve", ".", ",", "-", "/", "(", "\xC3\xA9", "\xC3\x89",
      "\xC3\xA0", "\xC3\x97", "\xC3\xB7", "\xC5\xBF", "\xC4\x85", "\xC9\x90", "\xC9\xBF", "\xCA\x80", "\xC7\x85",
      "\xC2\xA0", "\xC2\xAB", "\xC2\xB2", "\xC2\x85", "\xE2\x80\x99", "\xE2\x80\x83", "\xE3\x80\x80", "\xE4\xB8\x96",
      "\xF0\x9F\x99\x82", "\x1C", "\xCC\x81", "\xE0\xA5\xA9"};
  std::string text;
  while (text.size() < target) {
    const std::string& fragment = fragments[rng() % std::size(fragments)];
    size_t repeat = rng() % 16 == 0 ? 1 + rng() % 80 : 1;
    for (size_t k = 0; k < repeat; ++k) text += fragment;
  }
  return text;
}

std::string escaped(std::string_view text) {
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7F && c != '\\') out += char(c);
    else out += "\\x" + std::string(1, "0123456789ABCDEF"[c >> 4]) + "0123456789ABCDEF"[c & 15];
  }
  return out;
}

// The block classes against the byte loop and against the Unicode table, at every offset.
TEST(Pretokenizer, BlockClassesMatchTheTable) {
  const uint8_t* table = unicode::unicode_flag_table();
  std::mt19937 rng(11);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string text = pretokenizer_text(rng, 64 + rng() % 64);
    auto p = reinterpret_cast<const uint8_t*>(text.data());
    for (size_t offset = 0; offset + 64 <= text.size(); ++offset) {
      BlockClasses fast = block_classify(p + offset), slow = block_classify_portable(p + offset);
      ASSERT_EQ(std::memcmp(&fast, &slow, sizeof(fast)), 0) << "trial " << trial << " offset " << offset;
#if defined(__x86_64__)
      if (block_isa_available(BlockIsa::avx2)) {
        BlockClasses wide = block_classify_avx2(p + offset);
        ASSERT_EQ(std::memcmp(&wide, &slow, sizeof(wide)), 0) << "trial " << trial << " offset " << offset;
      }
#endif
      for (int k = 0; k < 64; ++k) {
        uint8_t c = p[offset + k];
        auto has = [&](uint64_t mask) { return (mask >> k & 1) != 0; };
        if (c < 0x80) {
          uint8_t flags = table[c];
          ASSERT_EQ(has(fast.letter), (flags & unicode::kLetter) != 0) << int(c);
          ASSERT_EQ(has(fast.digit), (flags & unicode::kNumber) != 0) << int(c);
          ASSERT_EQ(has(fast.newline) || has(fast.space), (flags & unicode::kSpace) != 0) << int(c);
          ASSERT_EQ(has(fast.newline), c == '\r' || c == '\n');
        } else if (has(fast.latin) && c >= 0xC0 && k < 63) {  // a lead in byte 63 counts unseen
          uint32_t cp = (c & 0x1Fu) << 6 | (p[offset + k + 1] & 0x3Fu);
          ASSERT_TRUE(table[cp] & unicode::kLetter) << cp;
        }
        ASSERT_FALSE((has(fast.letter) || has(fast.digit) || has(fast.space) || has(fast.newline)) && c >= 0x80);
      }
    }
  }
}

// for_each_piece (64 bytes at a time where it can) against the character-at-a-time matcher,
// for every pattern kind and flag and every block classifier this CPU has, on random texts
// of every length around the block size.
TEST(Pretokenizer, BlockPathMatchesTheMatcher) {
  // Where two lists of (begin, end) first differ, with the text around that byte.
  auto difference = [](const std::vector<size_t>& fast, const std::vector<size_t>& slow, std::string_view text) {
    size_t k = 0;
    while (k < fast.size() && k < slow.size() && fast[k] == slow[k]) ++k;
    size_t at = k < slow.size() ? slow[k] : text.size(), from = at < 16 ? 0 : at - 16;
    return "the paths differ at byte " + std::to_string(at) + " (block path: " +
           std::to_string(k < fast.size() ? fast[k] : 0) + "), around \"" + escaped(text.substr(from, at - from)) +
           "|" + escaped(text.substr(at, 16)) + "\"";
  };
  std::mt19937 rng(12);
  for (int trial = 0; trial < 12000; ++trial) {
    static const size_t lengths[] = {0, 1, 63, 64, 65, 127, 128, 129, 1000, 4097};
    size_t target = trial < 10 ? lengths[trial] : rng() % (trial % 10 == 0 ? 3000 : 300);
    std::string text = pretokenizer_text(rng, target);
    for (PatternKind kind : {PatternKind::r50k, PatternKind::cl100k, PatternKind::o200k}) {
      PatternSpec spec{kind, /*contraction_long_s=*/rng() % 2 == 0, /*trailing_space_whole=*/rng() % 2 == 0};
      std::vector<size_t> slow;
      Pretokenizer(spec, text).for_each_piece_scalar([&](size_t begin, size_t end) { slow.insert(slow.end(), {begin, end}); });
      for (BlockIsa isa : {BlockIsa::portable, BlockIsa::sse2, BlockIsa::avx2}) {
        if (!block_isa_available(isa)) continue;
        std::vector<size_t> fast;
        Pretokenizer(spec, text, isa).for_each_piece([&](size_t begin, size_t end) { fast.insert(fast.end(), {begin, end}); });
        ASSERT_TRUE(fast == slow) << "trial " << trial << " kind " << int(kind) << " isa " << int(isa) << " flags "
                                  << spec.contraction_long_s << spec.trailing_space_whole << ": "
                                  << difference(fast, slow, text);
      }
    }
  }
}

TEST(Load, ReportsUnknownMissingAndWrongFiles) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  EXPECT_NE(error_of([] { Tokenizer::load("no_such_base", vocab_dir()); }).find("unknown encoding"), std::string::npos);
  auto empty = std::filesystem::temp_directory_path() / "flashgpt_tokenizer_test_empty";
  std::filesystem::create_directories(empty);
  ::setenv("FLASHGPT_CACHE_DIR", empty.c_str(), 1);
  ::setenv("TIKTOKEN_CACHE_DIR", empty.c_str(), 1);
  ::setenv("FLASHGPT_OFFLINE", "1", 1);  // CI has network: the file must stay missing
  std::string missing = error_of([&] { Tokenizer::load("cl100k_base", empty); });
  EXPECT_NE(missing.find("missing"), std::string::npos) << missing;
  EXPECT_NE(missing.find((empty / "cl100k_base.tiktoken").string()), std::string::npos) << missing;

  auto wrong = std::filesystem::temp_directory_path() / "flashgpt_tokenizer_test_wrong";
  std::filesystem::create_directories(wrong);
  {
    std::ifstream in(vocab_dir() / "r50k_base.tiktoken", std::ios::binary);
    std::string contents((std::istreambuf_iterator<char>(in)), {});
    contents[10] ^= 1;
    std::ofstream(wrong / "r50k_base.tiktoken", std::ios::binary) << contents;
  }
  std::string bad = error_of([&] { Tokenizer::load("r50k_base", wrong); });
  EXPECT_NE(bad.find("sha256"), std::string::npos) << bad;
  EXPECT_NE(bad.find("306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"), std::string::npos) << bad;
  ::unsetenv("FLASHGPT_CACHE_DIR");
  ::unsetenv("TIKTOKEN_CACHE_DIR");
  ::unsetenv("FLASHGPT_OFFLINE");
}

// A rank file of the 256 bytes (ranks 0..255) and `extra` lines after them.
std::string rank_file_with(std::string_view extra) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (int b = 0; b < 256; ++b)
    out += fmt::format("{}{}== {}\n", kAlphabet[b >> 2], kAlphabet[(b & 3) << 4], b);
  return out + std::string(extra);
}

std::string meta_with(std::string_view specials) {
  return fmt::format(R"({{"pat_str": "{}", "special_tokens": {}}})", "'s|'t|'re|'ve|'m|'ll|'d| ?\\\\p{L}+| ?\\\\p{N}+| ?[^\\\\s\\\\p{L}\\\\p{N}]+|\\\\s+(?!\\\\S)|\\\\s+", specials);
}

TEST(Load, MalformedRankLinesNameTheFileAndLine) {
  EXPECT_NO_THROW(Tokenizer::from_text("r50k_base", rank_file_with("dGg= 256\n"), "x.tiktoken"));
  const std::pair<std::string, std::string> cases[] = {
      {"dGg=256\n", "line 257: expected '<base64 bytes> <rank>'"},
      {"dGg= 256\r\n", "line 257: the rank '256\r' is not a whole number"},
      {"dGg= -1\n", "line 257: the rank '-1' is not a whole number"},
      {"dGg= 99999999999\n", "line 257: the rank '99999999999' is not a whole number"},
      {"dGg= 16777215\n", "line 257: the rank 16777215 is not below the number of tokens in the file (257)"},
      {"dG@= 256\n", "line 257: 'dG@=' is not the base64 of one or more bytes"},
      {"= 256\n", "line 257: '=' is not the base64"},
      {"dGg=xx 256\n", "line 257: 'dGg=xx' is not the base64"},
      {"dGg= 255\n", "line 257: rank 255 appears twice (first on line 256)"},
      {"QQ== 256\n", "the token of rank 256 twice"},
  };
  for (const auto& [extra, expected] : cases) {
    std::string message = error_of([&] { Tokenizer::from_text("r50k_base", rank_file_with(extra), "x.tiktoken"); });
    EXPECT_NE(message.find("x.tiktoken"), std::string::npos) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
  }
  std::string empty = error_of([] { Tokenizer::from_text("r50k_base", "", "x.tiktoken"); });
  EXPECT_NE(empty.find("x.tiktoken: no ranks"), std::string::npos) << empty;
}

TEST(Load, BadSpecialTokensInMetaJsonAreErrors) {
  auto load = [](std::string_view specials) {
    return error_of([&] { Tokenizer::from_text("r50k_base", rank_file_with(""), "x.tiktoken", meta_with(specials), "x.meta.json"); });
  };
  EXPECT_EQ(load(R"({"<|endoftext|>": 256})"), "");
  // Once an encode() that never ended, and a bad_alloc: now each an error naming the problem.
  EXPECT_NE(load(R"({"": 257, "<|endoftext|>": 256})").find("x.meta.json: a special token is the empty string"),
            std::string::npos);
  EXPECT_NE(load(R"({"<|endoftext|>": -1})").find("x.meta.json: special token <|endoftext|> has the id -1, outside"),
            std::string::npos);
  EXPECT_NE(load(R"({"<|endoftext|>": 4000000000})").find("has the id 4000000000, outside 0 to 16777215"),
            std::string::npos);
  EXPECT_NE(load(R"({"<|endoftext|>": 256, "<|x|>": 256})").find("special tokens <|endoftext|> and <|x|> both have the id 256"),
            std::string::npos);
  EXPECT_NE(load(R"({"<|endoftext|>": 1.5})").find("has the id 1.5, not a whole number"), std::string::npos);
  EXPECT_NE(load(R"({"<|endoftext|>": 65})").find("which x.tiktoken gives to an ordinary token"), std::string::npos);
  EXPECT_NE(load("[]").find("special_tokens is missing or not an object"), std::string::npos);
  EXPECT_NE(load("{}").find("x.meta.json: no <|endoftext|> special token"), std::string::npos);
  std::string broken = error_of(
      [] { Tokenizer::from_text("r50k_base", rank_file_with(""), "x.tiktoken", "{\"pat_str\": ", "x.meta.json"); });
  EXPECT_NE(broken.find("x.meta.json: not valid JSON"), std::string::npos) << broken;
}

TEST(Load, DirectoriesWhereFilesBelongAreErrors) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  auto dir = std::filesystem::temp_directory_path() / "flashgpt_tokenizer_test_dirs";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "r50k_base.tiktoken");
  std::string message = error_of([&] { Tokenizer::load("r50k_base", dir); });
  EXPECT_NE(message.find("r50k_base.tiktoken is a directory, not a file"), std::string::npos) << message;
  std::filesystem::remove_all(dir);
}

TEST(Threads, ZeroIsAllCoresAndAbsurdCountsAreErrors) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  std::string_view text = "hello world";
  auto expected = t.encode_ordinary(text);
  EXPECT_EQ(t.encode_ordinary_parallel(text, 0), expected);
  EXPECT_EQ(t.encode_ordinary_batch(std::span(&text, 1), 0)[0], expected);
  for (int threads : {-1, -1000, kMaxEncodeThreads + 1, 100000}) {
    std::string message = error_of([&] { t.encode_ordinary_parallel(text, threads); });
    EXPECT_NE(message.find(fmt::format("got {}", threads)), std::string::npos) << message;
    message = error_of([&] { t.encode_ordinary_batch(std::span(&text, 1), threads); });
    EXPECT_NE(message.find(fmt::format("got {}", threads)), std::string::npos) << message;
  }
}

TEST(TokenIds, ParseNamesTheBadValue) {
  EXPECT_EQ(token_ids_parse("1 2,3\n\t4294967295\r\n", TokenIdFormat::text), (std::vector<TokenId>{1, 2, 3, 4294967295u}));
  EXPECT_EQ(token_ids_parse(std::string("\x01\x00\x00\x00\xff\xff\xff\xff", 8), TokenIdFormat::u32),
            (std::vector<TokenId>{1, 4294967295u}));
  auto parse_error = [](std::string_view text) { return error_of([&] { token_ids_parse(text, TokenIdFormat::text); }); };
  EXPECT_NE(parse_error("7 4294967296").find("the token id 4294967296 at byte 2 of the input does not fit in 32 bits"),
            std::string::npos);
  EXPECT_NE(parse_error("-1").find("got '-1'"), std::string::npos);
  EXPECT_NE(parse_error("1.5 2").find("got '1.5'"), std::string::npos);
  EXPECT_NE(parse_error("12abc").find("got '12abc'"), std::string::npos);
  EXPECT_NE(error_of([] { token_ids_parse("abc", TokenIdFormat::u32); }).find("3 bytes, not a multiple of 4"),
            std::string::npos);
  std::vector<TokenId> ids = {0, 7, 100257, 4294967295u};
  for (auto format : {TokenIdFormat::text, TokenIdFormat::u32})
    EXPECT_EQ(token_ids_parse(token_ids_format(ids, format), format), ids);
}

TEST(Load, VocabularySizesAndSpecials) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  auto r50k = Tokenizer::load("r50k_base", vocab_dir());
  auto o200k = Tokenizer::load("o200k_base", vocab_dir());
  EXPECT_EQ(r50k.vocab_size(), 50257u);
  EXPECT_EQ(cl100k().vocab_size(), 100277u);
  EXPECT_EQ(o200k.vocab_size(), 200019u);
  EXPECT_EQ(r50k.end_of_text(), 50256u);
  EXPECT_EQ(cl100k().end_of_text(), 100257u);
  EXPECT_EQ(o200k.end_of_text(), 199999u);
  EXPECT_EQ(cl100k().special_token("<|fim_middle|>"), 100259u);
  EXPECT_FALSE(cl100k().special_token("<|nope|>"));
  EXPECT_EQ(cl100k().decode(std::vector<TokenId>{100257}), "<|endoftext|>");
  EXPECT_THROW(cl100k().decode(std::vector<TokenId>{100261}), Error);  // a gap in cl100k's ids
  EXPECT_THROW(cl100k().decode(std::vector<TokenId>{100277}), Error);
}

TEST(Specials, FollowTiktokenSemantics) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  std::string text = "a<|endoftext|>b<|fim_prefix|>";
  std::string message = error_of([&] { t.encode(text); });
  EXPECT_NE(message.find("<|endoftext|>"), std::string::npos) << message;
  auto all = t.encode(text, SpecialTokenPolicy{.allow_all = true, .allowed = {}});
  EXPECT_EQ(std::count(all.begin(), all.end(), 100257u), 1);
  EXPECT_EQ(all.back(), 100258u);
  // Allowing one: the other is still disallowed (tiktoken's disallowed_special="all").
  message = error_of([&] { t.encode(text, SpecialTokenPolicy{.allowed = {"<|endoftext|>"}}); });
  EXPECT_NE(message.find("<|fim_prefix|>"), std::string::npos) << message;
  // Not disallowed: encoded as ordinary text.
  auto plain = t.encode(text, SpecialTokenPolicy{.allowed = {"<|endoftext|>"}, .disallow_all_others = false});
  std::vector<TokenId> expected = t.encode_ordinary("a");
  expected.push_back(100257);
  auto rest = t.encode_ordinary("b<|fim_prefix|>");
  expected.insert(expected.end(), rest.begin(), rest.end());
  EXPECT_EQ(plain, expected);
}

TEST(Bpe, HeapMergesExactlyLikeTheScan) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  const RankMap& ranks = cl100k_ranks();
  std::mt19937 rng(42);
  const std::string alphabets[] = {"abcdefghijklmnopqrstuvwxyz", "aeiou", "ab", "a", " \n\t.,'0123456789e",
                                   "\xC3\xA9\xE4\xB8\x96\xF0\x9F\x99\x82"};
  for (int trial = 0; trial < 400; ++trial) {
    const std::string& alphabet = alphabets[trial % 6];
    size_t length = 2 + rng() % (trial < 300 ? 60 : 3000);
    std::string piece;
    for (size_t i = 0; i < length; ++i) piece += alphabet[rng() % alphabet.size()];
    std::vector<TokenId> scan, heap;
    bpe_encode_piece(ranks, piece, scan, BpeMethod::scan);
    bpe_encode_piece(ranks, piece, heap, BpeMethod::heap);
    ASSERT_EQ(scan, heap) << "piece: " << piece;
    ASSERT_EQ(t.decode(heap), piece);
  }
}

// One set of the piece cache: a piece is found only with all its 16 bytes and its length
// (pieces of NUL bytes differ in nothing else), ids keep their 24 bits, and a third piece
// evicts the oldest of two.
TEST(PieceCache, SetKeepsTwoPiecesExactly) {
  PieceCache::Set set{};
  const uint64_t head = 0x6c616e7265746e69, tail_a = 0x61, tail_b = 0x62;
  EXPECT_EQ(PieceCache::find(set, 0, 0, 1), nullptr) << "an empty entry matched";
  const TokenId ids_a[] = {1, (1u << 24) - 1, 65536, 255, 256};
  const TokenId ids_b[] = {7, 70000};
  PieceCache::insert(set, head, tail_a, 9, ids_a, 5);
  PieceCache::insert(set, head, tail_b, 9, ids_b, 2);
  auto ids_of = [](const PieceCache::Entry* e) {
    std::vector<TokenId> ids;
    for (size_t i = 0; e && i < e->count(); ++i) ids.push_back(e->id(i));
    return ids;
  };
  EXPECT_EQ(ids_of(PieceCache::find(set, head, tail_a, 9)), std::vector<TokenId>(ids_a, ids_a + 5));
  EXPECT_EQ(ids_of(PieceCache::find(set, head, tail_b, 9)), std::vector<TokenId>(ids_b, ids_b + 2));
  EXPECT_EQ(PieceCache::find(set, head, tail_a, 10), nullptr) << "same bytes, other length";
  EXPECT_EQ(PieceCache::find(set, head, tail_a | 0x100, 10), nullptr);
  EXPECT_EQ(PieceCache::find(set, head ^ 1, tail_a, 9), nullptr);
  const TokenId ids_c[] = {3};
  PieceCache::insert(set, 0, 0, 16, ids_c, 1);  // sixteen NUL bytes
  EXPECT_EQ(PieceCache::find(set, head, tail_a, 9), nullptr) << "the oldest piece was not evicted";
  EXPECT_EQ(ids_of(PieceCache::find(set, head, tail_b, 9)), std::vector<TokenId>(ids_b, ids_b + 2));
  EXPECT_EQ(ids_of(PieceCache::find(set, 0, 0, 16)), std::vector<TokenId>{3});
  EXPECT_EQ(PieceCache::find(set, 0, 0, 15), nullptr) << "fifteen NUL bytes found sixteen";
}

// The per-thread piece cache against merging every piece afresh: 100k distinct words (more
// than the cache holds, so sets evict), each three times in random order, many of them
// sharing their first 8 bytes and their length (a compare that skipped bytes 8..15 would
// mix them up), some over 16 bytes or of more than 5 ids (not cached), then the same text
// again with the cache warm.
TEST(PieceCache, HitsGiveTheIdsOfAFreshMerge) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  const RankMap& ranks = cl100k_ranks();
  std::mt19937 rng(11);
  const std::vector<std::string> letters[] = {
      {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v",
       "w", "x", "y", "z"},
      {"b", "c", "d", "f", "g", "k", "p", "q", "v", "x", "z"},
      {"\xC3\xA9", "\xC3\xBC", "\xC3\x9F", "a", "e"},
      {"\xE4\xB8\x96", "\xE7\x95\x8C", "a"}};
  std::vector<std::string> words;
  std::unordered_map<std::string, bool> seen;
  while (words.size() < 100000) {
    int family = int(rng() % 5);
    std::string word = " ";
    if (family == 4) {  // 16 bytes in all, the first 8 shared
      word += "interna";
      while (word.size() < 16) word += letters[0][rng() % 26];
    } else {
      size_t length = 1 + rng() % 20;
      for (size_t i = 0; i < length; ++i) word += letters[family][rng() % letters[family].size()];
    }
    if (!seen.emplace(word, true).second) continue;
    words.push_back(word);
  }
  std::vector<size_t> order;
  for (size_t i = 0; i < words.size(); ++i) order.insert(order.end(), {i, i, i});
  std::shuffle(order.begin(), order.end(), rng);
  std::string text;
  std::vector<TokenId> expected;
  for (size_t i : order) {
    text += words[i];
    if (uint32_t rank = ranks.find(reinterpret_cast<const uint8_t*>(words[i].data()), words[i].size()); rank != kNoRank)
      expected.push_back(rank);
    else
      bpe_encode_piece(ranks, words[i], expected, BpeMethod::scan);
  }
  EXPECT_EQ(t.encode_ordinary(text), expected);
  EXPECT_EQ(t.encode_ordinary(text), expected);
}

// The rank map against std::unordered_map: every token, and near misses that share a
// token's first 8 or 16 bytes (the parts a slot and its tail keep) and differ after them.
TEST(Bpe, RankMapFindsExactlyTheTokens) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  std::vector<std::string_view> tokens;
  std::unordered_map<std::string_view, uint32_t> reference;
  for (TokenId id = 0; id < 100256; ++id) {
    tokens.push_back(t.token_bytes(id));
    reference.emplace(tokens.back(), id);
  }
  RankMap ranks;
  ranks.build(tokens);
  auto find = [&](const std::string& key) { return ranks.find(reinterpret_cast<const uint8_t*>(key.data()), key.size()); };
  auto expected = [&](const std::string& key) {
    auto it = reference.find(key);
    return it == reference.end() ? kNoRank : it->second;
  };
  size_t long_tokens = 0;
  for (TokenId id = 0; id < 100256; ++id) {
    std::string token(tokens[id]);
    ASSERT_EQ(find(token), id) << "token " << id;
    if (token.size() <= 8) continue;
    ++long_tokens;
    for (size_t at : {size_t(8), token.size() / 2, token.size() - 1, std::min<size_t>(16, token.size() - 1)}) {
      std::string changed = token;
      changed[at] = char(changed[at] ^ 0x01);
      ASSERT_EQ(find(changed), expected(changed)) << "token " << id << " with byte " << at << " changed";
    }
    std::string shorter = token.substr(0, token.size() - 1), longer = token + "e";
    ASSERT_EQ(find(shorter), expected(shorter)) << "token " << id << " less its last byte";
    ASSERT_EQ(find(longer), expected(longer)) << "token " << id << " and 'e'";
  }
  EXPECT_GT(long_tokens, 10000u);
}

// The rank map against std::unordered_map on made-up vocabularies: keys of the lengths where
// the slot (8 bytes), the tail (16) and the long-length mark (255) end, keys that share
// those parts, zero bytes, maps of 16 slots (probes wrap around) and larger; queried with
// every key and near misses (one byte changed, one byte less or more).
TEST(Bpe, RankMapMatchesUnorderedMap) {
  std::mt19937 rng(5);
  const size_t lengths[] = {1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 254, 255, 256, 300, 1000};
  for (size_t vocab : {1, 3, 12, 13, 16, 17, 100, 5000, 40000}) {
    std::vector<std::string> keys;
    std::unordered_map<std::string, uint32_t> reference;
    while (keys.size() < vocab) {
      size_t length = lengths[rng() % std::size(lengths)];
      std::string key;
      if (rng() % 4 == 0) {  // the same first 8 or 16 bytes as many others, so that probes meet them
        length = 9 + rng() % 16;
        key = std::string(length < 17 ? 8 : 16, 'h');
        while (key.size() < length) key += char('a' + rng() % 3);
      } else if (!keys.empty() && rng() % 2) {  // shares a prefix with an earlier key, differs later
        key = keys[rng() % keys.size()].substr(0, length);
        key.resize(length, 'x');
        key[rng() % length] = char(rng() % 4);
      } else {
        for (size_t i = 0; i < length; ++i) key += char(rng() % 3 == 0 ? 0 : 'a' + rng() % 4);
      }
      if (reference.emplace(key, uint32_t(keys.size())).second) keys.push_back(key);
    }
    std::vector<std::string_view> tokens(keys.begin(), keys.end());
    RankMap ranks;
    ranks.build(tokens);
    auto check = [&](const std::string& key) {
      auto it = reference.find(key);
      uint32_t expected = it == reference.end() ? kNoRank : it->second;
      ASSERT_EQ(ranks.find(reinterpret_cast<const uint8_t*>(key.data()), key.size()), expected)
          << "vocabulary of " << vocab << ", key of " << key.size() << " bytes";
    };
    for (const std::string& key : keys) {
      check(key);
      for (size_t at : {size_t(0), size_t(7), size_t(8), size_t(15), size_t(16), key.size() - 1}) {
        if (at >= key.size()) continue;
        std::string changed = key;
        changed[at] = char(changed[at] ^ 0x01);
        check(changed);
      }
      check(key.substr(0, key.size() - 1));
      check(key + "a");
      check(key + '\0');
    }
  }
}

TEST(Bpe, LongPiecesTakeLinearishTime) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  std::mt19937 rng(7);
  std::string same(50000, 'a'), random_letters;
  for (int i = 0; i < 50000; ++i) random_letters += char('a' + rng() % 26);
  for (const std::string* text : {&same, &random_letters}) {
    auto t0 = std::chrono::steady_clock::now();
    auto ids = t.encode_ordinary(*text);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(t.decode(ids), *text);
    // tiktoken's O(n^2) merge takes many seconds here; ours takes milliseconds (seconds
    // under the sanitizers at most).
    EXPECT_LT(seconds, 5.0);
  }
}

TEST(StreamingDecoder, HoldsBackIncompleteCharacters) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  // Single-byte tokens of a 4-byte emoji: nothing comes out until the last byte.
  std::string emoji = "\xF0\x9F\x99\x82";
  std::vector<TokenId> bytes;
  for (char c : emoji) {
    for (TokenId id = 0; id < 100256; ++id) {
      if (t.token_bytes(id) == std::string_view(&c, 1)) {
        bytes.push_back(id);
        break;
      }
    }
  }
  ASSERT_EQ(bytes.size(), 4u);
  StreamingDecoder decoder(t);
  EXPECT_EQ(decoder.push(bytes[0]), "");
  EXPECT_EQ(decoder.push(bytes[1]), "");
  EXPECT_EQ(decoder.push(bytes[2]), "");
  EXPECT_EQ(decoder.push(bytes[3]), emoji);
  // An incomplete tail at the end becomes U+FFFD; a byte that cannot start a character
  // is replaced at once.
  EXPECT_EQ(decoder.push(bytes[0]), "");
  EXPECT_EQ(decoder.finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(decoder.push(bytes[2]), "\xEF\xBF\xBD");
  // Token by token over mixed text: every chunk is valid UTF-8, and they add up.
  std::string text = "h\xC3\xA9llo \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 \xE4\xB8\x96\xE7\x95\x8C!";
  StreamingDecoder stream(t);
  std::string joined;
  for (TokenId id : t.encode_ordinary(text)) {
    std::string chunk = stream.push(id);
    EXPECT_EQ(unicode::utf8_find_invalid(chunk), chunk.size());
    joined += chunk;
  }
  joined += stream.finish();
  EXPECT_EQ(joined, text);
}

TEST(Parallel, BatchAndParallelMatchSingleThread) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = cl100k();
  std::mt19937 rng(3);
  const char* words[] = {"the ", "cat's ", "Größe ", "\n", "\r\n", "  ", "123456 ", "naïve\n", "\xF0\x9F\x99\x82 ", "x"};
  std::string big;
  while (big.size() < 600000) big += words[rng() % 10];
  auto single = t.encode_ordinary(big);
  for (int threads : {1, 2, 3, 8}) EXPECT_EQ(t.encode_ordinary_parallel(big, threads), single) << threads;
  std::vector<std::string> docs;
  for (size_t i = 0; i < big.size();) {  // documents of ~5000 bytes, cut after a newline
    size_t end = big.find('\n', i + 5000);
    end = end == std::string::npos ? big.size() : end + 1;
    docs.push_back(big.substr(i, end - i));
    i = end;
  }
  std::vector<std::string_view> views(docs.begin(), docs.end());
  auto one = t.encode_ordinary_batch(views, 1);
  auto many = t.encode_ordinary_batch(views, 4);
  ASSERT_EQ(one.size(), docs.size());
  EXPECT_EQ(one, many);
  for (size_t i = 0; i < docs.size(); i += 17) EXPECT_EQ(one[i], t.encode_ordinary(docs[i]));
}

}  // namespace
}  // namespace flashgpt

// Seeded random fuzzing of the tokenizer's inputs, run as an ordinary test. Each target
// first replays every file under fuzz_regressions/<target>/ (inputs that once crashed, hung
// or gave wrong ids: keep every new one there), then mutates its seeds for
// FLASHGPT_FUZZ_SECONDS (default 1) from FLASHGPT_FUZZ_SEED (default 1; a failure prints
// the input). The contract: every input either works, and then round-trips, or throws
// flashgpt::Error naming the problem; never another exception, a crash or a hang (CI runs
// this under ASan/UBSan too). Longer runs: FLASHGPT_FUZZ_SECONDS=600 FLASHGPT_FUZZ_SEED=$RANDOM.
//   id_decoder: token_ids_parse (text and u32), decode and the streaming decoder
//   rank_file:  the rank-file parser of Tokenizer::from_text
//   meta_json:  the meta.json parser of Tokenizer::from_text
//   parallel:   encode_ordinary_parallel (1..16 threads, tiny chunks) against encode_ordinary
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>
#include <flashgpt/unicode.h>

#include "common/test_support.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/seam_documents.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <random>

namespace flashgpt {
namespace {

using Rng = std::mt19937_64;

double fuzz_seconds() {
  const char* env = std::getenv("FLASHGPT_FUZZ_SECONDS");
  return env && *env ? std::atof(env) : 1.0;
}

uint64_t fuzz_seed() {
  const char* env = std::getenv("FLASHGPT_FUZZ_SEED");
  return env && *env ? std::strtoull(env, nullptr, 10) : 1;
}

std::string file_read(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string printable(std::string_view input) { return ::testing::PrintToString(std::string(input.substr(0, 600))); }

// Replays the target's regression inputs, then fuzzes: `one` gets an input and an rng.
void fuzz_run(const std::string& target, const std::function<std::string(Rng&)>& generate,
              const std::function<void(const std::string&, Rng&)>& one) {
  auto dir = testing::source_dir() / "tests" / "tokenizer" / "fuzz_regressions" / target;
  size_t replayed = 0;
  if (std::filesystem::is_directory(dir)) {
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      std::string input = file_read(entry.path());
      Rng rng(fuzz_seed());
      SCOPED_TRACE("regression input " + entry.path().string());
      one(input, rng);
      ++replayed;
    }
  }
  Rng rng(fuzz_seed());
  auto start = std::chrono::steady_clock::now();
  size_t runs = 0;
  for (; runs < 20 || std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < fuzz_seconds();
       ++runs) {
    std::string input = generate(rng);
    SCOPED_TRACE("fuzz input " + printable(input));
    one(input, rng);
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("%s: %zu regression inputs, %zu fuzz inputs (seed %llu)\n", target.c_str(), replayed, runs,
              static_cast<unsigned long long>(fuzz_seed()));
}

// Calls f; an Error is a good answer to bad input, anything else escaping is a failure.
template <class F>
bool works(F&& f, std::string* message = nullptr) {
  try {
    f();
    return true;
  } catch (const Error& e) {
    EXPECT_GT(std::string_view(e.what()).size(), 10u) << "an error must say what is wrong";
    if (message) *message = e.what();
    return false;
  }
}

// Byte-level mutations: flip, insert, delete, duplicate a span, splice in a token.
std::string mutate(std::string s, Rng& rng, const std::vector<std::string>& tokens) {
  int count = 1 + int(rng() % 4);
  for (int k = 0; k < count; ++k) {
    size_t at = s.empty() ? 0 : rng() % (s.size() + 1);
    switch (rng() % 6) {
      case 0:
        if (at < s.size()) s[at] = char(rng());
        break;
      case 1:
        s.insert(at, 1, char(rng()));
        break;
      case 2:
        if (at < s.size()) s.erase(at, 1 + rng() % 8);
        break;
      case 3:
        if (at < s.size()) s.insert(at, s.substr(at, 1 + rng() % 16));
        break;
      default:
        s.insert(at, tokens[rng() % tokens.size()]);
        break;
    }
  }
  return s;
}

std::string base64(std::string_view bytes) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < bytes.size(); i += 3) {
    uint32_t v = uint32_t(uint8_t(bytes[i])) << 16;
    if (i + 1 < bytes.size()) v |= uint32_t(uint8_t(bytes[i + 1])) << 8;
    if (i + 2 < bytes.size()) v |= uint8_t(bytes[i + 2]);
    out += kAlphabet[v >> 18 & 63];
    out += kAlphabet[v >> 12 & 63];
    out += i + 1 < bytes.size() ? kAlphabet[v >> 6 & 63] : '=';
    out += i + 2 < bytes.size() ? kAlphabet[v & 63] : '=';
  }
  return out;
}

// A small valid rank file: the 256 bytes, then a few merges (269 tokens).
const std::string& small_rank_file() {
  static const std::string text = [] {
    std::string out;
    TokenId rank = 0;
    auto add = [&](std::string_view bytes) { out += base64(bytes) + " " + std::to_string(rank++) + "\n"; };
    for (int b = 0; b < 256; ++b) add(std::string(1, char(b)));
    for (const char* merge : {"th", "he", "the", " t", " the", "in", "er", "an", "re", "on", " a", "\xC3\xA9", "\xC3\xA9t"})
      add(merge);
    return out;
  }();
  return text;
}

// A meta.json with r50k_base's pattern and these special tokens (a JSON object's text).
std::string small_meta(std::string_view specials_json) {
  return fmt::format(R"({{"pat_str": {}, "special_tokens": {}}})",
                     nlohmann::json(std::string(*pattern_builtin("r50k_base"))).dump(), specials_json);
}

const Tokenizer& real_tokenizer(int which) {
  static const std::string names[] = {"r50k_base", "cl100k_base", "o200k_base"};
  static std::map<int, Tokenizer> loaded;
  auto it = loaded.find(which);
  if (it == loaded.end()) {
    auto dir = testing::tokenizer_dir();
    if (!dir) throw std::runtime_error("no tokenizer rank files: set FLASHGPT_TOKENIZER_DIR");
    it = loaded.emplace(which, Tokenizer::load(names[which], *dir)).first;
  }
  return it->second;
}

// What a working tokenizer must do with a short text: decode(encode(x)) == x, specials too.
void tokenizer_round_trips(const Tokenizer& t, Rng& rng) {
  static const char* const kWords[] = {"the", " the", "\xC3\xA9t\xC3\xA9", " ", "\n\n", "12", "'s", "!", "th", "a"};
  std::string text;
  for (int i = 0, n = int(rng() % 12); i < n; ++i) text += kWords[rng() % std::size(kWords)];
  auto specials = t.special_tokens();
  if (!specials.empty()) text += specials[rng() % specials.size()];
  auto ids = t.encode(text, SpecialTokenPolicy{.allow_all = true, .allowed = {}});
  EXPECT_EQ(t.decode(ids), text);
  for (const auto& special : specials) EXPECT_EQ(t.decode(std::vector<TokenId>{*t.special_token(special)}), special);
}

TEST(Fuzz, IdDecoder) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const Tokenizer& t = real_tokenizer(1);
  const std::vector<std::string> tokens = {"0",    "15339", " ",         ",",          "\n",    "\r\n", "100257",
                                           "-1",   "+7",    "4294967295", "4294967296", "1e3",   "0x10", "1.5",
                                           "\t\t", "007",   "99999999999999999999999",  std::string(1, '\0')};
  auto generate = [&](Rng& rng) {
    std::string seed = rng() % 2 ? "15339 1917\n100257,100277 0\n" : std::string("\x0b\x3c\x00\x00\xff\xff\xff\xff", 8);
    return mutate(seed, rng, tokens);
  };
  fuzz_run("id_decoder", generate, [&](const std::string& input, Rng&) {
    for (TokenIdFormat format : {TokenIdFormat::text, TokenIdFormat::u32}) {
      std::vector<TokenId> ids;
      if (!works([&] { ids = token_ids_parse(input, format); })) continue;
      EXPECT_EQ(token_ids_parse(token_ids_format(ids, format), format), ids);
      std::string decoded;
      if (!works([&] { decoded = t.decode(ids); })) continue;
      StreamingDecoder stream(t);
      std::string streamed;
      for (TokenId id : ids) streamed += stream.push(id);
      streamed += stream.finish();
      EXPECT_EQ(streamed, unicode::utf8_replace_invalid(decoded));
    }
  });
}

TEST(Fuzz, RankFile) {
  const std::vector<std::string> tokens = {"\n", " ", "\r", "=", "==", "QQ==", "YWI=", " 0", " 1", " 300",
                                           " -1", " 16777215", " 4294967296", " 1.5", "  ", "\n\n", "@", "\xC3\xA9"};
  auto generate = [&](Rng& rng) { return mutate(small_rank_file(), rng, tokens); };
  fuzz_run("rank_file", generate, [&](const std::string& input, Rng& rng) {
    std::string message;
    std::optional<Tokenizer> t;
    if (works([&] { t.emplace(Tokenizer::from_text("r50k_base", input, "fuzz.tiktoken")); }, &message)) {
      tokenizer_round_trips(*t, rng);
    } else {
      EXPECT_NE(message.find("fuzz.tiktoken"), std::string::npos) << message;  // names the file
    }
  });
}

TEST(Fuzz, MetaJson) {
  const std::vector<std::string> tokens = {R"("")",  "-1", "0",   "255", "269", "300",  "1e10", "1.5", "null", "[]",
                                           "{}",     ",",  ":",   "\"",  "}",   "4294967296", R"("<|endoftext|>")",
                                           R"("<|x|>": 300)", R"("pat_str")", R"("special_tokens")"};
  auto generate = [&](Rng& rng) {
    // Either a structured random set of specials or a byte-mutated valid file.
    static const char* const kNames[] = {"<|endoftext|>", "<|x|>", "", "e", "the", "<|endoftext|>"};
    static const char* const kIds[] = {"269", "270", "300", "0", "-1", "1.5", "\"7\"", "100000", "16777216", "269"};
    std::string specials = "{";
    for (int i = 0, n = int(rng() % 4); i < n; ++i)
      specials += fmt::format(R"({}"{}": {})", i ? ", " : "", kNames[rng() % std::size(kNames)], kIds[rng() % std::size(kIds)]);
    specials += "}";
    std::string meta = small_meta(specials);
    return rng() % 2 ? meta : mutate(small_meta(R"({"<|endoftext|>": 300})"), rng, tokens);
  };
  fuzz_run("meta_json", generate, [&](const std::string& input, Rng& rng) {
    std::string message;
    std::optional<Tokenizer> t;
    if (works([&] { t.emplace(Tokenizer::from_text("r50k_base", small_rank_file(), "fuzz.tiktoken", input, "fuzz.meta.json")); },
              &message)) {
      tokenizer_round_trips(*t, rng);
    } else {
      EXPECT_NE(message.find("fuzz."), std::string::npos) << message;  // names the file
    }
  });
}

TEST(Fuzz, ParallelEqualsSerial) {
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const std::vector<std::string> tokens = {"\n\n", "\r\n", "  ", "\t", "x", "1", "\xC3\xA9", "'s", ".", "\xE2\x80\x83"};
  auto generate = [&](Rng& rng) {
    std::string text = testing::seam_document(rng, 300);
    return rng() % 4 ? text : mutate(text, rng, tokens);  // mutations may leave invalid UTF-8
  };
  fuzz_run("parallel", generate, [&](const std::string& input, Rng& rng) {
    for (int which = 0; which < 3; ++which) {
      const Tokenizer& t = real_tokenizer(which);
      auto serial = t.encode_ordinary(input, InvalidUtf8::replace);
      int threads = 1 + int(rng() % 16);
      size_t chunk = 1 + rng() % 24;
      EXPECT_EQ(t.encode_ordinary_parallel(input, threads, InvalidUtf8::replace, chunk), serial)
          << t.name() << ", threads " << threads << ", chunk_bytes " << chunk;
    }
  });
}

}  // namespace
}  // namespace flashgpt

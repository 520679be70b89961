// The C++ half of the comparison with tiktoken (compare_tiktoken.py is the other half).
// Reads DIR/manifest.json = [{"file": NAME, "mode": MODE}, ...], encodes each file with the
// API and writes DIR/NAME.ENCODING.ids (little-endian u32) plus DIR/results.ENCODING.json
// with, per case, the error message (if encoding threw) and the self-checks that failed:
// decode(encode(x)) == x, streaming decode, parallel (1 to 16 threads, small chunks) and
// batch encoding agreeing with encode_ordinary, and the scan and heap merges agreeing on every piece.
//   modes: ordinary | replace (invalid UTF-8 as U+FFFD) | special_all | special_none
//          (encode() with every special allowed / none allowed, tiktoken's defaults)
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

namespace {

std::string file_read(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  FLASHGPT_CHECK(in, "cannot open {}", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return std::move(buffer).str();
}

std::vector<std::string> self_checks(const flashgpt::Tokenizer& tokenizer, const std::string& text,
                                     const std::vector<flashgpt::TokenId>& ids, const std::string& mode,
                                     int case_index) {
  using flashgpt::InvalidUtf8;
  std::vector<std::string> failed;
  std::string expected_text = text;
  if (mode == "replace") expected_text = tokenizer.decode(tokenizer.encode_ordinary(text, InvalidUtf8::replace));
  if (tokenizer.decode(ids) != expected_text && mode != "replace") failed.push_back("decode(encode(x)) != x");
  flashgpt::StreamingDecoder stream(tokenizer);
  std::string streamed;
  for (auto id : ids) streamed += stream.push(id);
  streamed += stream.finish();
  if (streamed != expected_text) failed.push_back("streaming decode != x");
  if (mode == "ordinary" || mode == "replace") {
    InvalidUtf8 invalid = mode == "replace" ? InvalidUtf8::replace : InvalidUtf8::error;
    // The default chunks, and chunks forced small so that seams fall everywhere, on 1 to 16
    // threads (chosen by the case number).
    const bool small = text.size() < (1 << 16);  // (whole WMT files: thousands of chunks are enough)
    const std::pair<int, size_t> runs[] = {
        {2, 0}, {1 + case_index % 16, small ? 1 : 512}, {1 + (case_index + 7) % 16, small ? 13 : 4096}, {16, 64}};
    for (auto [threads, chunk] : runs)
      if (tokenizer.encode_ordinary_parallel(text, threads, invalid, chunk) != ids)
        failed.push_back(fmt::format("encode_ordinary_parallel differs (threads {}, chunk_bytes {})", threads, chunk));
    if (mode == "ordinary") {
      std::string_view view = text;
      auto batch = tokenizer.encode_ordinary_batch(std::span(&view, 1), 2);
      if (batch.size() != 1 || batch[0] != ids) failed.push_back("encode_ordinary_batch differs");
    }
  }
  return failed;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    fmt::print(stderr, "usage: {} ENCODING VOCAB_DIR CASES_DIR\n", argv[0]);
    return 2;
  }
  try {
    std::string encoding = argv[1];
    std::filesystem::path dir = argv[3];
    auto tokenizer = flashgpt::Tokenizer::load(encoding, argv[2]);
    auto manifest = nlohmann::json::parse(file_read(dir / "manifest.json"));
    nlohmann::json results = nlohmann::json::array();
    for (const auto& entry : manifest) {
      std::string name = entry.at("file"), mode = entry.at("mode");
      std::string text = file_read(dir / name);
      nlohmann::json result = {{"file", name}, {"error", nullptr}, {"failed_checks", nlohmann::json::array()}};
      std::vector<flashgpt::TokenId> ids;
      try {
        if (mode == "ordinary") {
          ids = tokenizer.encode_ordinary(text);
        } else if (mode == "replace") {
          ids = tokenizer.encode_ordinary(text, flashgpt::InvalidUtf8::replace);
        } else if (mode == "special_all") {
          ids = tokenizer.encode(text, flashgpt::SpecialTokenPolicy{.allow_all = true, .allowed = {}});
        } else if (mode == "special_none") {
          ids = tokenizer.encode(text);
        } else {
          FLASHGPT_FAIL("unknown mode {}", mode);
        }
        result["failed_checks"] = self_checks(tokenizer, text, ids, mode, int(results.size()));
      } catch (const flashgpt::Error& e) {
        result["error"] = e.what();
      }
      std::ofstream out(dir / fmt::format("{}.{}.ids", name, encoding), std::ios::binary);
      for (auto id : ids) {
        char bytes[4] = {char(id & 0xFF), char(id >> 8 & 0xFF), char(id >> 16 & 0xFF), char(id >> 24 & 0xFF)};
        out.write(bytes, 4);
      }
      results.push_back(result);
    }
    std::ofstream(dir / fmt::format("results.{}.json", encoding)) << results.dump(1);
  } catch (const std::exception& e) {
    fmt::print(stderr, "tiktoken_driver: {}\n", e.what());
    return 1;
  }
  return 0;
}

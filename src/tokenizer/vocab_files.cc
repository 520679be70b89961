#include "vocab_files.h"

#include <flashgpt/digest.h>
#include <flashgpt/error.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#ifdef FLASHGPT_WITH_CURL
#include <curl/curl.h>
#endif

namespace flashgpt {

namespace {

constexpr KnownEncoding kKnownEncodings[] = {
    {"r50k_base", "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
     "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"},
    {"p50k_base", "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
     "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"},
    {"cl100k_base", "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
     "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"},
    {"o200k_base", "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
     "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"},
};

std::optional<std::string> file_read(const std::filesystem::path& path) {
  std::error_code ec;
  FLASHGPT_CHECK(!std::filesystem::is_directory(path, ec), "{} is a directory, not a file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  FLASHGPT_CHECK(!in.bad(), "cannot read {}", path.string());
  return std::move(buffer).str();
}

void rank_file_verify(const KnownEncoding& known, std::string_view contents, const std::filesystem::path& path) {
  std::string actual = sha256_hex(contents);
  FLASHGPT_CHECK(actual == known.sha256,
                 "{} is not the official {} rank file: its sha256 is {}, the published one is {} ({}); "
                 "replace it with the file from {}",
                 path.string(), known.name, actual, known.sha256, known.url, known.url);
}

#ifdef FLASHGPT_WITH_CURL
size_t curl_append(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}

std::optional<std::string> url_download(std::string_view url, std::string* why) {
  CURL* curl = curl_easy_init();
  if (!curl) return std::nullopt;
  std::string body, address(url);
  curl_easy_setopt(curl, CURLOPT_URL, address.c_str());
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(curl, CURLOPT_FAILONERROR, 1L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, curl_append);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  CURLcode code = curl_easy_perform(curl);
  curl_easy_cleanup(curl);
  if (code != CURLE_OK) {
    *why = curl_easy_strerror(code);
    return std::nullopt;
  }
  return body;
}
#endif

}  // namespace

const KnownEncoding* encoding_known(std::string_view name) {
  for (const auto& known : kKnownEncodings)
    if (known.name == name) return &known;
  return nullptr;
}

std::filesystem::path vocab_dir_resolve(const std::filesystem::path& vocab_dir) {
  if (!vocab_dir.empty()) return vocab_dir;
  if (const char* env = std::getenv("FLASHGPT_TOKENIZER_DIR"); env && *env) return env;
  return {};
}

std::filesystem::path vocab_cache_dir() {
  if (const char* env = std::getenv("FLASHGPT_CACHE_DIR"); env && *env) return env;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return std::filesystem::path(xdg) / "flashgpt" / "tokenizers";
  if (const char* home = std::getenv("HOME"); home && *home)
    return std::filesystem::path(home) / ".cache" / "flashgpt" / "tokenizers";
  return std::filesystem::temp_directory_path() / "flashgpt-tokenizers";
}

VocabFile vocab_rank_file_read(std::string_view name, const std::filesystem::path& vocab_dir) {
  const KnownEncoding* known = encoding_known(name);
  std::string names;
  for (const auto& k : kKnownEncodings) names += fmt::format("{}{}", names.empty() ? "" : ", ", k.name);
  FLASHGPT_CHECK(known, "unknown encoding '{}' (known: {})", name, names);
  std::string file = fmt::format("{}.tiktoken", name);
  std::vector<std::filesystem::path> looked;
  std::filesystem::path dir = vocab_dir_resolve(vocab_dir);
  if (!dir.empty()) {
    std::error_code ec;
    FLASHGPT_CHECK(!std::filesystem::exists(dir, ec) || std::filesystem::is_directory(dir, ec),
                   "the vocabulary directory {} is a file, not a directory (it should hold {})", dir.string(), file);
    looked.push_back(dir / file);
    if (auto contents = file_read(looked.back())) {
      rank_file_verify(*known, *contents, looked.back());
      return {std::move(*contents), looked.back().string()};
    }
  }
  std::filesystem::path cached = vocab_cache_dir() / file;
  looked.push_back(cached);
  if (auto contents = file_read(cached)) {
    rank_file_verify(*known, *contents, cached);
    return {std::move(*contents), cached.string()};
  }
  // tiktoken's own download cache names the file by the sha1 of its URL.
  std::filesystem::path tiktoken_dir;
  if (const char* env = std::getenv("TIKTOKEN_CACHE_DIR"); env && *env) {
    tiktoken_dir = env;
  } else if (const char* gym = std::getenv("DATA_GYM_CACHE_DIR"); gym && *gym) {
    tiktoken_dir = gym;
  } else {
    std::error_code ec;
    tiktoken_dir = std::filesystem::temp_directory_path(ec) / "data-gym-cache";
  }
  looked.push_back(tiktoken_dir / sha1_hex(known->url));
  if (auto contents = file_read(looked.back())) {
    rank_file_verify(*known, *contents, looked.back());
    return {std::move(*contents), looked.back().string()};
  }
  std::string where;
  for (const auto& path : looked) where += fmt::format("\n  {}", path.string());
#ifdef FLASHGPT_WITH_CURL
  const char* offline = std::getenv("FLASHGPT_OFFLINE");
  FLASHGPT_CHECK(!offline || !*offline || std::string_view(offline) == "0",
                 "the {} rank file is missing; looked in:{}\nand FLASHGPT_OFFLINE is set, so {} was not downloaded", name,
                 where, known->url);
  std::string why;
  if (auto body = url_download(known->url, &why)) {
    rank_file_verify(*known, *body, known->url);
    std::error_code ec;
    std::filesystem::create_directories(cached.parent_path(), ec);
    std::filesystem::path partial = cached;
    partial += ".partial";
    if (std::ofstream out(partial, std::ios::binary); out && out.write(body->data(), body->size())) {
      out.close();
      std::filesystem::rename(partial, cached, ec);
    }
    return {std::move(*body), std::string(known->url)};
  }
  FLASHGPT_FAIL("the {} rank file is missing; looked in:{}\nand downloading {} failed: {}", name, where, known->url, why);
#else
  FLASHGPT_FAIL(
      "the {} rank file is missing; looked in:{}\npass --tokenizer-dir or set FLASHGPT_TOKENIZER_DIR to the directory "
      "holding {} (this build has no libcurl to download {})",
      name, where, file, known->url);
#endif
}

std::optional<VocabFile> vocab_meta_read(std::string_view name, const std::filesystem::path& vocab_dir) {
  std::filesystem::path dir = vocab_dir_resolve(vocab_dir);
  if (dir.empty()) return std::nullopt;
  std::filesystem::path path = dir / fmt::format("{}.meta.json", name);
  auto contents = file_read(path);
  if (!contents) return std::nullopt;
  return VocabFile{std::move(*contents), path.string()};
}

}  // namespace flashgpt

// download: fetch, verify, unpack. Each file goes to DEST/NAME.part first and is resumed
// with an HTTP Range request after a dropped connection (a bounded number of attempts);
// it becomes DEST/NAME only after its size and checksums match, and its sha256 is then
// recorded in DEST/manifest.json so later runs verify rather than fetch again.
#include <flashgpt/data_download.h>
#include <flashgpt/data_reader.h>
#include <flashgpt/digest.h>
#include <flashgpt/error.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#ifdef FLASHGPT_HAVE_CURL
#include <curl/curl.h>
#endif
#ifdef FLASHGPT_HAVE_LIBARCHIVE
#include <archive.h>
#include <archive_entry.h>
#endif

namespace flashgpt {

std::vector<DownloadItem> wmt14_download_items() {
  return {
      {"training-parallel-europarl-v7.tgz", "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz", "", "", 0},
      {"training-parallel-commoncrawl.tgz", "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz", "", "", 0},
      {"training-parallel-un.tgz", "http://statmt.org/wmt13/training-parallel-un.tgz", "", "", 0},
      {"training-parallel-nc-v9.tgz", "http://statmt.org/wmt14/training-parallel-nc-v9.tgz", "", "", 0},
      {"training-giga-fren.tar", "http://statmt.org/wmt10/training-giga-fren.tar", "", "", 0},
      {"dev.tgz", "http://statmt.org/wmt14/dev.tgz", "", "", 0},
      // md5 published in sacrebleu's dataset table (wmt14/full).
      {"test-full.tgz", "http://statmt.org/wmt14/test-full.tgz", "a8cd784e006feb32ac6f3d9ec7eb389a", "", 0},
  };
}

std::vector<DownloadItem> download_items_from_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  FLASHGPT_CHECK(in, "cannot open manifest {}", path.string());
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    FLASHGPT_FAIL("{}: not valid JSON: {}", path.string(), e.what());
  }
  FLASHGPT_CHECK(j.is_array(), "{}: expected a JSON array of {{name, url, md5?, sha256?, size?}}", path.string());
  std::vector<DownloadItem> items;
  for (const auto& e : j) {
    FLASHGPT_CHECK(e.contains("name") && e.contains("url"), "{}: every entry needs a name and a url", path.string());
    DownloadItem item{e["name"], e["url"], e.value("md5", ""), e.value("sha256", ""), e.value("size", uint64_t{0})};
    FLASHGPT_CHECK(item.name.find('/') == std::string::npos && item.name != ".." && !item.name.empty(),
                   "{}: '{}' is not a plain file name", path.string(), item.name);
    items.push_back(std::move(item));
  }
  return items;
}

#ifdef FLASHGPT_HAVE_CURL
bool download_supported() { return true; }
#else
bool download_supported() { return false; }
#endif
#ifdef FLASHGPT_HAVE_LIBARCHIVE
bool unpack_supported() { return true; }
#else
bool unpack_supported() { return false; }
#endif

#ifdef FLASHGPT_HAVE_LIBARCHIVE
void archive_unpack(const std::filesystem::path& archive_path, const std::filesystem::path& dest) {
  struct archive* reader = archive_read_new();
  struct archive* writer = archive_write_disk_new();
  auto cleanup = [&] {
    archive_read_free(reader);
    archive_write_free(writer);
  };
  archive_read_support_filter_all(reader);
  archive_read_support_format_tar(reader);
  archive_read_support_format_gnutar(reader);
  // Entries are written as DEST/NAME, so absolute names are refused by hand below and
  // libarchive refuses ".." and writing through symlinks.
  archive_write_disk_set_options(writer, ARCHIVE_EXTRACT_TIME | ARCHIVE_EXTRACT_SECURE_NODOTDOT |
                                             ARCHIVE_EXTRACT_SECURE_SYMLINKS);
  auto fail = [&](struct archive* a, std::string_view what) {
    const std::string message = archive_error_string(a) ? archive_error_string(a) : "unknown error";
    const bool reading = a == reader;
    cleanup();
    if (reading) FLASHGPT_FAIL("{}: corrupt or truncated archive ({}: {})", archive_path.string(), what, message);
    FLASHGPT_FAIL("cannot unpack {} into {} ({}: {})", archive_path.string(), dest.string(), what, message);
  };
  // libarchive does not report a bad gzip/xz checksum, so the compressed stream is checked
  // end to end first (zlib and liblzma verify CRC-32/CRC-64 and detect truncation).
  try {
    LineReader whole(archive_path);
    std::string block;
    if (whole.compression() != Compression::none) {
      while (whole.next(block)) {
      }
    }
  } catch (const Error& e) {
    cleanup();
    FLASHGPT_FAIL("{}: corrupt or truncated archive ({})", archive_path.string(), e.what());
  }
  if (archive_read_open_filename(reader, archive_path.c_str(), 1 << 16) != ARCHIVE_OK) fail(reader, "open");
  std::filesystem::create_directories(dest);
  size_t entries = 0;
  for (;;) {
    struct archive_entry* entry;
    const int rc = archive_read_next_header(reader, &entry);
    if (rc == ARCHIVE_EOF) break;
    if (rc < ARCHIVE_WARN) fail(reader, "reading an entry header");
    const std::string name = archive_entry_pathname(entry);
    if (std::filesystem::path(name).is_absolute()) {
      cleanup();
      FLASHGPT_FAIL("{}: refusing the absolute path {} in the archive", archive_path.string(), name);
    }
    archive_entry_set_pathname(entry, (dest / name).c_str());
    if (archive_write_header(writer, entry) < ARCHIVE_WARN) fail(writer, "writing " + name);
    const void* block;
    size_t size;
    la_int64_t offset;
    for (;;) {
      const int data_rc = archive_read_data_block(reader, &block, &size, &offset);
      if (data_rc == ARCHIVE_EOF) break;
      if (data_rc < ARCHIVE_WARN) fail(reader, "reading " + name);
      if (archive_write_data_block(writer, block, size, offset) < ARCHIVE_WARN) fail(writer, "writing " + name);
    }
    if (archive_write_finish_entry(writer) < ARCHIVE_WARN) fail(writer, "finishing " + name);
    ++entries;
  }
  cleanup();
  FLASHGPT_CHECK(entries > 0, "{}: the archive holds no files", archive_path.string());
}
#else
void archive_unpack(const std::filesystem::path& archive_path, const std::filesystem::path&) {
  FLASHGPT_FAIL("cannot unpack {}: this build has no libarchive (install libarchive-dev and rebuild, or run "
                "`tar xf {}`)", archive_path.string(), archive_path.string());
}
#endif

#ifdef FLASHGPT_HAVE_CURL
namespace {

struct Transfer {
  FILE* file = nullptr;
  CURL* curl = nullptr;
  uint64_t resume_from = 0, written = 0;
  std::string name;
  bool progress = false;
  std::chrono::steady_clock::time_point last_report = std::chrono::steady_clock::now();
};

size_t write_body(char* data, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const size_t n = std::fwrite(data, size, count, t.file) * size;
  t.written += n;
  if (t.progress && std::chrono::steady_clock::now() - t.last_report > std::chrono::seconds(2)) {
    t.last_report = std::chrono::steady_clock::now();
    curl_off_t total = 0;
    curl_easy_getinfo(t.curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &total);
    fmt::print(stderr, "download {}: {:.1f} MB of {:.1f} MB\n", t.name, static_cast<double>(t.written + t.resume_from) / 1e6,
               static_cast<double>(total + static_cast<curl_off_t>(t.resume_from)) / 1e6);
  }
  return n;
}

bool retryable(CURLcode rc) {
  return rc == CURLE_PARTIAL_FILE || rc == CURLE_RECV_ERROR || rc == CURLE_COULDNT_CONNECT ||
         rc == CURLE_OPERATION_TIMEDOUT || rc == CURLE_GOT_NOTHING || rc == CURLE_SEND_ERROR;
}

// Fetches `url` into `part`, resuming from its current size. Throws after the retries.
void fetch_resuming(const DownloadItem& item, const std::filesystem::path& part, const DownloadConfig& config) {
  std::string last_error;
  for (int attempt = 0; attempt <= config.retries; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(200 * attempt));
    Transfer t;
    t.name = item.name;
    t.progress = config.progress;
    t.resume_from = std::filesystem::exists(part) ? std::filesystem::file_size(part) : 0;
    t.file = std::fopen(part.c_str(), "ab");
    FLASHGPT_CHECK(t.file, "cannot write {}: {}", part.string(), std::strerror(errno));
    t.curl = curl_easy_init();
    FLASHGPT_CHECK(t.curl, "curl_easy_init failed");
    char error[CURL_ERROR_SIZE] = {};
    curl_easy_setopt(t.curl, CURLOPT_URL, item.url.c_str());
    curl_easy_setopt(t.curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(t.curl, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(t.curl, CURLOPT_ERRORBUFFER, error);
    curl_easy_setopt(t.curl, CURLOPT_WRITEFUNCTION, write_body);
    curl_easy_setopt(t.curl, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(t.curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(t.curl, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(t.curl, CURLOPT_USERAGENT, "flashgpt-data-download");
    if (config.timeout_seconds > 0) {
      curl_easy_setopt(t.curl, CURLOPT_TIMEOUT_MS, static_cast<long>(config.timeout_seconds * 1000));
    }
    if (t.resume_from > 0) curl_easy_setopt(t.curl, CURLOPT_RESUME_FROM_LARGE, static_cast<curl_off_t>(t.resume_from));
    const CURLcode rc = curl_easy_perform(t.curl);
    long code = 0;
    curl_easy_getinfo(t.curl, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(t.curl);
    const bool closed = t.file && std::fclose(t.file) == 0;
    if (rc == CURLE_OK) {
      FLASHGPT_CHECK(closed, "{}: write failed", part.string());
      return;
    }
    if (rc == CURLE_HTTP_RETURNED_ERROR && code == 416 && t.resume_from > 0) return;  // .part already complete
    if (rc == CURLE_RANGE_ERROR) {  // the server cannot resume: start this file over
      std::filesystem::remove(part);
      last_error = "the server does not support resuming (HTTP Range)";
      if (config.progress) fmt::print(stderr, "download {}: {}; starting over\n", item.name, last_error);
      continue;
    }
    last_error = fmt::format("{} (HTTP {})", error[0] ? error : curl_easy_strerror(rc), code);
    if (!retryable(rc)) break;
    if (config.progress) {
      fmt::print(stderr, "download {}: {}; resuming (attempt {} of {})\n", item.name, last_error, attempt + 2,
                 config.retries + 1);
    }
  }
  FLASHGPT_FAIL("cannot download {} from {}: {} (the partial file {} is kept; re-run to resume)", item.name, item.url,
                last_error, part.string());
}

}  // namespace
#endif

void data_download(const DownloadConfig& config) {
#ifndef FLASHGPT_HAVE_CURL
  std::string urls;
  for (const auto& item : config.items) urls += "\n  " + item.url;
  FLASHGPT_FAIL("this build has no libcurl, so it cannot download (install libcurl4-openssl-dev and rebuild, or fetch "
                "these into {} yourself and unpack them):{}", config.dest.string(), urls);
#else
  FLASHGPT_CHECK(!config.items.empty(), "download: nothing to fetch");
  FLASHGPT_CHECK(!config.unpack || unpack_supported(),
                 "this build has no libarchive, so it cannot unpack the archives (install libarchive-dev and "
                 "rebuild, or pass --no-unpack and run tar yourself)");
  std::filesystem::create_directories(config.dest);
  const auto manifest_path = config.dest / "manifest.json";
  nlohmann::ordered_json manifest = nlohmann::ordered_json::object();
  if (std::filesystem::exists(manifest_path)) {
    std::ifstream in(manifest_path);
    try {
      in >> manifest;
    } catch (const nlohmann::json::exception& e) {
      FLASHGPT_FAIL("{}: not valid JSON ({}); delete it to start over", manifest_path.string(), e.what());
    }
  }
  auto save_manifest = [&] {
    const auto tmp = config.dest / "manifest.json.tmp";
    std::ofstream(tmp) << manifest.dump(2) << "\n";
    std::filesystem::rename(tmp, manifest_path);
  };
  static const bool curl_ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  FLASHGPT_CHECK(curl_ready, "curl_global_init failed");

  for (const auto& item : config.items) {
    const auto final_path = config.dest / item.name;
    auto part = final_path;
    part += ".part";
    // Expected sha256: the item's, else the one recorded on first download.
    std::string sha256 = item.sha256;
    if (sha256.empty() && manifest.contains(item.name)) sha256 = manifest[item.name].value("sha256", "");

    auto verify = [&](const std::filesystem::path& file) {
      const uint64_t size = std::filesystem::file_size(file);
      if (item.size) {
        FLASHGPT_CHECK(size == item.size, "{}: {} bytes, expected {}; deleted it, re-run to fetch it again",
                       item.name, size, item.size);
      }
      if (!item.md5.empty()) {
        const auto md5 = md5_hex_file(file);
        FLASHGPT_CHECK(md5 == item.md5, "{}: md5 {} does not match the published {}; the download is corrupt",
                       item.name, md5, item.md5);
      }
      const auto actual = sha256_hex_file(file);
      FLASHGPT_CHECK(sha256.empty() || actual == sha256, "{}: sha256 {} does not match the expected {}", item.name,
                     actual, sha256);
      return std::pair{size, actual};
    };

    bool have = std::filesystem::exists(final_path);
    if (have) {
      try {
        verify(final_path);
        if (config.progress) fmt::print(stderr, "download {}: already here, verified\n", item.name);
      } catch (const Error&) {
        std::filesystem::remove(final_path);
        have = false;
        if (config.progress) fmt::print(stderr, "download {}: existing copy fails verification, fetching again\n",
                                        item.name);
      }
    }
    if (!have) {
      fetch_resuming(item, part, config);
      std::pair<uint64_t, std::string> checked;
      try {
        checked = verify(part);
      } catch (const Error&) {
        auto bad = final_path;
        bad += ".corrupt";
        std::filesystem::rename(part, bad);
        throw;
      }
      std::filesystem::rename(part, final_path);
      manifest[item.name] = {{"url", item.url}, {"size", checked.first}, {"sha256", checked.second}};
      if (!item.md5.empty()) manifest[item.name]["md5"] = item.md5;
      manifest[item.name]["unpacked"] = false;
      save_manifest();
    }
    if (config.unpack && !(manifest.contains(item.name) && manifest[item.name].value("unpacked", false))) {
      try {
        archive_unpack(final_path, config.dest);
      } catch (const Error&) {
        // A corrupt archive whose checksum we could not know in advance: move it aside so
        // that the next run fetches it again, and say so.
        auto bad = final_path;
        bad += ".corrupt";
        std::filesystem::rename(final_path, bad);
        manifest.erase(item.name);
        save_manifest();
        throw;
      }
      if (!manifest.contains(item.name)) {
        manifest[item.name] = {{"url", item.url}, {"sha256", sha256_hex_file(final_path)}};
      }
      manifest[item.name]["unpacked"] = true;
      save_manifest();
      if (config.progress) fmt::print(stderr, "download {}: unpacked into {}\n", item.name, config.dest.string());
    }
  }
#endif
}

}  // namespace flashgpt

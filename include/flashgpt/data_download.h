// download: fetching, verifying and unpacking the official WMT14 fr-en archives.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace flashgpt {

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

}  // namespace flashgpt

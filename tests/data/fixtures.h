// Small generated fixtures for the data tests: a fresh directory per test and files
// written from strings (compressed with the gzip/xz command-line tools).
#pragma once

#include <flashgpt/data_reader.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace flashgpt::testing {

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            (std::string("flashgpt_") + info->test_suite_name() + "_" + info->name() + "_" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline std::filesystem::path write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  return path;
}

inline std::string read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Skips the current test when this build cannot read gzip or xz (zlib and liblzma are
// optional: the GPU machine has no liblzma).
#define FLASHGPT_REQUIRE_COMPRESSION(kind)                                                          \
  do {                                                                                              \
    if (!::flashgpt::compression_supported(::flashgpt::Compression::kind))                          \
      GTEST_SKIP() << "this build cannot read " #kind " (built without its library)";              \
  } while (0)

// Writes `bytes` to PATH (PATH must end in .gz or .xz) compressed with gzip or xz.
inline std::filesystem::path write_compressed(const std::filesystem::path& path, const std::string& bytes) {
  const std::string ext = path.extension().string();
  auto plain = path;
  plain.replace_extension();
  write_file(plain, bytes);
  const std::string tool = ext == ".gz" ? "gzip -nf" : "xz -zf";
  const std::string command = tool + " '" + plain.string() + "'";
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  return path;
}

}  // namespace flashgpt::testing

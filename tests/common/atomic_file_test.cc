// AtomicFile: the target is whole or untouched, write errors throw (a full disk is
// simulated with RLIMIT_FSIZE, which makes write() fail with EFBIG), nothing is left over.
#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace flashgpt {
namespace {

struct Dir {
  std::filesystem::path path;
  Dir() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("flashgpt_atomic_" + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~Dir() { std::filesystem::remove_all(path); }
  size_t entries() const {
    size_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(path)) ++n;
    return n;
  }
};

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Lowers the file-size limit for the scope (and ignores SIGXFSZ so write() returns EFBIG).
struct FileSizeLimit {
  rlimit old{};
  void (*old_handler)(int);
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &old);
    old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{bytes, old.rlim_max};
    setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
  }
};

TEST(AtomicFile, WritesBufferAndCallbackAndReplaces) {
  Dir dir;
  const auto target = dir.path / "out.json";
  atomic_write_file(target, std::string_view("first"));
  EXPECT_EQ(slurp(target), "first");
  atomic_write_file(target, [](AtomicFile& f) {
    f.write(std::string_view("sec"));
    f.write(std::string_view("ond"));
  });
  EXPECT_EQ(slurp(target), "second");
  EXPECT_EQ(dir.entries(), 1u);  // no temporary file left
}

TEST(AtomicFile, FullDiskIsAnErrorAndKeepsThePreviousFile) {
  Dir dir;
  const auto target = dir.path / "summary.json";
  atomic_write_file(target, std::string_view("old content"));
  const std::string big(1 << 16, 'x');
  try {
    FileSizeLimit limit(4096);
    atomic_write_file(target, big);
    FAIL() << "a write past the file-size limit did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot write"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("summary.json"), std::string::npos) << e.what();
  }
  EXPECT_EQ(slurp(target), "old content");
  EXPECT_EQ(dir.entries(), 1u);
}

TEST(AtomicFile, CallbackErrorLeavesNothing) {
  Dir dir;
  const auto target = dir.path / "plot.png";
  EXPECT_THROW(atomic_write_file(target, [](AtomicFile& f) {
                 f.write(std::string_view("partial"));
                 throw Error("stop");
               }),
               Error);
  EXPECT_FALSE(std::filesystem::exists(target));
  EXPECT_EQ(dir.entries(), 0u);
}

TEST(AtomicFile, MissingDirectoryAndDirectoryTargetAreErrors) {
  Dir dir;
  EXPECT_THROW(atomic_write_file(dir.path / "no" / "such" / "file", std::string_view("x")), Error);
  EXPECT_THROW(atomic_write_file(dir.path, std::string_view("x")), Error);
}

TEST(AtomicFile, TempPathKeepsExtensionAndDirectory) {
  const auto t = atomic_temp_path("a b/c'd;e.png");
  EXPECT_EQ(t.parent_path(), std::filesystem::path("a b"));
  EXPECT_EQ(t.extension(), ".png");
  EXPECT_NE(t.filename(), "c'd;e.png");
  EXPECT_NE(atomic_temp_path("x.png"), atomic_temp_path("x.png"));
}

TEST(AtomicFile, PublishMovesAWholeFileIntoPlace) {
  Dir dir;
  const auto target = dir.path / "quote's; dir.png";
  const auto temp = atomic_temp_path(target);
  std::ofstream(temp) << "png";
  atomic_publish(temp, target);
  EXPECT_EQ(slurp(target), "png");
  EXPECT_FALSE(std::filesystem::exists(temp));
  EXPECT_THROW(atomic_publish(dir.path / "missing", target), Error);
}

}  // namespace
}  // namespace flashgpt

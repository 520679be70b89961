// Whole-or-nothing files: temporary file, fsync, rename, fsync of the directory.
#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace flashgpt {
namespace {

std::filesystem::path parent_or_dot(const std::filesystem::path& path) {
  const auto parent = path.parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

}  // namespace

std::filesystem::path atomic_temp_path(const std::filesystem::path& path) {
  static std::atomic<uint64_t> counter = 0;
  // ".NAME.tmp-PID-N.EXT": hidden, unique per process and call, same extension.
  const auto name = path.filename();
  FLASHGPT_CHECK(!name.empty() && name != "." && name != "..", "'{}' is not a file path", path.string());
  const std::string temp = fmt::format(".{}.tmp-{}-{}{}", name.stem().string(), ::getpid(), counter++,
                                       name.extension().string());
  return path.parent_path() / temp;
}

void fsync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  FLASHGPT_CHECK(fd >= 0, "cannot open directory {} to sync it: {}", dir.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  // Some file systems cannot sync a directory (EINVAL); the rename itself has happened.
  FLASHGPT_CHECK(rc == 0 || saved == EINVAL, "cannot sync directory {}: {}", dir.string(), std::strerror(saved));
}

AtomicFile::AtomicFile(std::filesystem::path path) : path_(std::move(path)) {
  std::error_code ec;
  FLASHGPT_CHECK(!std::filesystem::is_directory(path_, ec), "cannot write {}: it is a directory", path_.string());
  temp_ = atomic_temp_path(path_);
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  FLASHGPT_CHECK(fd_ >= 0, "cannot create {} (for {}): {}", temp_.string(), path_.string(), std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!temp_.empty()) ::unlink(temp_.c_str());
}

void AtomicFile::write(const void* data, size_t size) {
  FLASHGPT_CHECK(fd_ >= 0, "{}: write after commit", path_.string());
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    FLASHGPT_CHECK(n > 0, "cannot write {}: {}", path_.string(), n < 0 ? std::strerror(errno) : "no progress");
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  FLASHGPT_CHECK(fd_ >= 0, "{}: committed twice", path_.string());
  const int sync_rc = ::fsync(fd_);
  const int sync_errno = errno;
  const int close_rc = ::close(fd_);
  const int close_errno = errno;
  fd_ = -1;
  FLASHGPT_CHECK(sync_rc == 0, "cannot write {}: sync failed: {}", path_.string(), std::strerror(sync_errno));
  FLASHGPT_CHECK(close_rc == 0, "cannot write {}: close failed: {}", path_.string(), std::strerror(close_errno));
  FLASHGPT_CHECK(::rename(temp_.c_str(), path_.c_str()) == 0, "cannot rename {} to {}: {}", temp_.string(),
                 path_.string(), std::strerror(errno));
  temp_.clear();
  fsync_directory(parent_or_dot(path_));
}

void atomic_write_file(const std::filesystem::path& path, std::string_view bytes) {
  AtomicFile file(path);
  file.write(bytes);
  file.commit();
}

void atomic_write_file(const std::filesystem::path& path, const std::function<void(AtomicFile&)>& fill) {
  AtomicFile file(path);
  fill(file);
  file.commit();
}

void atomic_publish(const std::filesystem::path& temp, const std::filesystem::path& path) {
  const int fd = ::open(temp.c_str(), O_RDONLY | O_CLOEXEC);
  FLASHGPT_CHECK(fd >= 0, "cannot open {} (for {}): {}", temp.string(), path.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (rc != 0) {
    ::unlink(temp.c_str());
    FLASHGPT_FAIL("cannot write {}: sync failed: {}", path.string(), std::strerror(saved));
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int rename_errno = errno;
    ::unlink(temp.c_str());
    FLASHGPT_FAIL("cannot rename {} to {}: {}", temp.string(), path.string(), std::strerror(rename_errno));
  }
  fsync_directory(parent_or_dot(path));
}

}  // namespace flashgpt

#include "files.h"

#include <flashgpt/error.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

extern char** environ;

namespace flashgpt::train_detail {

void fd_write_all(int fd, const void* data, size_t size, const std::filesystem::path& path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    FLASHGPT_CHECK(n > 0, "cannot write {}: {}", path.string(), std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void file_write_atomic(const std::filesystem::path& path, const std::function<void(int fd)>& fill) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FLASHGPT_CHECK(fd >= 0, "cannot create {}: {}", tmp.string(), std::strerror(errno));
  try {
    fill(fd);
    FLASHGPT_CHECK(::fsync(fd) == 0, "cannot flush {}: {}", tmp.string(), std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  FLASHGPT_CHECK(::close(fd) == 0, "cannot close {}: {}", tmp.string(), std::strerror(errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    FLASHGPT_FAIL("cannot rename {} to {}: {}", tmp.string(), path.string(), std::strerror(err));
  }
  // The rename is durable only once the directory entry is.
  const auto dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void file_write_atomic(const std::filesystem::path& path, std::string_view bytes) {
  file_write_atomic(path, [&](int fd) { fd_write_all(fd, bytes.data(), bytes.size(), path); });
}

int process_run(const std::vector<std::string>& argv) {
  if (argv.empty()) return -1;
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  if (::posix_spawnp(&pid, args[0], nullptr, nullptr, args.data(), environ) != 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace flashgpt::train_detail

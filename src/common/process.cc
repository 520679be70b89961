// Child processes through posix_spawnp: an argument vector, never a shell.
#include <flashgpt/error.h>
#include <flashgpt/process.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string_view>

extern char** environ;

namespace flashgpt {

bool process_program_exists(const std::string& program) {
  if (program.empty()) return false;
  if (program.find('/') != std::string::npos) return ::access(program.c_str(), X_OK) == 0;
  const char* path = std::getenv("PATH");
  std::string_view dirs = path ? path : "/usr/bin:/bin";
  while (true) {
    const size_t colon = dirs.find(':');
    const std::string dir(dirs.substr(0, colon));
    const auto candidate = std::filesystem::path(dir.empty() ? "." : dir) / program;
    if (::access(candidate.c_str(), X_OK) == 0 && !std::filesystem::is_directory(candidate)) return true;
    if (colon == std::string_view::npos) return false;
    dirs.remove_prefix(colon + 1);
  }
}

int process_run(const std::vector<std::string>& argv, ChildOutput output) {
  FLASHGPT_CHECK(!argv.empty() && !argv[0].empty(), "process_run: no program given");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  FLASHGPT_CHECK(posix_spawn_file_actions_init(&actions) == 0, "posix_spawn_file_actions_init failed");
  if (output == ChildOutput::discard) {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  FLASHGPT_CHECK(rc == 0, "cannot run {}: {}{}", argv[0], std::strerror(rc),
                 rc == ENOENT ? " (not installed, or not in PATH)" : "");
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    FLASHGPT_CHECK(errno == EINTR, "waiting for {} failed: {}", argv[0], std::strerror(errno));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace flashgpt

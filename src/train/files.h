// Private file and process helpers of the trainer: an atomic file write (temporary file,
// fsync, rename) and a child process started from an argument vector.
// TODO(integrator): the rel-data branch adds include/flashgpt/atomic_file.h and
// include/flashgpt/process.h in src/common; these two should become calls to those.
#pragma once

#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt::train_detail {

// Appends bytes to a file descriptor, retrying short writes; throws naming `path`.
void fd_write_all(int fd, const void* data, size_t size, const std::filesystem::path& path);

// Writes PATH.tmp through `fill(fd)`, fsyncs it, renames it over PATH and fsyncs the
// directory, so PATH is either the old file or the complete new one.
void file_write_atomic(const std::filesystem::path& path, const std::function<void(int fd)>& fill);
void file_write_atomic(const std::filesystem::path& path, std::string_view bytes);

// Runs argv[0] (looked up in PATH) with the arguments, waits for it and returns its exit
// status (128 + signal if it was killed); -1 if it could not be started.
int process_run(const std::vector<std::string>& argv);

}  // namespace flashgpt::train_detail

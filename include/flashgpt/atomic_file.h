// Files that exist whole or not at all. The bytes go to a temporary file next to the
// target (same directory, so the rename cannot cross file systems); commit() flushes,
// fsyncs, renames it into place and fsyncs the directory. Any write, flush, sync, close
// or rename error throws flashgpt::Error naming the file and the reason, and the
// temporary file is removed; the previous content of the target is never touched until
// the rename replaces it.
#pragma once

#include <filesystem>
#include <functional>
#include <string_view>

namespace flashgpt {

class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path path);  // creates the temporary file
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();  // removes the temporary file unless committed

  void write(const void* data, size_t size);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  void commit();  // fsync, close, rename onto path(), fsync the directory

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& temp_path() const { return temp_; }

 private:
  std::filesystem::path path_, temp_;
  int fd_ = -1;
};

// The whole file from a buffer, or from a callback that writes it piece by piece.
void atomic_write_file(const std::filesystem::path& path, std::string_view bytes);
void atomic_write_file(const std::filesystem::path& path, const std::function<void(AtomicFile&)>& fill);

// For a file another program writes (a plot): a temporary name next to `path` that keeps
// its extension (tools pick the format from it), and the publish step for it.
std::filesystem::path atomic_temp_path(const std::filesystem::path& path);
void atomic_publish(const std::filesystem::path& temp, const std::filesystem::path& path);

// fsync of a directory, so that a rename inside it survives a crash.
void fsync_directory(const std::filesystem::path& dir);

}  // namespace flashgpt

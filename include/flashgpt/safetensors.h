// The safetensors format (huggingface/safetensors), read and written: checkpoints, the
// Hugging Face export, and anything else that stores named tensors.
//
// Layout: u64 little-endian N, then N bytes of UTF-8 JSON, then the data buffer.
//   {"__metadata__": {"key": "string value", ...},
//    "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
// Offsets are relative to the start of the data buffer; end - begin = numel * dtype size.
//
// The reader validates everything before it hands out a byte: the header length against
// the file size, the JSON, every dtype, shape (products checked for overflow), offsets
// inside the buffer and not overlapping, and metadata values that are strings. The writer
// packs tensors contiguously in the order given, pads the header with spaces to a multiple
// of 8 bytes (as the reference writer does, so data stays aligned), and publishes the file
// atomically (PATH.tmp, fsync, rename).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

enum class StDtype { BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64 };

size_t st_dtype_size(StDtype dtype);
std::string_view st_dtype_name(StDtype dtype);
// Throws flashgpt::Error for a name the format does not define.
StDtype st_dtype_from_name(std::string_view name);

struct StTensorView {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;  // into the mapped file
  int64_t numel() const;
};

// A safetensors file mapped read-only and validated when opened.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  // Tensors in the order of their data offsets.
  const std::vector<StTensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when absent.
  const StTensorView* find(std::string_view name) const;
  // The tensor, checked to be F32 of exactly `shape`; throws naming the file and tensor.
  const StTensorView& require_f32(std::string_view name, std::span<const int64_t> shape) const;
  // Copies an F32 tensor into `out` (which must have its element count).
  void read_f32(std::string_view name, std::span<float> out) const;

 private:
  std::filesystem::path path_;
  const void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::vector<StTensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (by reference: the spans must stay valid until write()) and writes them.
class SafetensorsWriter {
 public:
  void add(std::string name, StDtype dtype, std::vector<int64_t> shape, std::span<const std::byte> data);
  void add_f32(std::string name, std::vector<int64_t> shape, std::span<const float> data);
  void set_metadata(std::string key, std::string value);
  // The header JSON this writer would produce (tests; unpadded).
  std::string header_json() const;
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    std::string name;
    StDtype dtype;
    std::vector<int64_t> shape;
    std::span<const std::byte> data;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace flashgpt

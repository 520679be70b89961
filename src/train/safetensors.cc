// safetensors: a validating reader over a read-only mapping and a streaming writer.
#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>
#include <flashgpt/safetensors.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

namespace flashgpt {
namespace {

// The reference implementation refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeInfo {
  StDtype dtype;
  std::string_view name;
  size_t size;
};
constexpr std::array<DtypeInfo, 13> kDtypes = {{{StDtype::BOOL, "BOOL", 1},
                                                {StDtype::U8, "U8", 1},
                                                {StDtype::I8, "I8", 1},
                                                {StDtype::U16, "U16", 2},
                                                {StDtype::I16, "I16", 2},
                                                {StDtype::F16, "F16", 2},
                                                {StDtype::BF16, "BF16", 2},
                                                {StDtype::U32, "U32", 4},
                                                {StDtype::I32, "I32", 4},
                                                {StDtype::F32, "F32", 4},
                                                {StDtype::U64, "U64", 8},
                                                {StDtype::I64, "I64", 8},
                                                {StDtype::F64, "F64", 8}}};

const DtypeInfo& dtype_info(StDtype dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) return d;
  }
  FLASHGPT_FAIL("unknown safetensors dtype {}", static_cast<int>(dtype));
}

std::string shape_string(std::span<const int64_t> shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// numel * dtype size, or an error naming the tensor when it overflows 64 bits.
uint64_t tensor_bytes(const std::string& where, std::span<const int64_t> shape, size_t dtype_size) {
  uint64_t n = dtype_size;
  for (int64_t d : shape) {
    FLASHGPT_CHECK(d >= 0, "{}: negative dimension {} in shape {}", where, d, shape_string(shape));
    const auto u = static_cast<uint64_t>(d);
    FLASHGPT_CHECK(u == 0 || n <= std::numeric_limits<uint64_t>::max() / u, "{}: shape {} overflows 64 bits", where,
                   shape_string(shape));
    n *= u;
  }
  return n;
}

}  // namespace

size_t st_dtype_size(StDtype dtype) { return dtype_info(dtype).size; }
std::string_view st_dtype_name(StDtype dtype) { return dtype_info(dtype).name; }

StDtype st_dtype_from_name(std::string_view name) {
  for (const auto& d : kDtypes) {
    if (d.name == name) return d.dtype;
  }
  FLASHGPT_FAIL("unknown safetensors dtype '{}' (known: BOOL U8 I8 U16 I16 F16 BF16 U32 I32 F32 U64 I64 F64)", name);
}

int64_t StTensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string file = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FLASHGPT_CHECK(fd >= 0, "cannot open {}: {}", file, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    FLASHGPT_FAIL("cannot stat {}: {}", file, std::strerror(err));
  }
  map_bytes_ = static_cast<size_t>(st.st_size);
  if (map_bytes_ > 0) {
    void* m = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    FLASHGPT_CHECK(m != MAP_FAILED, "cannot map {}: {}", file, std::strerror(err));
    map_ = m;
  } else {
    ::close(fd);
  }
  try {
    const auto* bytes = static_cast<const unsigned char*>(map_);
    FLASHGPT_CHECK(map_bytes_ >= 8, "{} is not a safetensors file: {} bytes, shorter than the 8-byte header length",
                   file, map_bytes_);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
    FLASHGPT_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} is above the format's limit of {} bytes",
                   file, header_len, kMaxHeaderBytes);
    FLASHGPT_CHECK(header_len <= map_bytes_ - 8, "{}: header length {} runs past the end of the file ({} bytes)",
                   file, header_len, map_bytes_);
    const std::string_view header(reinterpret_cast<const char*>(bytes + 8), header_len);
    FLASHGPT_CHECK(!header.empty() && header.front() == '{', "{}: the header does not start with a JSON object", file);

    // Duplicate top-level keys are an error (nlohmann would keep the last one silently).
    std::set<std::string> keys;
    std::string duplicate;
    auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      if (depth == 1 && event == nlohmann::json::parse_event_t::key) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys.insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    };
    const nlohmann::json j = nlohmann::json::parse(header.begin(), header.end(), callback, /*allow_exceptions=*/false);
    FLASHGPT_CHECK(!j.is_discarded() && j.is_object(), "{}: the header is not valid JSON", file);
    FLASHGPT_CHECK(duplicate.empty(), "{}: the header names '{}' twice", file, duplicate);

    const uint64_t data_begin = 8 + header_len;
    const uint64_t data_bytes = map_bytes_ - data_begin;
    for (const auto& [name, value] : j.items()) {
      const std::string where = fmt::format("{}: tensor '{}'", file, name);
      if (name == "__metadata__") {
        FLASHGPT_CHECK(value.is_object(), "{}: __metadata__ is not an object", file);
        for (const auto& [key, v] : value.items()) {
          FLASHGPT_CHECK(v.is_string(), "{}: __metadata__ value of '{}' is not a string", file, key);
          metadata_[key] = v.get<std::string>();
        }
        continue;
      }
      FLASHGPT_CHECK(value.is_object(), "{} is not an object", where);
      for (const char* field : {"dtype", "shape", "data_offsets"}) {
        FLASHGPT_CHECK(value.contains(field), "{} has no {}", where, field);
      }
      FLASHGPT_CHECK(value["dtype"].is_string(), "{}: dtype is not a string", where);
      StTensorView t;
      t.name = name;
      try {
        t.dtype = st_dtype_from_name(value["dtype"].get<std::string>());
      } catch (const Error& e) {
        FLASHGPT_FAIL("{}: {}", where, e.what());
      }
      const auto& shape = value["shape"];
      FLASHGPT_CHECK(shape.is_array(), "{}: shape is not an array", where);
      for (const auto& d : shape) {
        FLASHGPT_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                       "{}: shape {} holds something other than non-negative integers", where, shape.dump());
        FLASHGPT_CHECK(d.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                       "{}: dimension {} is too large", where, d.dump());
        t.shape.push_back(d.get<int64_t>());
      }
      const auto& offsets = value["data_offsets"];
      FLASHGPT_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                         offsets[1].is_number_unsigned(),
                     "{}: data_offsets is not a pair of non-negative integers: {}", where, offsets.dump());
      const auto begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
      FLASHGPT_CHECK(begin <= end, "{}: data_offsets [{}, {}] end before they begin", where, begin, end);
      FLASHGPT_CHECK(end <= data_bytes, "{}: data_offsets [{}, {}] run past the data buffer ({} bytes)", where, begin,
                     end, data_bytes);
      const uint64_t expected = tensor_bytes(where, t.shape, st_dtype_size(t.dtype));
      FLASHGPT_CHECK(end - begin == expected, "{}: {} {} needs {} bytes but data_offsets [{}, {}] hold {}", where,
                     value["dtype"].get<std::string>(), shape_string(t.shape), expected, begin, end, end - begin);
      t.data = std::span<const std::byte>(static_cast<const std::byte*>(map_) + data_begin + begin, end - begin);
      tensors_.push_back(std::move(t));
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) { return a.data.data() < b.data.data(); });
    for (size_t i = 1; i < tensors_.size(); ++i) {
      const auto& prev = tensors_[i - 1];
      FLASHGPT_CHECK(tensors_[i].data.data() >= prev.data.data() + prev.data.size(),
                     "{}: tensors '{}' and '{}' overlap in the data buffer", file, prev.name, tensors_[i].name);
    }
  } catch (...) {
    if (map_) ::munmap(const_cast<void*>(map_), map_bytes_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_bytes_(std::exchange(other.map_bytes_, 0)),
      tensors_(std::move(other.tensors_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (map_) ::munmap(const_cast<void*>(map_), map_bytes_);
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_bytes_ = std::exchange(other.map_bytes_, 0);
    tensors_ = std::move(other.tensors_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<void*>(map_), map_bytes_);
}

const StTensorView* SafetensorsFile::find(std::string_view name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const StTensorView& SafetensorsFile::require_f32(std::string_view name, std::span<const int64_t> shape) const {
  const StTensorView* t = find(name);
  FLASHGPT_CHECK(t, "{} has no tensor '{}'", path_.string(), name);
  FLASHGPT_CHECK(t->dtype == StDtype::F32, "{}: tensor '{}' is {}, not F32", path_.string(), name,
                 st_dtype_name(t->dtype));
  FLASHGPT_CHECK(std::equal(t->shape.begin(), t->shape.end(), shape.begin(), shape.end()),
                 "{}: tensor '{}' has shape {}, expected {}", path_.string(), name, shape_string(t->shape),
                 shape_string(shape));
  return *t;
}

void SafetensorsFile::read_f32(std::string_view name, std::span<float> out) const {
  const StTensorView* t = find(name);
  FLASHGPT_CHECK(t, "{} has no tensor '{}'", path_.string(), name);
  FLASHGPT_CHECK(t->dtype == StDtype::F32, "{}: tensor '{}' is {}, not F32", path_.string(), name,
                 st_dtype_name(t->dtype));
  FLASHGPT_CHECK(t->data.size() == out.size() * sizeof(float), "{}: tensor '{}' holds {} floats, expected {}",
                 path_.string(), name, t->data.size() / sizeof(float), out.size());
  if (!out.empty()) std::memcpy(out.data(), t->data.data(), t->data.size());  // little-endian host
}

void SafetensorsWriter::add(std::string name, StDtype dtype, std::vector<int64_t> shape,
                            std::span<const std::byte> data) {
  FLASHGPT_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '{}'", name);
  for (const auto& e : entries_) FLASHGPT_CHECK(e.name != name, "safetensors: tensor '{}' added twice", name);
  const uint64_t bytes = tensor_bytes("safetensors: tensor '" + name + "'", shape, st_dtype_size(dtype));
  FLASHGPT_CHECK(bytes == data.size(), "safetensors: tensor '{}' of shape {} needs {} bytes, given {}", name,
                 shape_string(shape), bytes, data.size());
  entries_.push_back({std::move(name), dtype, std::move(shape), data});
}

void SafetensorsWriter::add_f32(std::string name, std::vector<int64_t> shape, std::span<const float> data) {
  add(std::move(name), StDtype::F32, std::move(shape), std::as_bytes(data));
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

std::string SafetensorsWriter::header_json() const {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata_.empty()) j["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& e : entries_) {
    j[e.name] = {{"dtype", st_dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.data.size()}}};
    offset += e.data.size();
  }
  return j.dump();
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  std::string header = header_json();
  header.append((8 - header.size() % 8) % 8, ' ');
  std::array<unsigned char, 8> len{};
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  atomic_write_file(path, [&](AtomicFile& file) {
    file.write(len.data(), len.size());
    file.write(header);
    for (const auto& e : entries_) file.write(e.data.data(), e.data.size());
  });
}

}  // namespace flashgpt

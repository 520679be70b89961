// safetensors: round trips of every dtype and awkward shapes, the byte layout the format
// fixes, and a clear error for each kind of malformed file.
#include <flashgpt/error.h>
#include <flashgpt/safetensors.h>

#include "data/fixtures.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

using testing::TempDir;
using testing::read_file_bytes;
using testing::write_file;

// A file from a header string and a data buffer, as a malformed writer would produce it.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

void expect_error(const std::filesystem::path& path, const std::string& needle) {
  try {
    SafetensorsFile file(path);
    ADD_FAILURE() << "no error for " << path << " (expected one mentioning '" << needle << "')";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Safetensors, RoundTripDtypesShapesAndMetadata) {
  TempDir dir;
  std::vector<float> f(2 * 3 * 5);
  std::iota(f.begin(), f.end(), -7.5f);
  std::vector<uint16_t> bf(17, 0x3f80);
  std::vector<int64_t> i64 = {-1, 0, 1ll << 40};
  std::vector<uint8_t> u8 = {1, 2, 3};
  const float scalar = 3.25f;
  SafetensorsWriter w;
  w.add_f32("f", {2, 3, 5}, f);
  w.add("bf", StDtype::BF16, {17}, std::as_bytes(std::span(bf)));
  w.add("i64", StDtype::I64, {3}, std::as_bytes(std::span(i64)));
  w.add("u8", StDtype::U8, {1, 3}, std::as_bytes(std::span(u8)));
  w.add_f32("scalar", {}, std::span(&scalar, 1));
  w.add_f32("empty", {0, 4}, {});
  w.set_metadata("format", "pt");
  w.set_metadata("note", "é \"quoted\"");
  const auto path = dir / "t.safetensors";
  w.write(path);
  // Published by a rename: no temporary file is left beside it.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()), 1);

  // The layout the format fixes: u64 length, a JSON header padded to 8 bytes, the data.
  const std::string bytes = read_file_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(bytes.size(), 8 + n + f.size() * 4 + bf.size() * 2 + 3 * 8 + 3 + 4);

  SafetensorsFile file(path);
  ASSERT_EQ(file.tensors().size(), 6u);
  EXPECT_EQ(file.tensors()[0].name, "f");  // in data order
  EXPECT_EQ(file.metadata().at("note"), "é \"quoted\"");
  std::vector<float> back(f.size());
  file.read_f32("f", back);
  EXPECT_EQ(back, f);
  const auto& t = file.require_f32("f", std::vector<int64_t>{2, 3, 5});
  EXPECT_EQ(t.numel(), 30);
  const auto* b = file.find("bf");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->dtype, StDtype::BF16);
  EXPECT_EQ(std::memcmp(b->data.data(), bf.data(), bf.size() * 2), 0);
  const auto* l = file.find("i64");
  ASSERT_TRUE(l);
  int64_t big = 0;
  std::memcpy(&big, l->data.data() + 16, 8);
  EXPECT_EQ(big, 1ll << 40);
  EXPECT_EQ(file.find("scalar")->shape.size(), 0u);
  EXPECT_EQ(file.find("scalar")->numel(), 1);
  EXPECT_EQ(file.find("empty")->data.size(), 0u);
  EXPECT_EQ(file.find("nope"), nullptr);
  EXPECT_THROW(file.require_f32("f", std::vector<int64_t>{3, 2, 5}), Error);
  EXPECT_THROW(file.require_f32("bf", std::vector<int64_t>{17}), Error);
  std::vector<float> wrong(29);
  EXPECT_THROW(file.read_f32("f", wrong), Error);
}

TEST(Safetensors, WriterRejectsBadInput) {
  SafetensorsWriter w;
  std::vector<float> f(6);
  EXPECT_THROW(w.add_f32("x", {2, 2}, f), Error);  // 4 elements, 6 given
  w.add_f32("x", {2, 3}, f);
  EXPECT_THROW(w.add_f32("x", {6}, f), Error);  // twice
  EXPECT_THROW(w.add_f32("__metadata__", {6}, f), Error);
  EXPECT_THROW(w.add_f32("neg", {-1, -6}, f), Error);
}

TEST(Safetensors, MalformedFilesGiveClearErrors) {
  TempDir dir;
  const auto at = [&](const std::string& name, const std::string& bytes) { return write_file(dir / name, bytes); };
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  const std::string data8(8, '\0');

  expect_error(dir / "missing.safetensors", "cannot open");
  expect_error(at("short", "abc"), "shorter than the 8-byte header length");
  {
    std::string huge(8, '\xff');
    expect_error(at("huge", huge + "{}"), "above the format's limit");
  }
  {
    std::string len(8, '\0');
    len[0] = 100;  // 100 bytes of header, 2 present
    expect_error(at("past", len + "{}"), "runs past the end of the file");
  }
  expect_error(at("notjson", raw_file("{\"a\": ", "")), "not valid JSON");
  expect_error(at("array", raw_file("[1,2]", "")), "does not start with a JSON object");
  expect_error(at("dtype", raw_file(R"({"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", std::string(16, 0))),
               "unknown safetensors dtype 'F128'");
  expect_error(at("nodtype", raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", data8)), "has no dtype");
  expect_error(at("offsets", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[0,16]}})", data8)),
               "run past the data buffer");
  expect_error(at("reversed", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[8,0]}})", data8)),
               "end before they begin");
  expect_error(at("size", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[0,4]}})", data8)),
               "needs 8 bytes but data_offsets [0, 4] hold 4");
  expect_error(at("overlap", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data8)),
               "overlap");
  expect_error(at("negdim", raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8)),
               "non-negative integers");
  expect_error(at("overflow", raw_file(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", data8)),
               "overflows 64 bits");
  expect_error(at("negoffset", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[-8,0]}})", data8)),
               "data_offsets is not a pair");
  expect_error(at("meta", raw_file(R"({"__metadata__":{"step":3}})", "")), "value of 'step' is not a string");
  expect_error(at("dup", raw_file("{\"a\":{" + f32x2 + R"(,"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data8)),
               "names 'a' twice");
  // An empty header object and no data is a valid (empty) file.
  SafetensorsFile empty(at("empty", raw_file("{}", "")));
  EXPECT_TRUE(empty.tensors().empty());
}

}  // namespace
}  // namespace flashgpt

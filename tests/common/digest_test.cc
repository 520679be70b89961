// MD5, SHA-1 and SHA-256 against the published test vectors, and the file digests
// (streamed in chunks) against the string digests of the same bytes.
#include <flashgpt/digest.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace flashgpt {
namespace {

TEST(Digest, Md5KnownAnswers) {  // RFC 1321 appendix A.5
  EXPECT_EQ(md5_hex(std::string_view("")), "d41d8cd98f00b204e9800998ecf8427e");
  EXPECT_EQ(md5_hex(std::string_view("abc")), "900150983cd24fb0d6963f7d28e17f72");
  EXPECT_EQ(md5_hex(std::string_view("12345678901234567890123456789012345678901234567890123456789012345678901234567890")),
            "57edf4a22be3c955ac49da2e2107b67a");
}

TEST(Digest, Sha256KnownAnswers) {  // FIPS 180-4 examples
  EXPECT_EQ(sha256_hex(std::string_view("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex(std::string_view("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(std::string_view("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1'000'000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Digest, Sha1KnownAnswers) {
  EXPECT_EQ(sha1_hex(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  EXPECT_EQ(sha1_hex("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
  EXPECT_EQ(sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
}

TEST(Digest, FileHashesMatchStringHashes) {
  std::string bytes;
  for (int i = 0; i < 300'000; ++i) bytes.push_back(static_cast<char>(i * 7 + i / 251));
  const auto path = std::filesystem::temp_directory_path() / ("flashgpt_digest_" + std::to_string(std::random_device{}()));
  std::ofstream(path, std::ios::binary) << bytes;
  EXPECT_EQ(md5_hex_file(path), md5_hex(std::string_view(bytes)));
  EXPECT_EQ(sha256_hex_file(path), sha256_hex(std::string_view(bytes)));
  std::filesystem::remove(path);
  EXPECT_THROW(sha256_hex_file(path), Error);  // a missing file is an error naming it
}

}  // namespace
}  // namespace flashgpt

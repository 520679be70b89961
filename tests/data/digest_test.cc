#include <flashgpt/data.h>

#include <gtest/gtest.h>

#include "data/fixtures.h"

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

TEST(Digest, FileHashesMatchStringHashes) {
  testing::TempDir dir;
  std::string bytes;
  for (int i = 0; i < 300'000; ++i) bytes.push_back(static_cast<char>(i * 7 + i / 251));
  const auto path = testing::write_file(dir / "blob", bytes);
  EXPECT_EQ(md5_hex_file(path), md5_hex(std::string_view(bytes)));
  EXPECT_EQ(sha256_hex_file(path), sha256_hex(std::string_view(bytes)));
}

TEST(Crc32, KnownAnswerAndPieces) {
  EXPECT_EQ(crc32_update(0, "123456789", 9), 0xCBF43926u);
  const std::string text = "The quick brown fox jumps over the lazy dog";
  EXPECT_EQ(crc32_update(0, text.data(), text.size()), 0x414FA339u);
  const uint32_t first = crc32_update(0, text.data(), 13);
  EXPECT_EQ(crc32_update(first, text.data() + 13, text.size() - 13), 0x414FA339u);
}

}  // namespace
}  // namespace flashgpt

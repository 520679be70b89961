// Property test of parallel encoding: encode_ordinary_parallel (every thread count from 1
// to 16, chunks forced small so that seams fall everywhere) and encode_ordinary_batch give
// exactly encode_ordinary's ids, for all three encodings. encode_ordinary itself is compared
// with tiktoken on the same kind of documents in compare_tiktoken.py.
#include <flashgpt/tokenizer.h>

#include "common/test_support.h"
#include "tokenizer/seam_documents.h"

#include <gtest/gtest.h>

#include <map>
#include <random>

namespace flashgpt {
namespace {

const Tokenizer& tokenizer_of(const std::string& name) {
  static std::map<std::string, Tokenizer> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end()) {
    auto dir = testing::tokenizer_dir();
    if (!dir) throw std::runtime_error("no tokenizer rank files: set FLASHGPT_TOKENIZER_DIR");
    it = loaded.emplace(name, Tokenizer::load(name, *dir)).first;
  }
  return it->second;
}

class ParallelExact : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { FLASHGPT_REQUIRE_TOKENIZER_DIR(); }
};

TEST_P(ParallelExact, ParallelEqualsSerialAtEverySeam) {
  const Tokenizer& t = tokenizer_of(GetParam());
  std::mt19937_64 rng(2024);
  const size_t chunk_sizes[] = {1, 2, 3, 5, 8, 13, 64, 300};
  int failures = 0;
  for (int doc = 0; doc < 320 && failures < 5; ++doc) {
    std::string text = testing::seam_document(rng, doc % 8 == 0 ? 4000 : 400);
    auto serial = t.encode_ordinary(text);
    int threads = 1 + doc % 16;
    size_t chunk = chunk_sizes[rng() % std::size(chunk_sizes)];
    auto parallel = t.encode_ordinary_parallel(text, threads, InvalidUtf8::error, chunk);
    if (parallel != serial) {
      ++failures;
      ADD_FAILURE() << GetParam() << ": threads " << threads << ", chunk " << chunk << ", document "
                    << ::testing::PrintToString(text);
    }
  }
}

TEST_P(ParallelExact, ABlankLineAfterALongLine) {
  // The example: a long line, a blank line, a word, past the default 64 KiB chunk.
  const Tokenizer& t = tokenizer_of(GetParam());
  std::string text;
  while (text.size() < 200000) text += std::string(500, 'x') + " end.\n\nWord  \n" + "12 \r\n\r\nnext\n";
  auto serial = t.encode_ordinary(text);
  for (int threads : {2, 3, 16}) EXPECT_EQ(t.encode_ordinary_parallel(text, threads), serial) << threads;
}

TEST_P(ParallelExact, BatchEqualsSerial) {
  const Tokenizer& t = tokenizer_of(GetParam());
  std::mt19937_64 rng(7);
  std::vector<std::string> docs;
  for (int i = 0; i < 200; ++i) docs.push_back(testing::seam_document(rng, 600));
  std::vector<std::string_view> views(docs.begin(), docs.end());
  for (int threads : {1, 2, 5, 16}) {
    auto batch = t.encode_ordinary_batch(views, threads);
    ASSERT_EQ(batch.size(), docs.size());
    for (size_t i = 0; i < docs.size(); ++i) ASSERT_EQ(batch[i], t.encode_ordinary(docs[i])) << threads << " " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Encodings, ParallelExact, ::testing::Values("r50k_base", "cl100k_base", "o200k_base"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace flashgpt

#include <flashgpt/data_loader.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <thread>

#include "common/test_support.h"
#include "data/fixtures.h"

namespace flashgpt {
namespace {

using testing::TempDir;
using testing::write_file;

// A test-only encoder: one id per byte, <|endoftext|> = 256. It splits its batch over
// `threads` std::threads, as a real encoder would, so thread-count independence is tested.
TextEncoder byte_encoder() {
  TextEncoder e;
  e.name = "test_bytes";
  e.vocab_size = 257;
  e.end_of_text = 256;
  e.encode_batch = [](std::span<const std::string_view> texts, int threads) {
    std::vector<std::vector<TokenId>> out(texts.size());
    const size_t workers = threads > 0 ? static_cast<size_t>(threads) : 2;
    std::vector<std::thread> pool;
    for (size_t w = 0; w < workers; ++w) {
      pool.emplace_back([&, w] {
        for (size_t i = w; i < texts.size(); i += workers) {
          for (unsigned char c : texts[i]) out[i].push_back(c);
        }
      });
    }
    for (auto& t : pool) t.join();
    return out;
  };
  return e;
}

// The documents of a dataset split, decoded by the byte encoder.
std::vector<std::string> documents(const std::filesystem::path& dir, const char* split) {
  std::vector<std::string> docs;
  std::string current;
  for (const auto& path : shard_list(dir, split)) {
    const ShardView shard(path);  // outlives the loop (a temporary's tokens() would dangle)
    for (TokenId id : shard.tokens()) {
      if (id == 256) {
        docs.push_back(current);
        current.clear();
      } else {
        current.push_back(static_cast<char>(id));
      }
    }
  }
  EXPECT_TRUE(current.empty()) << "a document does not end with <|endoftext|>";
  return docs;
}

struct Corpus {
  std::vector<std::string> en, fr;
};

Corpus write_corpus(const TempDir& dir, const std::string& stem, int pairs) {
  Corpus c;
  std::string en, fr;
  for (int i = 0; i < pairs; ++i) {
    c.en.push_back("The sentence number " + std::to_string(i) + ".");
    c.fr.push_back("La phrase numéro " + std::to_string(i) + ".");
    en += c.en.back() + "\n";
    fr += c.fr.back() + "\n";
  }
  write_file(dir / (stem + ".en"), en);  // plain: the compressed paths are the reader tests' business
  write_file(dir / (stem + ".fr"), fr);
  return c;
}

PrepareConfig base_config(const TempDir& dir, const std::string& stem) {
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(dir / (stem + ".en")));
  config.eval_dir = dir / "eval";  // empty: no content check unless a test writes one
  config.out_dir = dir / "out";
  config.val_fraction = 0;
  config.progress = false;
  return config;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Prepare, OriginalRecipeTakesOneRandomSidePerPair) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 400);
  const PrepareSummary summary = data_prepare(base_config(dir, "train.toy.fr-en"), byte_encoder());
  const auto docs = documents(dir / "out", "train");
  ASSERT_EQ(docs.size(), 400u);
  int french = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    ASSERT_TRUE(docs[i] == corpus.en[i] || docs[i] == corpus.fr[i]) << docs[i];
    french += docs[i] == corpus.fr[i];
  }
  EXPECT_GT(french, 150);  // a fair coin: 200 +- 10 sigma
  EXPECT_LT(french, 250);
  EXPECT_EQ(summary.tokens_eot, 400u);
  EXPECT_EQ(summary.tokens_bilingual, 0u);
  uint64_t shard_tokens = 0;
  for (const auto& s : summary.train_shards) shard_tokens += s.tokens;
  EXPECT_EQ(shard_tokens, summary.tokens_en + summary.tokens_fr + summary.tokens_eot);
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / "summary.json"));
}

TEST(Prepare, SameSeedSameBytesWhateverTheThreadsAndBatches) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 1000);
  auto run = [&](int threads, size_t batch, uint64_t seed, const std::string& out) {
    PrepareConfig config = base_config(dir, "train.toy.fr-en");
    config.threads = threads;
    config.batch_documents = batch;
    config.seed = seed;
    config.bilingual_rate = 0.3;
    config.val_fraction = 0.1;
    config.shard_tokens = 5000;
    config.out_dir = dir / out;
    data_prepare(config, byte_encoder());
    std::string bytes;
    for (const char* split : {"train", "val"}) {
      for (const auto& p : shard_list(dir / out, split)) bytes += testing::read_file_bytes(p);
    }
    return bytes;
  };
  const std::string a = run(1, 7, 5, "a");
  EXPECT_EQ(run(3, 1000, 5, "b"), a);
  EXPECT_EQ(run(2, 64, 5, "c"), a);
  EXPECT_NE(run(2, 64, 6, "d"), a);
}

TEST(Prepare, BilingualDocumentsUseTheTemplatesInBothDirections) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 300);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 1.0;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  const auto docs = documents(dir / "out", "train");
  ASSERT_EQ(docs.size(), 300u);
  std::map<size_t, int> used;
  for (size_t i = 0; i < docs.size(); ++i) {
    bool matched = false;
    for (size_t t = 0; t < kBilingualTemplates.size(); ++t) {
      std::string expected(kBilingualTemplates[t]);
      expected.replace(expected.find("{en}"), 4, corpus.en[i]);
      expected.replace(expected.find("{fr}"), 4, corpus.fr[i]);
      if (docs[i] == expected) {
        ++used[t];
        matched = true;
      }
    }
    ASSERT_TRUE(matched) << docs[i];
  }
  EXPECT_EQ(used.size(), kBilingualTemplates.size());
  EXPECT_EQ(summary.tokens_en + summary.tokens_fr, 0u);
}

TEST(Prepare, HoldsOutAValidationSplitAndRollsShards) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 2000);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.val_fraction = 0.2;
  config.shard_tokens = 4000;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  const auto train = documents(dir / "out", "train"), val = documents(dir / "out", "val");
  EXPECT_EQ(train.size() + val.size(), 2000u);
  EXPECT_EQ(val.size(), summary.val_documents);
  EXPECT_GT(val.size(), 300u);
  EXPECT_LT(val.size(), 500u);
  ASSERT_GT(summary.train_shards.size(), 3u);
  for (size_t i = 0; i + 1 < summary.train_shards.size(); ++i) EXPECT_GE(summary.train_shards[i].tokens, 4000u);
  for (const auto& s : summary.train_shards) EXPECT_EQ(ShardView(s.path).header().payload_crc32, s.crc32);

  // The loader reads what prepare wrote: every window is a contiguous run of some shard.
  LoaderConfig loader_config;
  for (const auto& s : summary.train_shards) loader_config.shards.emplace_back(s.path);
  loader_config.context = 31;
  loader_config.batch = 4;
  DataLoader loader(loader_config);
  std::string all;
  for (const auto& s : summary.train_shards) {
    const ShardView shard(s.path);
    for (TokenId id : shard.tokens()) all.push_back(static_cast<char>(id == 256 ? '|' : id));
  }
  std::vector<TokenId> batch(4 * 32);
  loader.next_batch(batch);
  for (int b = 0; b < 4; ++b) {
    std::string window;
    for (int i = 0; i < 32; ++i) window.push_back(static_cast<char>(batch[b * 32 + i] == 256 ? '|' : batch[b * 32 + i]));
    EXPECT_NE(all.find(window), std::string::npos) << window;
  }
}

TEST(Prepare, SkipsAndCountsEmptyAndInvalidPairs) {
  TempDir dir;
  write_file(dir / "train.bad.fr-en.en", "Hello\n\nBad \xFF byte\nBye\n");
  write_file(dir / "train.bad.fr-en.fr", "Bonjour\nVide à gauche\nMauvais\n\n");
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(dir / "train.bad.fr-en.en"));
  config.out_dir = dir / "out";
  config.val_fraction = 0;
  config.progress = false;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  ASSERT_EQ(summary.corpora.size(), 1u);
  EXPECT_EQ(summary.corpora[0].read, 4u);
  EXPECT_EQ(summary.corpora[0].used, 1u);
  EXPECT_EQ(summary.corpora[0].skipped.at("empty side"), 2u);
  EXPECT_EQ(summary.corpora[0].skipped.at("invalid UTF-8"), 1u);
  const auto json = nlohmann::json::parse(prepare_summary_json(summary));
  EXPECT_EQ(json["read"], 4);
  EXPECT_EQ(json["skipped"]["empty side"], 2);
  EXPECT_EQ(json["tokens"]["end_of_text"], 1);
  config.bad_lines = BadLinePolicy::fail;
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("train.bad.fr-en.en:3: invalid UTF-8"),
            std::string::npos);
}

TEST(Prepare, MonolingualFilesBecomeDocuments) {
  TempDir dir;
  write_file(dir / "mono.toy.fr", "Première ligne\n\nDeuxième ligne\n");
  PrepareConfig config;
  config.mono.push_back(dir / "mono.toy.fr");
  config.out_dir = dir / "out";
  config.val_fraction = 0;
  config.progress = false;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  EXPECT_EQ(documents(dir / "out", "train"), (std::vector<std::string>{"Première ligne", "Deuxième ligne"}));
  EXPECT_EQ(summary.corpora[0].skipped.at("empty line"), 1u);
  EXPECT_GT(summary.tokens_fr, 0u);
  EXPECT_EQ(summary.tokens_en, 0u);
}

TEST(Prepare, RefusesNewstest2014ByName) {
  TempDir dir;
  write_corpus(dir, "newstest2014.fr-en", 5);
  const std::string message =
      error_of([&] { data_prepare(base_config(dir, "newstest2014.fr-en"), byte_encoder()); });
  EXPECT_NE(message.find("refusing to train on"), std::string::npos) << message;
  EXPECT_NE(message.find("evaluation set"), std::string::npos) << message;
}

TEST(Prepare, RefusesNewstest2014ByContentAndWarnsAboutDevSets) {
  TempDir dir;
  std::filesystem::create_directories(dir / "eval");
  write_file(dir / "eval" / "newstest2014.fr-en.en", "Spectacular Wingsuit Jump Over Bogota\nA test line\n");
  write_file(dir / "eval" / "newstest2014.fr-en.fr", "Spectaculaire saut au-dessus de Bogota\nUne ligne de test\n");
  write_file(dir / "eval" / "newstest2013.fr-en.en", "A dev line\n");
  write_file(dir / "eval" / "newstest2013.fr-en.fr", "Une ligne de dev\n");
  // A renamed copy of a test pair, with different spacing: still refused.
  write_file(dir / "train.leak.fr-en.en", "ok\nSpectacular  Wingsuit Jump Over Bogota \n");
  write_file(dir / "train.leak.fr-en.fr", "ok\nSpectaculaire saut au-dessus de\u00A0Bogota\n");
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(dir / "train.leak.fr-en.en"));
  config.eval_dir = dir / "eval";
  config.out_dir = dir / "out";
  config.progress = false;
  config.batch_documents = 1;  // the first pair is already in a finished shard when the second is refused
  config.shard_tokens = 1;
  const std::string message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("train.leak.fr-en.en:2: this pair is a newstest2014 pair"), std::string::npos) << message;
  EXPECT_TRUE(shard_list(dir / "out", "train").empty()) << "a failed run must not leave shards";

  // One side identical to a test sentence: dropped and counted. Dev overlap: kept, warned.
  write_file(dir / "train.near.fr-en.en", "A test line\nA dev line\nFresh text\n");
  write_file(dir / "train.near.fr-en.fr", "Autre chose\nAutre chose encore\nTexte neuf\n");
  write_file(dir / "newstest2013.fr-en.en", "x\n");
  write_file(dir / "newstest2013.fr-en.fr", "y\n");
  config.pairs = {pair_source_from_path(dir / "train.near.fr-en.en"),
                  pair_source_from_path(dir / "newstest2013.fr-en.en")};
  config.val_fraction = 0;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  EXPECT_EQ(summary.corpora[0].used, 2u);
  EXPECT_EQ(summary.corpora[0].skipped.at("a side identical to a newstest2014 sentence"), 1u);
  EXPECT_EQ(summary.dev_overlap, 1u);
  std::string warnings;
  for (const auto& w : summary.warnings) warnings += w + "\n";
  EXPECT_NE(warnings.find("newstest2013.fr-en.en is a WMT14 dev set"), std::string::npos) << warnings;
  EXPECT_NE(warnings.find("1 training pairs/lines have a side identical to a newstest2012/2013"), std::string::npos)
      << warnings;
}

TEST(Prepare, FindsTheTestSetAsTheWmtReleaseUnpacksIt) {
  TempDir dir;
  std::filesystem::create_directories(dir / "eval" / "test-full");
  write_file(dir / "eval" / "test-full" / "newstest2014-fren-src.en.sgm",
             "<srcset>\n<doc docid=\"1\">\n<seg id=\"1\">Spectacular Wingsuit Jump</seg>\n</doc>\n</srcset>\n");
  write_file(dir / "eval" / "test-full" / "newstest2014-fren-ref.fr.sgm",
             "<refset>\n<doc docid=\"1\">\n<seg id=\"1\">Saut spectaculaire</seg>\n</doc>\n</refset>\n");
  write_file(dir / "train.x.fr-en.en", "Spectacular Wingsuit Jump\n");
  write_file(dir / "train.x.fr-en.fr", "Saut spectaculaire\n");
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(dir / "train.x.fr-en.en"));
  config.eval_dir = dir / "eval";
  config.out_dir = dir / "out";
  config.progress = false;
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("is a newstest2014 pair"), std::string::npos);
  config.pairs = {pair_source_from_path(dir / "eval" / "test-full" / "newstest2014-fren-src.en.sgm")};
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("refusing to train on"), std::string::npos);
}

TEST(Prepare, WarnsWhenItCannotCheckContent) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 3);
  const PrepareSummary summary = data_prepare(base_config(dir, "train.toy.fr-en"), byte_encoder());
  ASSERT_FALSE(summary.warnings.empty());
  EXPECT_NE(summary.warnings[0].find("newstest2014.fr-en.{en,fr} not found"), std::string::npos);
}

// The real pipeline on a shared corpus: cl100k_base, the shared newstest2014 as the guard.
TEST(SharedData, PrepareNewstest2008To2011WithTheRealTokenizer) {
  const auto data = testing::shared_data_dir();
  const auto vocab = testing::tokenizer_dir();
  if (!data || !vocab) GTEST_SKIP() << "no shared data or tokenizer files";
  FLASHGPT_REQUIRE_COMPRESSION(xz);
  TempDir dir;
  const Tokenizer tokenizer = Tokenizer::load("cl100k_base", *vocab);
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(*data / "wmt14" / "train.newstest2008-2011.fr-en.en.xz"));
  config.eval_dir = *data / "wmt14";
  config.out_dir = dir / "out";
  config.val_fraction = 0.01;
  config.progress = false;
  const PrepareSummary summary = data_prepare(config, text_encoder_from(tokenizer));
  EXPECT_EQ(summary.corpora.at(0).read, 10570u);
  EXPECT_EQ(summary.documents + summary.val_documents, 10570u);
  EXPECT_TRUE(summary.warnings.empty()) << summary.warnings.at(0);

  // Every document decodes to one side of its pair, in order.
  PairReader reader(config.pairs[0]);
  TextPair pair;
  size_t checked = 0;
  const ShardView shard(summary.train_shards.at(0).path);
  EXPECT_EQ(shard.header().encoding, "cl100k_base");
  const auto tokens = shard.tokens();
  size_t begin = 0;
  std::vector<std::string> train_docs;
  for (size_t i = 0; i < tokens.size() && train_docs.size() < 200; ++i) {
    if (tokens[i] == tokenizer.end_of_text()) {
      train_docs.push_back(tokenizer.decode(tokens.subspan(begin, i - begin)));
      begin = i + 1;
    }
  }
  size_t doc = 0;
  while (doc < train_docs.size() && reader.next(pair)) {
    if (train_docs[doc] == pair.en || train_docs[doc] == pair.fr) {
      ++doc;
      ++checked;
    }
  }
  EXPECT_EQ(checked, train_docs.size());
}

}  // namespace
}  // namespace flashgpt

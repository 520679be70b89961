#include <flashgpt/data_loader.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/tokenizer.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/file.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <functional>
#include <map>
#include <memory>
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
  std::filesystem::create_directories(config.eval_dir);
  config.test_set_check = TestSetCheck::off;
  config.out_dir = dir / "out";
  config.val_fraction = 0;
  config.progress = false;
  return config;
}

// `config` prepared with each (threads, documents per batch, seed) into DIR/a, b, ...: the
// same seed gives the same train and val shards byte for byte whatever the threads and
// batches, another seed other bytes.
void expect_seed_alone_decides_the_bytes(const TempDir& dir, PrepareConfig config) {
  auto run = [&](int threads, size_t batch, uint64_t seed, const std::string& out) {
    config.threads = threads;
    config.batch_documents = batch;
    config.seed = seed;
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

using testing::error_of;

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
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 0.3;
  config.val_fraction = 0.1;
  config.shard_tokens = 5000;
  expect_seed_alone_decides_the_bytes(dir, config);
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

TEST(MultiPair, DocumentBytesAreTheKShotPromptFormat) {
  const std::vector<TextPair> pairs = {{"Hello.", "Bonjour.", 1}, {"Thank you", "Merci", 2}, {"A", "B", 3}};
  EXPECT_EQ(multi_pair_document(pairs, PairDirection::en_fr),
            "English: Hello.\nFrench: Bonjour.\n\nEnglish: Thank you\nFrench: Merci\n\nEnglish: A\nFrench: B");
  EXPECT_EQ(multi_pair_document(pairs, PairDirection::fr_en),
            "French: Bonjour.\nEnglish: Hello.\n\nFrench: Merci\nEnglish: Thank you\n\nFrench: B\nEnglish: A");
  EXPECT_EQ(multi_pair_document(std::span(pairs).first(1), PairDirection::en_fr), "English: Hello.\nFrench: Bonjour.");
  EXPECT_EQ(multi_pair_document({}, PairDirection::en_fr), "");
}

// The training pairs as multi-pair documents: which pairs (by number), in which direction.
struct ParsedDocument {
  PairDirection direction;
  std::vector<int> pairs;
};
ParsedDocument parse_multi_pair(const std::string& doc, const Corpus& corpus) {
  ParsedDocument parsed;
  parsed.direction = doc.starts_with("English: ") ? PairDirection::en_fr : PairDirection::fr_en;
  // Numbers of the pairs, recovered from "number N." and rebuilt byte for byte.
  std::vector<TextPair> pairs;
  size_t at = 0;
  while ((at = doc.find("The sentence number ", at)) != std::string::npos) {
    at += 20;
    const int n = std::stoi(doc.substr(at));
    parsed.pairs.push_back(n);
    pairs.push_back({corpus.en[n], corpus.fr[n], 0});
  }
  EXPECT_EQ(doc, multi_pair_document(pairs, parsed.direction)) << "not in the prompt format";
  return parsed;
}

TEST(MultiPair, PrepareGroupsConsecutivePairsOneDirectionPerDocument) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 403);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 1.0;
  config.pairs_per_document = 4;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  const auto docs = documents(dir / "out", "train");
  ASSERT_EQ(docs.size(), 101u);  // 100 of 4 pairs, the last of 3
  std::vector<int> order;
  int en_fr = 0;
  for (const auto& doc : docs) {
    const ParsedDocument parsed = parse_multi_pair(doc, corpus);
    EXPECT_LE(parsed.pairs.size(), 4u);
    en_fr += parsed.direction == PairDirection::en_fr;
    order.insert(order.end(), parsed.pairs.begin(), parsed.pairs.end());
  }
  ASSERT_EQ(order.size(), 403u);
  for (int i = 0; i < 403; ++i) EXPECT_EQ(order[i], i);  // file order, every pair once
  EXPECT_GT(en_fr, 30);  // a fair coin per document: 50.5 +- 4 sigma
  EXPECT_LT(en_fr, 71);
  EXPECT_EQ(summary.corpora[0].used, 403u);
  EXPECT_EQ(summary.tokens_en + summary.tokens_fr, 0u);
}

TEST(MultiPair, DocumentsStopBeforeTheByteLimit) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 300);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 1.0;
  config.pairs_per_document = 1000;
  config.document_bytes = 300;
  data_prepare(config, byte_encoder());
  const auto docs = documents(dir / "out", "train");
  size_t pairs = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    const ParsedDocument parsed = parse_multi_pair(docs[i], corpus);
    pairs += parsed.pairs.size();
    EXPECT_LE(docs[i].size(), 300u);
    if (i + 1 < docs.size()) {  // full: the next pair would not have fitted
      const int next = parse_multi_pair(docs[i + 1], corpus).pairs.front();
      EXPECT_GT(docs[i].size() + 2 + 18 + corpus.en[next].size() + corpus.fr[next].size(), 300u);
    }
  }
  EXPECT_EQ(pairs, 300u);
  EXPECT_GT(docs.size(), 60u);  // about 70 bytes a pair: 4 pairs a document
  EXPECT_LT(docs.size(), 110u);

  // A pair longer than the limit alone is still a document.
  write_file(dir / "train.long.fr-en.en", std::string(400, 'a') + "\nshort\n");
  write_file(dir / "train.long.fr-en.fr", std::string(400, 'b') + "\ncourt\n");
  config.pairs = {pair_source_from_path(dir / "train.long.fr-en.en")};
  data_prepare(config, byte_encoder());
  const auto long_docs = documents(dir / "out", "train");
  ASSERT_EQ(long_docs.size(), 2u);
  EXPECT_GT(long_docs[0].size(), 800u);
}

TEST(MultiPair, SharesOfSinglePairAndMonolingualDocuments) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 2000);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 0.75;
  config.pairs_per_document = 8;
  config.single_pair_share = 0.2;
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  int mono = 0, single = 0, multi = 0;
  for (const auto& doc : documents(dir / "out", "train")) {
    if (doc.find('\n') == std::string::npos) {
      ++mono;  // one side, as the original recipe has it
    } else if (doc.find("\n\n") == std::string::npos && !doc.starts_with("English: ") && !doc.starts_with("French: ")) {
      ++single;  // "{en}\nIn French: {fr}" and "{fr}\nEn anglais : {en}"
    } else {
      multi += static_cast<int>(parse_multi_pair(doc, corpus).pairs.size());
    }
  }
  // Of 2000 pairs: 500 monolingual, 300 single-pair (half of them in the two templates
  // counted here), 1200 in multi-pair documents; bounds at about 5 sigma.
  EXPECT_GT(mono, 400);
  EXPECT_LT(mono, 600);
  EXPECT_GT(single, 100);
  EXPECT_LT(single, 210);
  EXPECT_GT(multi, 1000);
  EXPECT_LT(multi, 1400);
  EXPECT_GT(summary.tokens_en, 0u);
  EXPECT_GT(summary.tokens_fr, 0u);
}

TEST(MultiPair, ShuffledOrderAndRepetitionWeights) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 500);
  write_corpus(dir, "train.news.fr-en", 100);  // the same sentences: told apart by corpus order below
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.pairs.push_back(pair_source_from_path(dir / "train.news.fr-en.en"));
  config.bilingual_rate = 1.0;
  config.pairs_per_document = 5;
  config.pair_order = PairOrder::shuffled;
  config.weights = {{"train.news.fr-en", 2.5}};
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  ASSERT_EQ(summary.corpora.size(), 2u);
  EXPECT_EQ(summary.corpora[0].used, 500u);
  EXPECT_DOUBLE_EQ(summary.corpora[1].repeat, 2.5);
  EXPECT_GT(summary.corpora[1].used, 230u);  // 200 + Binomial(100, 0.5)
  EXPECT_LT(summary.corpora[1].used, 270u);
  std::vector<int> first_corpus;
  std::map<int, int> second_corpus;
  uint64_t seen = 0;
  for (const auto& doc : documents(dir / "out", "train")) {
    for (int n : parse_multi_pair(doc, corpus).pairs) {
      if (seen++ < 500) {
        first_corpus.push_back(n);
      } else {
        ++second_corpus[n];
      }
    }
  }
  ASSERT_EQ(first_corpus.size(), 500u);
  std::vector<int> sorted = first_corpus;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 500; ++i) ASSERT_EQ(sorted[i], i);  // a permutation: every pair once
  int in_place = 0;
  for (int i = 0; i < 500; ++i) in_place += first_corpus[i] == i;
  EXPECT_LT(in_place, 10);
  ASSERT_EQ(second_corpus.size(), 100u);
  for (const auto& [n, count] : second_corpus) {
    EXPECT_GE(count, 2) << n;
    EXPECT_LE(count, 3) << n;
  }
}

TEST(MultiPair, SameSeedSameBytesWhateverTheThreadsAndBatches) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 1000);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.bilingual_rate = 0.9;
  config.pairs_per_document = 6;
  config.document_bytes = 250;
  config.single_pair_share = 0.1;
  config.pair_order = PairOrder::shuffled;
  config.weights = {{"train.toy.fr-en", 1.3}};
  config.val_fraction = 0.1;
  config.shard_tokens = 5000;
  expect_seed_alone_decides_the_bytes(dir, config);
}

TEST(MultiPair, ValidationSplitFromTheDevSetInThePromptFormat) {
  TempDir dir;
  const Corpus corpus = write_corpus(dir, "train.toy.fr-en", 50);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  write_corpus(dir, "eval/newstest2013.fr-en", 9);
  config.bilingual_rate = 1.0;
  config.pairs_per_document = 4;
  config.val_set = "newstest2013";
  const PrepareSummary summary = data_prepare(config, byte_encoder());
  EXPECT_EQ(documents(dir / "out", "train").size(), 13u);
  const auto val = documents(dir / "out", "val");
  ASSERT_EQ(val.size(), 6u);  // 4 + 4 + 1 pairs in each direction
  for (size_t i = 0; i < val.size(); ++i) {
    const ParsedDocument parsed = parse_multi_pair(val[i], corpus);
    EXPECT_EQ(parsed.direction, i < 3 ? PairDirection::en_fr : PairDirection::fr_en);
    EXPECT_EQ(parsed.pairs.front(), static_cast<int>(i % 3) * 4);
  }
  EXPECT_EQ(summary.val_documents, 6u);
  ASSERT_EQ(summary.corpora.size(), 2u);
  EXPECT_EQ(summary.corpora[1].name, "newstest2013.fr-en (validation)");
  EXPECT_EQ(summary.corpora[1].used, 18u);
}

TEST(MultiPair, OptionsAreChecked) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 5);
  const PrepareConfig good = base_config(dir, "train.toy.fr-en");
  auto message = [&](const std::function<void(PrepareConfig&)>& change) {
    PrepareConfig config = good;
    change(config);
    return error_of([&] { data_prepare(config, byte_encoder()); });
  };
  EXPECT_NE(message([](auto& c) { c.pairs_per_document = 0; }).find("pairs per document 0 is not in [1, 100000]"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.single_pair_share = 0.5; }).find("give --pairs-per-document above 1"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.document_bytes = 100; }).find("give --pairs-per-document above 1"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) {
              c.pairs_per_document = 2;
              c.single_pair_share = 1.5;
            }).find("single-pair share 1.5 is not in [0, 1]"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.weights = {{"train.nope.fr-en", 2}}; })
                .find("corpus weight train.nope.fr-en=2: no input corpus has that name (inputs: train.toy.fr-en)"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.weights = {{"train.toy.fr-en", 2}, {"train.toy.fr-en", 3}}; })
                .find("weighted twice"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.weights = {{"train.toy.fr-en", 0}}; }).find("is not in (0, 100]"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.val_set = "newstest2014"; }).find("never a validation set"), std::string::npos);
  EXPECT_NE(message([](auto& c) {
              c.val_set = "newstest2013";
              c.val_fraction = 0.1;
            }).find("give --val-fraction 0"),
            std::string::npos);
  EXPECT_NE(message([](auto& c) { c.val_set = "newstest2013"; }).find("newstest2013.fr-en.{en,fr} not found"),
            std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));

  EXPECT_EQ(corpus_weight_from_text("train.a=b.fr-en=2.5").corpus, "train.a=b.fr-en");
  EXPECT_DOUBLE_EQ(corpus_weight_from_text("x=2.5").repeat, 2.5);
  for (const char* bad : {"x", "=2", "x=", "x=two", "x=2x", "x=-1", "x=0", "x=101", "x=nan"}) {
    EXPECT_NE(error_of([&] { corpus_weight_from_text(bad); }), "") << bad;
  }
  EXPECT_EQ(pair_order_from_name("shuffled"), PairOrder::shuffled);
  EXPECT_NE(error_of([] { pair_order_from_name("random"); }).find("choose file or shuffled"), std::string::npos);
}

TEST(MultiPair, StillRefusesTheTestSet) {
  TempDir dir;
  std::filesystem::create_directories(dir / "eval");
  write_file(dir / "eval" / "newstest2014.fr-en.en", "Spectacular Wingsuit Jump Over Bogota\n");
  write_file(dir / "eval" / "newstest2014.fr-en.fr", "Spectaculaire saut au-dessus de Bogota\n");
  write_file(dir / "train.leak.fr-en.en", "ok\nSpectacular Wingsuit Jump Over Bogota\n");
  write_file(dir / "train.leak.fr-en.fr", "ok\nSpectaculaire saut au-dessus de Bogota\n");
  PrepareConfig config;
  config.pairs.push_back(pair_source_from_path(dir / "train.leak.fr-en.en"));
  config.eval_dir = dir / "eval";
  config.out_dir = dir / "out";
  config.progress = false;
  config.bilingual_rate = 1.0;
  config.pairs_per_document = 8;
  config.pair_order = PairOrder::shuffled;
  config.weights = {{"train.leak.fr-en", 3}};
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("this pair is a newstest2014 pair"),
            std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
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
  config.test_set_check = TestSetCheck::off;
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
  config.test_set_check = TestSetCheck::off;
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
  EXPECT_FALSE(std::filesystem::exists(dir / "out")) << "a failed run must not leave shards";

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

TEST(Prepare, WarnsWhenItCannotCheckContent) {  // only when asked to go unchecked
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 3);
  const PrepareSummary summary = data_prepare(base_config(dir, "train.toy.fr-en"), byte_encoder());
  ASSERT_FALSE(summary.warnings.empty());
  EXPECT_NE(summary.warnings[0].find("newstest2014.fr-en.{en,fr} not found"), std::string::npos);
}

// ---------------------------------------------------------------------------------------
// Publishing: OUT is replaced whole or left alone.

// Every file of a directory with its bytes, to compare a dataset before and after a run.
std::map<std::string, std::string> snapshot(const std::filesystem::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    files[e.path().filename().string()] = testing::read_file_bytes(e.path());
  }
  return files;
}

// Names in `dir` other than the inputs the tests write: temporary directories and the
// like that a run left behind.
std::vector<std::string> leftovers(const std::filesystem::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp") != std::string::npos || name.find(".old") != std::string::npos) out.push_back(name);
  }
  return out;
}

// The byte encoder, calling `hook(batch number)` before each batch.
TextEncoder hooked_encoder(std::function<void(int)> hook) {
  TextEncoder e = byte_encoder();
  auto inner = e.encode_batch;
  auto calls = std::make_shared<int>(0);
  e.encode_batch = [inner, hook, calls](std::span<const std::string_view> texts, int threads) {
    hook((*calls)++);
    return inner(texts, threads);
  };
  return e;
}

TEST(PreparePublish, AFailedRunLeavesThePreviousDatasetUntouched) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 300);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.shard_tokens = 2000;
  data_prepare(config, byte_encoder());
  const auto before = snapshot(dir / "out");
  ASSERT_GT(before.size(), 2u);
  config.batch_documents = 50;
  config.seed = 99;  // a different dataset, were it to be written
  const std::string message = error_of([&] {
    data_prepare(config, hooked_encoder([](int batch) {
                   if (batch == 2) throw Error("encoder failed on purpose");
                 }));
  });
  EXPECT_NE(message.find("encoder failed on purpose"), std::string::npos) << message;
  EXPECT_EQ(snapshot(dir / "out"), before);
  EXPECT_EQ(leftovers(dir.path()), std::vector<std::string>{});
}

TEST(PreparePublish, SigintAndSigtermLeaveThePreviousDatasetAndNoTemporaryDirectory) {
  for (const int signal : {SIGINT, SIGTERM}) {
    TempDir dir;
    write_corpus(dir, "train.toy.fr-en", 300);
    PrepareConfig config = base_config(dir, "train.toy.fr-en");
    data_prepare(config, byte_encoder());
    const auto before = snapshot(dir / "out");
    config.batch_documents = 20;
    config.seed = 7;
    config.handle_signals = true;
    const std::string message = error_of([&] {
      data_prepare(config, hooked_encoder([signal](int batch) {
                     if (batch == 3) std::raise(signal);  // as Ctrl-C or kill would, mid-run
                   }));
    });
    EXPECT_NE(message.find("interrupted by SIG"), std::string::npos) << message;
    EXPECT_EQ(snapshot(dir / "out"), before);
    EXPECT_EQ(leftovers(dir.path()), std::vector<std::string>{});
    // The handlers are gone after the run: the default action is back.
    struct sigaction now {};
    sigaction(signal, nullptr, &now);
    EXPECT_EQ(now.sa_handler, SIG_DFL);
  }
}

TEST(PreparePublish, ReplacesThePreviousDatasetWhole) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 400);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.shard_tokens = 1000;
  const auto many = data_prepare(config, byte_encoder());
  ASSERT_GT(many.train_shards.size(), 3u);
  config.shard_tokens = 1'000'000;
  const auto one = data_prepare(config, byte_encoder());
  ASSERT_EQ(one.train_shards.size(), 1u);
  // No shard of the first run is mixed into the second.
  EXPECT_EQ(shard_list(dir / "out", "train").size(), 1u);
  EXPECT_EQ(dataset_shards(dir / "out", "train"), std::vector<std::filesystem::path>{one.train_shards[0].path});
  EXPECT_EQ(documents(dir / "out", "train").size(), 400u);
  EXPECT_EQ(leftovers(dir.path()), std::vector<std::string>{});
}

TEST(PreparePublish, NeverDeletesFilesItDidNotWrite) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 20);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  std::filesystem::create_directories(dir / "out");
  write_file(dir / "out" / "notes.txt", "my notes");
  write_file(dir / "out" / "train_000000.bin", "not a shard, but named like one");
  std::string message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("holds 'notes.txt', which `data prepare` did not write"), std::string::npos) << message;
  EXPECT_EQ(testing::read_file_bytes(dir / "out" / "notes.txt"), "my notes");
  EXPECT_EQ(testing::read_file_bytes(dir / "out" / "train_000000.bin"), "not a shard, but named like one");
  EXPECT_EQ(leftovers(dir.path()), std::vector<std::string>{});
  // Only files named like a dataset's, but no summary.json to say they are one: refused too.
  std::filesystem::remove(dir / "out" / "notes.txt");
  message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("is not a dataset that `data prepare` published"), std::string::npos) << message;
  EXPECT_EQ(testing::read_file_bytes(dir / "out" / "train_000000.bin"), "not a shard, but named like one");
  // An empty directory the user made is fine to fill.
  std::filesystem::remove_all(dir / "out");
  std::filesystem::create_directories(dir / "out");
  data_prepare(config, byte_encoder());
  EXPECT_EQ(documents(dir / "out", "train").size(), 20u);
}

TEST(PreparePublish, ASecondRunIntoTheSameDirectoryIsRefusedWhileTheFirstHoldsTheLock) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 20);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  data_prepare(config, byte_encoder());
  const auto before = snapshot(dir / "out");
  // Another process's run, as far as flock is concerned: its own open file description.
  const int fd = ::open((dir / ".out.lock").c_str(), O_RDWR | O_CREAT, 0666);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  const std::string message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("another `data prepare` is writing"), std::string::npos) << message;
  EXPECT_EQ(snapshot(dir / "out"), before);
  ::close(fd);
  // A run started while the first one was in progress, from another thread: exactly one wins.
  std::atomic<int> refused = 0, done = 0;
  config.batch_documents = 1;
  auto slow = hooked_encoder([](int) { std::this_thread::sleep_for(std::chrono::milliseconds(5)); });
  std::vector<std::thread> runs;
  for (int i = 0; i < 2; ++i) {
    runs.emplace_back([&] {
      try {
        data_prepare(config, slow);
        ++done;
      } catch (const Error& e) {
        if (std::string(e.what()).find("another `data prepare`") != std::string::npos) ++refused;
      }
    });
  }
  for (auto& t : runs) t.join();
  EXPECT_EQ(done + refused, 2);
  EXPECT_GE(done.load(), 1);
  EXPECT_EQ(documents(dir / "out", "train").size(), 20u);
}

TEST(PreparePublish, ClearsTheTemporaryDirectoryOfAKilledRun) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 20);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  std::filesystem::create_directories(dir / ".out.tmp-999999");
  write_file(dir / ".out.tmp-999999" / "train_000000.bin.tmp", "half a shard");
  data_prepare(config, byte_encoder());
  EXPECT_EQ(leftovers(dir.path()), std::vector<std::string>{});
  EXPECT_EQ(documents(dir / "out", "train").size(), 20u);
}

TEST(PreparePublish, ReadersRefuseADirectoryWithoutSummary) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 50);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.val_fraction = 0.2;
  config.shard_tokens = 500;
  const auto summary = data_prepare(config, byte_encoder());
  EXPECT_EQ(dataset_shards(dir / "out", "train").size(), summary.train_shards.size());
  EXPECT_EQ(dataset_shards(dir / "out", "val").size(), summary.val_shards.size());
  // A shard that summary.json does not list (copied in by hand, or left by another run).
  std::filesystem::copy_file(summary.train_shards[0].path, dir / "out" / "train_000999.bin");
  std::string message = error_of([&] { dataset_shards(dir / "out", "train"); });
  EXPECT_NE(message.find("are not the"), std::string::npos) << message;
  std::filesystem::remove(dir / "out" / "train_000999.bin");
  std::filesystem::remove(dir / "out" / "summary.json");
  message = error_of([&] { dataset_shards(dir / "out", "train"); });
  EXPECT_NE(message.find("has no summary.json"), std::string::npos) << message;
  EXPECT_NE(error_of([&] { dataset_shards(dir / "missing", "train"); }).find("does not exist"), std::string::npos);
}

TEST(PrepareEvalDir, MissingUnreadableOrWithoutTheTestSetIsAnError) {
  TempDir dir;
  write_corpus(dir, "train.toy.fr-en", 5);
  PrepareConfig config = base_config(dir, "train.toy.fr-en");
  config.test_set_check = TestSetCheck::required;
  config.eval_dir = dir / "evla";  // a typo
  std::string message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("evaluation directory"), std::string::npos) << message;
  EXPECT_NE(message.find("evla does not exist"), std::string::npos) << message;
  config.eval_dir = dir / "train.toy.fr-en.en";
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("is not a directory"), std::string::npos);
  config.eval_dir = dir / "eval";  // exists, but holds no newstest2014
  message = error_of([&] { data_prepare(config, byte_encoder()); });
  EXPECT_NE(message.find("newstest2014.fr-en.{en,fr} not found in the evaluation directory"), std::string::npos)
      << message;
  config.eval_dir.clear();
  EXPECT_NE(error_of([&] { data_prepare(config, byte_encoder()); }).find("no evaluation directory given"),
            std::string::npos);
  if (::geteuid() != 0) {  // root reads anything
    std::filesystem::create_directories(dir / "locked");
    std::filesystem::permissions(dir / "locked", std::filesystem::perms::none);
    config.eval_dir = dir / "locked";
    message = error_of([&] { data_prepare(config, byte_encoder()); });
    std::filesystem::permissions(dir / "locked", std::filesystem::perms::owner_all);
    EXPECT_NE(message.find("cannot be read"), std::string::npos) << message;
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
}

// The real pipeline on a shared corpus: cl100k_base, the shared newstest2014 as the guard.
TEST(SharedData, PrepareNewstest2008To2011WithTheRealTokenizer) {
  FLASHGPT_REQUIRE_SHARED_DATA();
  FLASHGPT_REQUIRE_TOKENIZER_DIR();
  const auto data = testing::shared_data_dir();
  const auto vocab = testing::tokenizer_dir();
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

// prepare: parallel and monolingual corpora -> documents -> train/val token shards.
//
// Invariant: everything prepare writes depends on the seed and the inputs only, never on
// the thread count: random choices are drawn from Philox keyed by the seed and the index of
// the document, pair, corpus or pass they are for.
#pragma once

#include <flashgpt/data_reader.h>
#include <flashgpt/tokenizer.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

// What prepare needs of a tokenizer. From the real one: text_encoder_from(tokenizer).
struct TextEncoder {
  std::string name;
  uint32_t vocab_size = 0;
  TokenId end_of_text = 0;
  // Encodes each text (no special tokens); the result is in input order and must not
  // depend on `threads`.
  std::function<std::vector<std::vector<TokenId>>(std::span<const std::string_view> texts, int threads)> encode_batch;
};
TextEncoder text_encoder_from(const Tokenizer& tokenizer);

// Whether the training text must be checked against newstest2014 (fail closed: a
// missing or unreadable eval_dir, or one without newstest2014, is an error), or may go
// unchecked (a warning says so).
enum class TestSetCheck { required, off };

// The order a parallel corpus's pairs are used in: as the file gives them, or a seeded
// permutation of the whole corpus (one per repetition), so that the pairs of a multi-pair
// document are unrelated sentences, as `eval translate`'s demonstrations are.
enum class PairOrder { file, shuffled };
PairOrder pair_order_from_name(std::string_view name);  // "file" or "shuffled"; throws naming the choices

// How often a corpus is used: `repeat` 3 reads it three times, 1.5 once and then each
// pair (or line) again with probability 0.5; each pass draws its own documents.
struct CorpusWeight {
  std::string corpus;  // a corpus name as the summary lists it (train.multi30k.fr-en, mono.x.en.xz)
  double repeat = 1.0;
};
// "NAME=REPEAT" (REPEAT in (0, 100]); throws naming the problem.
CorpusWeight corpus_weight_from_text(std::string_view text);

struct PrepareConfig {
  std::vector<PairSource> pairs;                 // parallel corpora
  std::vector<std::filesystem::path> mono;       // monolingual files, one text per line
  std::filesystem::path eval_dir;                // where newstest2012/13/14 are looked up
  TestSetCheck test_set_check = TestSetCheck::required;
  std::filesystem::path out_dir;
  uint64_t seed = 1234;
  int threads = 0;                               // 0: all cores
  // The original recipe is bilingual_rate = 0: each pair contributes its English or its
  // French side, chosen at random. With rate r, a pair becomes a bilingual document with
  // probability r (a template below, direction at random) and a monolingual one otherwise.
  double bilingual_rate = 0.0;
  // Multi-pair documents (pairs_per_document > 1): the bilingual pairs are grouped into
  // documents of up to pairs_per_document pairs, one direction per document (drawn at
  // random, so both directions across documents), in exactly the K-shot prompt format of
  // `eval translate` (multi_pair_document). A document stops growing before its text
  // would pass document_bytes (0: no limit; cl100k_base spends about 4.2 bytes per token
  // on this text, so 2000 bytes fill about 480 tokens). single_pair_share of the bilingual
  // pairs stay single-pair documents in the four templates below. Pairs are grouped in
  // `pair_order`, never across corpora.
  int64_t pairs_per_document = 1;
  uint64_t document_bytes = 0;
  double single_pair_share = 0.0;
  PairOrder pair_order = PairOrder::file;
  std::vector<CorpusWeight> weights;             // repetitions per corpus (others: 1)
  double val_fraction = 0.005;                   // documents held out for validation
  // "newstest2012" or "newstest2013": the validation split is that dev set's pairs as
  // multi-pair documents in the prompt format, both directions (what `eval translate`
  // prompts look like, for checkpoint selection), instead of held-out training documents
  // (val_fraction must then be 0). Empty: none.
  std::string val_set;
  uint64_t shard_tokens = 100'000'000;           // tokens per shard (the last one is shorter)
  BadLinePolicy bad_lines = BadLinePolicy::skip;
  size_t batch_documents = 16384;                // documents tokenized per batch
  Prefetch prefetch = Prefetch::yes;             // decode input files on their own threads
  bool progress = true;                          // progress lines on stderr
  // SIGINT/SIGTERM stop the run cleanly (handlers installed for its duration): the
  // temporary directory is removed and OUT is left as it was.
  bool handle_signals = false;
};

// Bilingual templates: {en} and {fr} are replaced by the sentences.
inline constexpr std::array<std::string_view, 4> kBilingualTemplates = {
    "English: {en}\nFrench: {fr}", "French: {fr}\nEnglish: {en}",
    "{en}\nIn French: {fr}", "{fr}\nEn anglais : {en}"};

// One direction of a multi-pair document.
enum class PairDirection { en_fr, fr_en };

// A multi-pair document: for en_fr "English: {en_1}\nFrench: {fr_1}\n\nEnglish: {en_2}\n
// French: {fr_2}" and so on, fr_en with the languages swapped: `eval translate`'s K-shot
// prompt for the last pair (translate_prompt) followed by " " and that pair's translation.
std::string multi_pair_document(std::span<const TextPair> pairs, PairDirection direction);

struct ShardInfo {
  std::string path;
  uint64_t tokens = 0;
  uint32_t crc32 = 0;
};

struct PrepareSummary {
  struct Corpus {
    std::string name;
    uint64_t read = 0, used = 0;  // used: pairs (lines) that went into documents, repetitions included
    double repeat = 1.0;
    std::map<std::string, uint64_t> skipped;  // reason -> count
  };
  std::vector<Corpus> corpora;
  uint64_t documents = 0, val_documents = 0;
  uint64_t tokens_en = 0, tokens_fr = 0, tokens_bilingual = 0, tokens_eot = 0;
  uint64_t dev_overlap = 0;  // pairs with a side identical to a newstest2012/2013 line (kept, warned)
  std::vector<ShardInfo> train_shards, val_shards;
  uint64_t raw_bytes = 0;
  double seconds_read = 0, seconds_tokenize = 0, seconds_write = 0, seconds_total = 0;
  std::vector<std::string> warnings;
};

// Runs the pipeline and publishes OUT/train_NNNNNN.bin, OUT/val_NNNNNN.bin and
// OUT/summary.json. OUT is never half-written: the dataset is built in a temporary
// sibling directory (.NAME.tmp-PID, under the lock file .NAME.lock, so a second run into
// the same OUT fails at once) and swapped in by a rename; the previous dataset is removed
// only after. summary.json, written last, is the commit record readers require. A
// directory holding files prepare did not write is refused, never emptied. Refuses (throws) newstest2014 as an input, by file name or by content
// (a pair identical to a newstest2014 pair); drops single lines identical to a
// newstest2014 line, counting them; warns about newstest2012/2013.
PrepareSummary data_prepare(const PrepareConfig& config, const TextEncoder& encoder);
std::string prepare_summary_json(const PrepareSummary& summary);

// The default inputs: every train.* pair in DATA/wmt14 and DATA/extra.
std::vector<PairSource> default_pair_sources(const std::filesystem::path& data_dir);
// FLASHGPT_DATA_DIR, else ../shared/data from the working directory; empty if neither exists.
std::filesystem::path data_dir_default();

}  // namespace flashgpt

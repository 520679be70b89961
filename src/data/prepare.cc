// prepare: parallel and monolingual corpora -> documents -> token shards.
//
// The pipeline runs in batches: read and build up to `batch_documents` documents (the
// calling thread), encode them (a worker thread and the encoder's threads, overlapping
// the reading of the next batch), append them in order to the train or val shard.
// Every random choice for document d (side, template, held out or not) comes from Philox
// counter (d, kPrepareStream) under the seed; with multi-pair documents a pair's choices
// come from counter (pair index, kPairStream), and a corpus's order and repetitions from
// their own streams keyed by (corpus, pass). So the output depends on the seed and the
// inputs, never on the thread count or the batch size.
#include <flashgpt/atomic_file.h>
#include <flashgpt/data_loader.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_shard.h>
#include <flashgpt/error.h>
#include <flashgpt/philox.h>
#include <flashgpt/unicode.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

namespace flashgpt {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kPrepareStream = 0x70726570;  // "prep"

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double unit_interval(uint32_t word) { return static_cast<double>(word) * (1.0 / 4294967296.0); }

enum class DocKind { en, fr, bilingual };

struct Document {
  std::string text;
  DocKind kind;
  bool val;
};

// The hash of a line after whitespace normalisation; most lines are already normal, and
// those skip the copy.
uint64_t line_hash(std::string_view text) {
  if (text_is_whitespace_normalized(text)) return std::hash<std::string_view>{}(text);
  return std::hash<std::string_view>{}(text_normalize_whitespace(text));
}
uint64_t pair_hash(uint64_t en, uint64_t fr) { return en ^ (fr * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull); }

// The lines of the WMT test and dev sets, to keep them out of training: one table of
// line hash -> which set and side it occurs in, so each training line costs one lookup.
enum : uint8_t { kTestEn = 1, kTestFr = 2, kDevEn = 4, kDevFr = 8 };
struct EvalGuard {
  std::unordered_set<uint64_t> test_pairs;
  std::unordered_map<uint64_t, uint8_t> lines;
  bool have_test = false;

  uint8_t flags(uint64_t hash) const {
    if (lines.empty()) return 0;
    const auto it = lines.find(hash);
    return it == lines.end() ? 0 : it->second;
  }

  static std::filesystem::path find(const std::filesystem::path& dir, const std::string& stem) {
    for (const char* ext : {".xz", ".gz", ""}) {
      auto candidate = dir / (stem + ext);
      if (std::filesystem::exists(candidate)) return candidate;
    }
    return {};
  }

  // The set under the names it has here (SOURCES.md), in a WMT release (plain text), or as
  // unpacked by `data download` (test-full/*.sgm, dev/*).
  static std::optional<PairSource> find_set(const std::filesystem::path& dir, const std::string& year) {
    const std::string y = year;
    const std::vector<std::tuple<std::string, std::string, PairFormat>> candidates = {
        {"newstest" + y + ".fr-en.en", "newstest" + y + ".fr-en.fr", PairFormat::aligned},
        {"newstest" + y + ".en", "newstest" + y + ".fr", PairFormat::aligned},
        {"dev/newstest" + y + ".en", "dev/newstest" + y + ".fr", PairFormat::aligned},
        {"test-full/newstest" + y + "-fren-src.en.sgm", "test-full/newstest" + y + "-fren-ref.fr.sgm", PairFormat::sgm},
        {"test/newstest" + y + "-fren-src.en.sgm", "test/newstest" + y + "-fren-ref.fr.sgm", PairFormat::sgm},
        {"dev/newstest" + y + "-src.en.sgm", "dev/newstest" + y + "-src.fr.sgm", PairFormat::sgm},
    };
    for (const auto& [en, fr, format] : candidates) {
      const auto en_path = find(dir, en), fr_path = find(dir, fr);
      if (!en_path.empty() && !fr_path.empty()) return PairSource{format, en_path, fr_path};
    }
    return std::nullopt;
  }

  void load(const std::filesystem::path& dir, TestSetCheck check, std::vector<std::string>& warnings) {
    if (dir.empty()) {
      FLASHGPT_CHECK(check == TestSetCheck::off, "prepare: no evaluation directory given: training text must be "
                     "checked against newstest2014 (pass --eval-dir DIR, or --no-test-set-check to train unchecked)");
      warnings.push_back("no evaluation directory: training text is checked against newstest2014 by file name only");
      return;
    }
    std::error_code ec;
    const auto status = std::filesystem::status(dir, ec);
    const std::string problem = status.type() == std::filesystem::file_type::not_found ? "does not exist"
                                : ec                                   ? "cannot be read: " + ec.message()
                                : !std::filesystem::is_directory(status) ? "is not a directory"
                                                                         : "";
    FLASHGPT_CHECK(problem.empty(), "evaluation directory {} {}: it is where newstest2014 is looked up so that it "
                   "stays out of training (check --eval-dir)", dir.string(), problem);
    FLASHGPT_CHECK(::access(dir.c_str(), R_OK | X_OK) == 0, "evaluation directory {} cannot be read: {} (check "
                   "--eval-dir)", dir.string(), std::strerror(errno));
    if (const auto test = find_set(dir, "2014")) {
      PairReader reader(*test, BadLinePolicy::fail);
      TextPair pair;
      while (reader.next(pair)) {
        const uint64_t h_en = line_hash(pair.en), h_fr = line_hash(pair.fr);
        test_pairs.insert(pair_hash(h_en, h_fr));
        lines[h_en] |= kTestEn;
        lines[h_fr] |= kTestFr;
      }
      have_test = true;
    } else {
      FLASHGPT_CHECK(check == TestSetCheck::off, "newstest2014.fr-en.{{en,fr}} not found in the evaluation directory "
                     "{}: training text must be checked against it (pass the --eval-dir that holds it, or "
                     "--no-test-set-check to train unchecked)", dir.string());
      warnings.push_back(fmt::format("newstest2014.fr-en.{{en,fr}} not found in '{}': training text is checked "
                                     "against the evaluation set by file name only (pass --eval-dir)", dir.string()));
    }
    for (const char* year : {"2012", "2013"}) {
      const auto dev = find_set(dir, year);
      if (!dev) continue;
      PairReader reader(*dev, BadLinePolicy::skip);
      TextPair pair;
      while (reader.next(pair)) {
        lines[line_hash(pair.en)] |= kDevEn;
        lines[line_hash(pair.fr)] |= kDevFr;
      }
    }
  }
};

void check_input_name(const std::filesystem::path& path, std::vector<std::string>& warnings) {
  // By file name, and by the folders a WMT release keeps newstest2014 in (test-full/,
  // test-filtered/); other folder names are the user's business.
  std::string name = path.filename().string();
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  const std::string folder = path.parent_path().filename().string();
  FLASHGPT_CHECK(name.find("newstest2014") == std::string::npos && name.find("newstest14") == std::string::npos &&
                     folder != "test-full" && folder != "test-filtered",
                 "refusing to train on {}: newstest2014 is the WMT14 evaluation set (BLEU on it would be meaningless "
                 "after training on it)", path.string());
  for (const char* dev : {"newstest2012", "newstest2013"}) {
    if (name.find(dev) != std::string::npos) {
      warnings.push_back(fmt::format("{} is a WMT14 dev set ({}): fine for training only if you do not tune or "
                                     "select checkpoints on it", path.string(), dev));
    }
  }
}

std::string fill_template(std::string_view pattern, const std::string& en, const std::string& fr) {
  std::string out;
  out.reserve(pattern.size() + en.size() + fr.size());
  for (size_t i = 0; i < pattern.size();) {
    if (pattern.substr(i, 4) == "{en}") {
      out += en, i += 4;
    } else if (pattern.substr(i, 4) == "{fr}") {
      out += fr, i += 4;
    } else {
      out.push_back(pattern[i++]);
    }
  }
  return out;
}

// Random words of pair (or line) `counter` in `stream`, under the seed.
Philox4x32 draw_for(uint64_t seed, uint64_t counter, uint32_t stream, uint32_t extra = 0) {
  return philox4x32_10({static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), stream, extra},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}
constexpr uint32_t kPairStream = 0x70616972;     // "pair": a pair's choices in multi-pair mode
constexpr uint32_t kShuffleStream = 0x73687566;  // "shuf": the permutation of a corpus pass
constexpr uint32_t kRepeatStream = 0x72657074;   // "rept": the pairs of a fractional pass

constexpr size_t kPairBlockLabelBytes = 18;  // "English: " + "\nFrench: " (or "French: " + "\nEnglish: ")
constexpr size_t kPairSeparatorBytes = 2;    // "\n\n"

// Groups pairs into multi-pair documents: a document is closed when it holds `max_pairs`
// pairs or when the next pair would take its text past `max_bytes` (0: no limit); a pair
// longer than that alone still makes a document.
class PairPacker {
 public:
  PairPacker(int64_t max_pairs, uint64_t max_bytes) : max_pairs_(max_pairs), max_bytes_(max_bytes) {}

  // Whether `pair` must start a new document (the open one is then to be taken first).
  bool full_before(const TextPair& pair) const {
    if (open_.empty()) return false;
    const uint64_t grown = bytes_ + kPairSeparatorBytes + pair.en.size() + pair.fr.size() + kPairBlockLabelBytes;
    return static_cast<int64_t>(open_.size()) >= max_pairs_ || (max_bytes_ > 0 && grown > max_bytes_);
  }
  bool empty() const { return open_.empty(); }
  void add(TextPair pair) {
    bytes_ += (open_.empty() ? 0 : kPairSeparatorBytes) + pair.en.size() + pair.fr.size() + kPairBlockLabelBytes;
    open_.push_back(std::move(pair));
  }
  // The open document's text in `direction`; the packer is empty after.
  std::string take(PairDirection direction) {
    std::string text = multi_pair_document(open_, direction);
    open_.clear();
    bytes_ = 0;
    return text;
  }

 private:
  int64_t max_pairs_;
  uint64_t max_bytes_;
  std::vector<TextPair> open_;
  uint64_t bytes_ = 0;
};

// Language of a monolingual file from its name: X.en[.xz], X.fr[.gz].
DocKind mono_language(const std::filesystem::path& path) {
  std::string name = path.filename().string();
  for (const char* ext : {".gz", ".xz"}) {
    if (name.ends_with(ext)) name.resize(name.size() - 3);
  }
  if (name.ends_with(".en")) return DocKind::en;
  FLASHGPT_CHECK(name.ends_with(".fr"), "{}: cannot tell the language of a monolingual file (name it X.en or X.fr)",
                 path.string());
  return DocKind::fr;
}

// SIGINT/SIGTERM during a run: the handler only sets this flag; the reading loop and the
// worker check it and unwind, so the temporary directory is removed and the published
// dataset is left as it was.
volatile std::sig_atomic_t g_interrupt_signal = 0;
extern "C" void prepare_on_signal(int signal) { g_interrupt_signal = signal; }

void check_interrupted() {
  if (const int signal = g_interrupt_signal) {
    FLASHGPT_FAIL("interrupted by {} (signal {}): nothing was published; the previous dataset, if any, is unchanged",
                  signal == SIGINT ? "SIGINT" : signal == SIGTERM ? "SIGTERM" : "a signal", signal);
  }
}

// Installs the handlers for the scope of one run and restores the previous ones after.
class InterruptScope {
 public:
  explicit InterruptScope(bool enable) : enabled_(enable) {
    g_interrupt_signal = 0;
    if (!enabled_) return;
    struct sigaction action {};
    action.sa_handler = prepare_on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int_);
    sigaction(SIGTERM, &action, &old_term_);
  }
  ~InterruptScope() {
    if (!enabled_) return;
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;

 private:
  bool enabled_;
  struct sigaction old_int_ {}, old_term_ {};
};

// The files a dataset directory may hold: what prepare writes (and a shard writer's
// temporary file). Only these are ever deleted.
bool is_dataset_file(const std::string& name) {
  static const std::regex pattern(R"((train|val)_[0-9]{6,}\.bin(\.tmp)?|summary\.json)");
  return std::regex_match(name, pattern);
}

// The first entry of `dir` that prepare did not write, or "" when there is none.
std::string foreign_entry(const std::filesystem::path& dir) {
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (!is_dataset_file(name) || !entry.is_regular_file()) return name;
  }
  return "";
}

// Deletes the dataset files of `dir` and then `dir` itself when nothing else is left.
void remove_dataset_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (is_dataset_file(entry.path().filename().string())) std::filesystem::remove(entry.path(), ec);
  }
  std::filesystem::remove(dir, ec);  // fails (and keeps it) when something else is in it
}

// OUT is published from a temporary sibling: lock, build in .NAME.tmp-PID, swap in.
class DatasetOutput {
 public:
  explicit DatasetOutput(const std::filesystem::path& out_dir) {
    out_ = out_dir.lexically_normal();
    if (out_.filename().empty()) out_ = out_.parent_path();
    FLASHGPT_CHECK(!out_.filename().empty() && out_.filename() != "." && out_.filename() != "..",
                   "prepare: '{}' cannot be an output directory (name a directory, e.g. data/wmt14_fren)",
                   out_dir.string());
    parent_ = out_.parent_path().empty() ? std::filesystem::path(".") : out_.parent_path();
    std::filesystem::create_directories(parent_);
    const std::string name = out_.filename().string();
    lock_path_ = parent_ / ("." + name + ".lock");
    lock_fd_ = ::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    FLASHGPT_CHECK(lock_fd_ >= 0, "cannot create the lock file {}: {}", lock_path_.string(), std::strerror(errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      const int saved = errno;
      ::close(lock_fd_);
      FLASHGPT_CHECK(saved != EWOULDBLOCK, "another `data prepare` is writing {} (it holds the lock {}); wait for it "
                     "to finish or choose another --out", out_.string(), lock_path_.string());
      FLASHGPT_FAIL("cannot lock {}: {}", lock_path_.string(), std::strerror(saved));
    }
    try {
      prepare_locked(name);
    } catch (...) {
      ::close(lock_fd_);  // the destructor does not run for a constructor that throws
      throw;
    }
  }

  ~DatasetOutput() {
    if (!published_) remove_dataset_dir(build_);
    ::close(lock_fd_);  // the lock file stays: removing it would race with a waiting run
  }

  const std::filesystem::path& build_dir() const { return build_; }

  // Makes the built directory OUT in one step; the previous OUT is removed only after.
  void publish() {
    fsync_directory(build_);
    std::error_code ec;
    if (!std::filesystem::exists(std::filesystem::symlink_status(out_, ec))) {
      FLASHGPT_CHECK(::rename(build_.c_str(), out_.c_str()) == 0, "cannot rename {} to {}: {}", build_.string(),
                     out_.string(), std::strerror(errno));
    } else if (::renameat2(AT_FDCWD, build_.c_str(), AT_FDCWD, out_.c_str(), RENAME_EXCHANGE) != 0) {
      // No atomic exchange on this file system: move the old one aside first.
      const auto old = parent_ / fmt::format(".{}.old-{}", out_.filename().string(), ::getpid());
      FLASHGPT_CHECK(::rename(out_.c_str(), old.c_str()) == 0, "cannot move {} aside: {}", out_.string(),
                     std::strerror(errno));
      if (::rename(build_.c_str(), out_.c_str()) != 0) {
        const int saved = errno;
        ::rename(old.c_str(), out_.c_str());
        FLASHGPT_FAIL("cannot rename {} to {}: {}", build_.string(), out_.string(), std::strerror(saved));
      }
      ::rename(old.c_str(), build_.c_str());
    }
    published_ = true;
    fsync_directory(parent_);
    remove_dataset_dir(build_);  // after the exchange: the previous dataset
  }

 private:
  // Under the lock: check OUT, clear dead runs' leftovers, create the build directory.
  void prepare_locked(const std::string& name) {
    std::error_code ec;
    if (std::filesystem::exists(std::filesystem::symlink_status(out_, ec))) {
      FLASHGPT_CHECK(std::filesystem::is_directory(std::filesystem::symlink_status(out_)),
                     "--out {} exists and is not a directory", out_.string());
      const std::string foreign = foreign_entry(out_);
      FLASHGPT_CHECK(foreign.empty(), "--out {} holds '{}', which `data prepare` did not write; refusing to replace "
                     "the directory (move it away or choose another --out)", out_.string(), foreign);
      // Files named like ours are replaced only as the dataset summary.json lists.
      if (!std::filesystem::is_empty(out_)) {
        try {
          dataset_shards(out_, "train");
          dataset_shards(out_, "val");
        } catch (const Error& e) {
          FLASHGPT_FAIL("--out {} is not a dataset that `data prepare` published, so it is not replaced ({}); move it "
                        "away or choose another --out", out_.string(), e.what());
        }
      }
    }
    // Temporary directories of runs that died without cleaning up (SIGKILL, power loss):
    // the lock says none of them is live.
    const std::string stale_prefix = "." + name + ".tmp-";
    for (const auto& entry : std::filesystem::directory_iterator(parent_)) {
      if (entry.path().filename().string().starts_with(stale_prefix) && entry.is_directory()) {
        remove_dataset_dir(entry.path());
      }
    }
    build_ = parent_ / fmt::format(".{}.tmp-{}", name, ::getpid());
    FLASHGPT_CHECK(std::filesystem::create_directory(build_), "cannot create {}: it exists", build_.string());
  }

  std::filesystem::path out_, parent_, lock_path_, build_;
  int lock_fd_ = -1;
  bool published_ = false;
};

// Reading and document building run on the calling thread; encoding and writing run on
// one worker thread (which the encoder may fan out), one batch behind, so that reading
// overlaps tokenizing. Batches are handed over in order through a queue of at most
// kQueuedBatches, so the output is the same as a sequential run's.
class Pipeline {
 public:
  static constexpr size_t kQueuedBatches = 2;

  Pipeline(const PrepareConfig& config, const TextEncoder& encoder, PrepareSummary& summary,
           std::filesystem::path build_dir)
      : config_(config), encoder_(encoder), summary_(summary), build_dir_(std::move(build_dir)),
        start_(Clock::now()), last_progress_(start_),
        worker_([this] { work(); }) {}

  ~Pipeline() {  // on an error in the reading thread: stop the worker, drop what is queued
    {
      std::lock_guard lock(mutex_);
      closing_ = true;
      queue_.clear();
    }
    changed_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  // A document of the training split, or held out for validation with val_fraction.
  void add(std::string text, DocKind kind) {
    const Philox4x32 r = draw(document_index_);
    add_to(std::move(text), kind, unit_interval(r.z) < config_.val_fraction);
  }
  // A document of the validation split (the dev set of --val-set).
  void add_val(std::string text, DocKind kind) { add_to(std::move(text), kind, /*val=*/true); }

  Philox4x32 draw(uint64_t document) const {
    return philox4x32_10({static_cast<uint32_t>(document), static_cast<uint32_t>(document >> 32), kPrepareStream, 0},
                         static_cast<uint32_t>(config_.seed), static_cast<uint32_t>(config_.seed >> 32));
  }
  uint64_t next_document() const { return document_index_; }

  // Hands the current batch to the worker, waiting while kQueuedBatches are pending.
  void flush() {
    if (batch_.empty()) return;
    summary_.seconds_read += seconds_since(phase_start_);
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return queue_.size() < kQueuedBatches || error_; });
      if (error_) std::rethrow_exception(error_);
      queue_.push_back(std::move(batch_));
    }
    changed_.notify_all();
    batch_ = {};
    progress(false);
    phase_start_ = Clock::now();
  }

  void finish() {
    flush();
    summary_.seconds_read += seconds_since(phase_start_);
    {
      std::lock_guard lock(mutex_);
      closing_ = true;
    }
    changed_.notify_all();
    worker_.join();
    if (error_) std::rethrow_exception(error_);
    close(/*val=*/false);
    close(/*val=*/true);
    progress(true);
    summary_.seconds_total = seconds_since(start_);
  }

  void progress(bool last) {
    if (!config_.progress) return;
    const auto now = Clock::now();
    if (!last && now - last_progress_ < std::chrono::seconds(2)) return;
    last_progress_ = now;
    const double mb = static_cast<double>(summary_.raw_bytes + pending_bytes) / 1e6;
    fmt::print(stderr, "prepare: {} documents, {:.1f} MB of text, {} tokens, {:.1f} MB/s{}\n", document_index_, mb,
               tokens_.load(), mb / std::max(seconds_since(start_), 1e-9), last ? " (done)" : "");
  }

  uint64_t pending_bytes = 0;  // raw bytes of the corpus being read (not yet in the summary)

 private:
  void add_to(std::string text, DocKind kind, bool val) {
    check_interrupted();
    ++document_index_;
    batch_.push_back({std::move(text), kind, val});
    if (batch_.size() >= config_.batch_documents) flush();
  }

  void work() {
    for (;;) {
      std::vector<Document> batch;
      {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return !queue_.empty() || closing_; });
        if (queue_.empty()) return;
        batch = std::move(queue_.front());
        queue_.pop_front();
      }
      changed_.notify_all();
      try {
        check_interrupted();
        encode_and_write(batch);
      } catch (...) {
        std::lock_guard lock(mutex_);
        error_ = std::current_exception();
        queue_.clear();
        changed_.notify_all();
        return;
      }
    }
  }

  void encode_and_write(const std::vector<Document>& batch) {
    auto t0 = Clock::now();
    std::vector<std::string_view> texts;
    texts.reserve(batch.size());
    for (const auto& doc : batch) texts.emplace_back(doc.text);
    const auto encoded = encoder_.encode_batch(texts, config_.threads);
    FLASHGPT_CHECK(encoded.size() == batch.size(), "the encoder returned {} results for {} texts", encoded.size(),
                   batch.size());
    summary_.seconds_tokenize += seconds_since(t0);
    t0 = Clock::now();
    const TokenId eot = encoder_.end_of_text;
    for (size_t i = 0; i < batch.size(); ++i) {
      auto& writer = writer_for(batch[i].val);
      writer.append(encoded[i]);
      writer.append(std::span<const TokenId>(&eot, 1));
      const uint64_t n = encoded[i].size();
      (batch[i].kind == DocKind::en ? summary_.tokens_en
       : batch[i].kind == DocKind::fr ? summary_.tokens_fr
                                        : summary_.tokens_bilingual) += n;
      ++summary_.tokens_eot;
      ++(batch[i].val ? summary_.val_documents : summary_.documents);
      tokens_ += n + 1;
      if (writer.token_count() >= config_.shard_tokens) close(batch[i].val);
    }
    summary_.seconds_write += seconds_since(t0);
  }

  ShardWriter& writer_for(bool val) {
    auto& slot = val ? val_writer_ : train_writer_;
    if (!slot) {
      auto& list = val ? summary_.val_shards : summary_.train_shards;
      // Written into the build directory, recorded under the name it will have once published.
      const std::string name = fmt::format("{}_{:06d}.bin", val ? "val" : "train", list.size());
      slot.emplace(build_dir_ / name, encoder_.name, encoder_.vocab_size, encoder_.end_of_text);
      list.push_back({(config_.out_dir / name).string(), 0, 0});
    }
    return *slot;
  }

  void close(bool val) {
    auto& slot = val ? val_writer_ : train_writer_;
    if (!slot) return;
    const ShardHeader header = slot->finish();
    auto& info = (val ? summary_.val_shards : summary_.train_shards).back();
    info.tokens = header.token_count;
    info.crc32 = header.payload_crc32;
    slot.reset();
  }

  const PrepareConfig& config_;
  const TextEncoder& encoder_;
  // Reading thread: corpora, warnings, raw_bytes, seconds_read. Worker: tokens, documents,
  // shards, seconds_tokenize/write. Nothing is shared until finish() has joined.
  PrepareSummary& summary_;
  const std::filesystem::path build_dir_;
  std::vector<Document> batch_;
  uint64_t document_index_ = 0;
  std::atomic<uint64_t> tokens_ = 0;
  Clock::time_point start_, last_progress_, phase_start_ = Clock::now();

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::vector<Document>> queue_;
  bool closing_ = false;
  std::exception_ptr error_;
  std::optional<ShardWriter> train_writer_, val_writer_;  // worker only
  std::thread worker_;  // last: starts once everything above is constructed
};

// Turns the pairs of the training corpora into documents: the original one-pair recipe
// (pairs_per_document 1, its draws keyed by the document index as before), or multi-pair
// documents (draws keyed by the pair index).
class DocumentBuilder {
 public:
  DocumentBuilder(const PrepareConfig& config, Pipeline& pipeline)
      : config_(config), pipeline_(pipeline),
        packer_(config.pairs_per_document, config.document_bytes) {}

  void take(TextPair pair) {
    if (config_.pairs_per_document <= 1) {
      const Philox4x32 r = pipeline_.draw(pipeline_.next_document());
      if (unit_interval(r.x) < config_.bilingual_rate) {
        pipeline_.add(fill_template(kBilingualTemplates[r.y % kBilingualTemplates.size()], pair.en, pair.fr),
                      DocKind::bilingual);
      } else if (r.y & 1) {
        pipeline_.add(std::move(pair.fr), DocKind::fr);
      } else {
        pipeline_.add(std::move(pair.en), DocKind::en);
      }
      return;
    }
    const Philox4x32 r = draw_for(config_.seed, pair_index_++, kPairStream);
    if (unit_interval(r.x) >= config_.bilingual_rate) {
      if (r.y & 1) {
        pipeline_.add(std::move(pair.fr), DocKind::fr);
      } else {
        pipeline_.add(std::move(pair.en), DocKind::en);
      }
    } else if (unit_interval(r.z) < config_.single_pair_share) {
      pipeline_.add(fill_template(kBilingualTemplates[r.w % kBilingualTemplates.size()], pair.en, pair.fr),
                    DocKind::bilingual);
    } else {
      if (packer_.full_before(pair)) pipeline_.add(packer_.take(direction_), DocKind::bilingual);
      // The pair that opens a document draws its direction.
      if (packer_.empty()) direction_ = (r.w >> 16) & 1 ? PairDirection::fr_en : PairDirection::en_fr;
      packer_.add(std::move(pair));
    }
  }

  // Closes the open document: documents never span two corpora.
  void end_of_corpus() {
    if (!packer_.empty()) pipeline_.add(packer_.take(direction_), DocKind::bilingual);
  }

 private:
  const PrepareConfig& config_;
  Pipeline& pipeline_;
  PairPacker packer_;
  PairDirection direction_ = PairDirection::en_fr;
  uint64_t pair_index_ = 0;
};

// The order of pass `pass` over n items of corpus `corpus`: the identity, or a
// Philox-driven Fisher-Yates permutation.
std::vector<size_t> pass_order(size_t n, PairOrder order, uint64_t seed, uint32_t corpus, uint32_t pass) {
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  if (order == PairOrder::shuffled) {
    for (size_t i = n; i > 1; --i) {
      const Philox4x32 r = draw_for(seed, i, kShuffleStream, (corpus << 16) ^ pass);
      const uint64_t bits = (static_cast<uint64_t>(r.x) << 32) | r.y;
      std::swap(idx[i - 1], idx[static_cast<size_t>(bits % i)]);
    }
  }
  return idx;
}

// Feeds `items` to `use` `repeat` times: whole passes, then one pass that keeps each item
// with probability frac(repeat); each pass in its own order.
template <typename Item, typename Use>
void use_repeated(std::vector<Item>& items, double repeat, PairOrder order, uint64_t seed, uint32_t corpus, Use use) {
  const auto whole = static_cast<uint32_t>(repeat);
  const double frac = repeat - whole;
  for (uint32_t pass = 0; pass < whole + (frac > 0 ? 1 : 0); ++pass) {
    const bool last = pass + 1 == whole + (frac > 0 ? 1 : 0);
    for (size_t i : pass_order(items.size(), order, seed, corpus, pass)) {
      if (pass >= whole && unit_interval(draw_for(seed, i, kRepeatStream, (corpus << 16) ^ pass).x) >= frac) continue;
      use(last ? std::move(items[i]) : Item(items[i]), pass);
    }
  }
}

double corpus_repeat(const PrepareConfig& config, const std::string& name) {
  for (const auto& w : config.weights) {
    if (w.corpus == name) return w.repeat;
  }
  return 1.0;
}

}  // namespace

PairOrder pair_order_from_name(std::string_view name) {
  if (name == "file") return PairOrder::file;
  if (name == "shuffled") return PairOrder::shuffled;
  FLASHGPT_FAIL("unknown pair order '{}' (choose file or shuffled)", name);
}

CorpusWeight corpus_weight_from_text(std::string_view text) {
  const size_t eq = text.rfind('=');
  FLASHGPT_CHECK(eq != std::string_view::npos && eq > 0 && eq + 1 < text.size(),
                 "corpus weight '{}' is not NAME=REPEAT (e.g. train.newstest2008-2011.fr-en=4)", text);
  CorpusWeight w;
  w.corpus = std::string(text.substr(0, eq));
  const std::string number(text.substr(eq + 1));
  char* end = nullptr;
  errno = 0;
  w.repeat = std::strtod(number.c_str(), &end);
  FLASHGPT_CHECK(errno == 0 && end == number.c_str() + number.size() && std::isfinite(w.repeat) && w.repeat > 0 &&
                     w.repeat <= 100,
                 "corpus weight '{}': the repetition '{}' is not a number in (0, 100]", text, number);
  return w;
}

std::string multi_pair_document(std::span<const TextPair> pairs, PairDirection direction) {
  const bool en_fr = direction == PairDirection::en_fr;
  const std::string_view from = en_fr ? "English: " : "French: ", to = en_fr ? "\nFrench: " : "\nEnglish: ";
  std::string text;
  for (const TextPair& p : pairs) {
    if (!text.empty()) text += "\n\n";
    text += from;
    text += en_fr ? p.en : p.fr;
    text += to;
    text += en_fr ? p.fr : p.en;
  }
  return text;
}

namespace {

void check_multi_pair_config(const PrepareConfig& config) {
  FLASHGPT_CHECK(config.pairs_per_document >= 1 && config.pairs_per_document <= 100000,
                 "pairs per document {} is not in [1, 100000]", config.pairs_per_document);
  FLASHGPT_CHECK(config.single_pair_share >= 0 && config.single_pair_share <= 1, "single-pair share {} is not in [0, 1]",
                 config.single_pair_share);
  FLASHGPT_CHECK(config.pairs_per_document > 1 || (config.single_pair_share == 0 && config.document_bytes == 0),
                 "--single-pair-share and --document-bytes shape multi-pair documents: give --pairs-per-document "
                 "above 1 with them");
  std::vector<std::string> names;
  for (const auto& source : config.pairs) names.push_back(source.name());
  for (const auto& path : config.mono) names.push_back(path.filename().string());
  for (size_t i = 0; i < config.weights.size(); ++i) {
    const auto& w = config.weights[i];
    FLASHGPT_CHECK(std::isfinite(w.repeat) && w.repeat > 0 && w.repeat <= 100, "corpus weight {}={} is not in (0, 100]",
                   w.corpus, w.repeat);
    for (size_t j = 0; j < i; ++j) {
      FLASHGPT_CHECK(config.weights[j].corpus != w.corpus, "corpus {} is weighted twice", w.corpus);
    }
    FLASHGPT_CHECK(std::find(names.begin(), names.end(), w.corpus) != names.end(), "corpus weight {}={}: no input corpus has that name (inputs: {})", w.corpus, w.repeat,
                   fmt::join(names, ", "));
  }
  if (!config.val_set.empty()) {
    FLASHGPT_CHECK(config.val_set == "newstest2012" || config.val_set == "newstest2013",
                   "validation set '{}': choose newstest2012 or newstest2013 (dev sets; newstest2014 is the test set "
                   "and never a validation set)", config.val_set);
    FLASHGPT_CHECK(config.val_fraction == 0, "--val-set {} replaces the held-out documents: give --val-fraction 0 (it "
                   "is {})", config.val_set, config.val_fraction);
  }
}

}  // namespace

std::filesystem::path data_dir_default() {
  if (const char* env = std::getenv("FLASHGPT_DATA_DIR"); env && *env) return env;
  auto dir = std::filesystem::current_path();
  for (int up = 0; up < 4 && !dir.empty(); ++up, dir = dir.parent_path()) {
    if (std::filesystem::is_directory(dir / ".." / "shared" / "data")) {
      return std::filesystem::weakly_canonical(dir / ".." / "shared" / "data");
    }
    if (dir == dir.parent_path()) break;
  }
  return {};
}

std::vector<PairSource> default_pair_sources(const std::filesystem::path& data_dir) {
  std::vector<PairSource> out;
  for (const char* sub : {"wmt14", "extra"}) {
    const auto dir = data_dir / sub;
    if (!std::filesystem::is_directory(dir)) continue;
    std::vector<std::filesystem::path> files;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.starts_with("train.") && (name.ends_with(".en") || name.ends_with(".en.xz") || name.ends_with(".en.gz")))
        files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) out.push_back(pair_source_from_path(f));
  }
  FLASHGPT_CHECK(!out.empty(), "no train.*.en[.xz] files in {}/wmt14 or {}/extra", data_dir.string(), data_dir.string());
  return out;
}

PrepareSummary data_prepare(const PrepareConfig& config, const TextEncoder& encoder) {
  FLASHGPT_CHECK(!config.pairs.empty() || !config.mono.empty(), "prepare: no input corpora");
  FLASHGPT_CHECK(!config.out_dir.empty(), "prepare: no output directory");
  FLASHGPT_CHECK(config.bilingual_rate >= 0 && config.bilingual_rate <= 1, "bilingual rate {} is not in [0, 1]",
                 config.bilingual_rate);
  FLASHGPT_CHECK(config.val_fraction >= 0 && config.val_fraction < 1, "validation fraction {} is not in [0, 1)",
                 config.val_fraction);
  FLASHGPT_CHECK(config.shard_tokens > 0 && config.batch_documents > 0, "shard size and batch size must be positive");
  FLASHGPT_CHECK(config.threads >= 0 && config.threads <= 1024, "prepare: {} threads is not in [0, 1024] (0: all cores)",
                 config.threads);
  FLASHGPT_CHECK(encoder.encode_batch && encoder.vocab_size > encoder.end_of_text, "prepare: invalid encoder");
  check_multi_pair_config(config);

  PrepareSummary summary;
  for (const auto& source : config.pairs) {
    check_input_name(source.en, summary.warnings);
    if (!source.fr.empty()) check_input_name(source.fr, summary.warnings);
  }
  for (const auto& path : config.mono) check_input_name(path, summary.warnings);

  EvalGuard guard;
  guard.load(config.eval_dir, config.test_set_check, summary.warnings);
  InterruptScope interrupts(config.handle_signals);
  // Nothing in OUT is touched until the new dataset is complete: it is built in a locked
  // temporary sibling and swapped in; a failure or a signal removes only that sibling.
  DatasetOutput output(config.out_dir);
  {
    Pipeline pipeline(config, encoder, summary, output.build_dir());
    DocumentBuilder builder(config, pipeline);
    uint32_t corpus_index = 0;
    for (const auto& source : config.pairs) {
      PrepareSummary::Corpus corpus{source.name(), 0, 0, corpus_repeat(config, source.name()), {}};
      // Pairs are used as read, or kept (once checked) when the corpus is repeated or shuffled.
      const bool keep = corpus.repeat != 1.0 || config.pair_order == PairOrder::shuffled;
      std::vector<TextPair> kept;
      PairReader reader(source, config.bad_lines, config.prefetch);
      TextPair pair;
      while (reader.next(pair)) {
        check_interrupted();
        pipeline.pending_bytes = reader.stats().bytes;
        if (pair.en.empty() || pair.fr.empty()) {
          ++corpus.skipped["empty side"];
          continue;
        }
        const uint64_t h_en = line_hash(pair.en), h_fr = line_hash(pair.fr);
        const uint8_t f_en = guard.flags(h_en), f_fr = guard.flags(h_fr);
        FLASHGPT_CHECK(!((f_en & kTestEn) && (f_fr & kTestFr) && guard.test_pairs.contains(pair_hash(h_en, h_fr))),
                       "{}:{}: this pair is a newstest2014 pair; refusing to put the WMT14 evaluation set into training",
                       source.en.string(), pair.line);
        if ((f_en & kTestEn) || (f_fr & kTestFr)) {
          ++corpus.skipped["a side identical to a newstest2014 sentence"];
          continue;
        }
        if ((f_en & kDevEn) || (f_fr & kDevFr)) ++summary.dev_overlap;
        if (keep) {
          kept.push_back(std::move(pair));
        } else {
          builder.take(std::move(pair));
          ++corpus.used;
        }
      }
      if (keep) {
        use_repeated(kept, corpus.repeat, config.pair_order, config.seed, corpus_index, [&](TextPair p, uint32_t /*pass*/) {
          builder.take(std::move(p));
          ++corpus.used;
        });
      }
      builder.end_of_corpus();
      const auto& stats = reader.stats();
      corpus.read = stats.read;
      if (stats.invalid_utf8) corpus.skipped["invalid UTF-8"] += stats.invalid_utf8;
      if (stats.malformed) corpus.skipped["malformed line"] += stats.malformed;
      summary.raw_bytes += stats.bytes;
      pipeline.pending_bytes = 0;
      summary.corpora.push_back(std::move(corpus));
      ++corpus_index;
    }
    for (const auto& path : config.mono) {
      const DocKind kind = mono_language(path);
      const uint8_t test_flag = kind == DocKind::en ? kTestEn : kTestFr, dev_flag = kind == DocKind::en ? kDevEn : kDevFr;
      PrepareSummary::Corpus corpus{path.filename().string(), 0, 0, corpus_repeat(config, path.filename().string()), {}};
      const bool keep = corpus.repeat != 1.0;
      std::vector<std::string> kept;
      LineReader reader(path, config.prefetch);
      std::string line;
      while (reader.next(line)) {
        check_interrupted();
        ++corpus.read;
        pipeline.pending_bytes = reader.bytes_out();
        if (const auto bad = utf8_first_invalid(line)) {
          FLASHGPT_CHECK(config.bad_lines == BadLinePolicy::skip, "{}:{}: invalid UTF-8 at byte {}", path.string(),
                         reader.line_number(), *bad);
          ++corpus.skipped["invalid UTF-8"];
          continue;
        }
        if (line.empty()) {
          ++corpus.skipped["empty line"];
          continue;
        }
        const uint8_t f = guard.flags(line_hash(line));
        if (f & test_flag) {
          ++corpus.skipped["identical to a newstest2014 sentence"];
          continue;
        }
        if (f & dev_flag) ++summary.dev_overlap;
        if (keep) {
          kept.push_back(std::move(line));
        } else {
          pipeline.add(std::move(line), kind);
          ++corpus.used;
        }
      }
      if (keep) {
        use_repeated(kept, corpus.repeat, PairOrder::file, config.seed, corpus_index, [&](std::string l, uint32_t) {
          pipeline.add(std::move(l), kind);
          ++corpus.used;
        });
      }
      summary.raw_bytes += reader.bytes_out();
      pipeline.pending_bytes = 0;
      summary.corpora.push_back(std::move(corpus));
      ++corpus_index;
    }
    if (!config.val_set.empty()) {
      // The dev set in the prompt format, both directions, as the validation split.
      const auto dev = EvalGuard::find_set(config.eval_dir, config.val_set.substr(std::string("newstest").size()));
      FLASHGPT_CHECK(dev.has_value(), "--val-set {}: {}.fr-en.{{en,fr}} not found in {} (check --eval-dir)",
                     config.val_set, config.val_set, config.eval_dir.string());
      PrepareSummary::Corpus corpus{dev->name() + " (validation)", 0, 0, 1.0, {}};
      std::vector<TextPair> pairs;
      PairReader reader(*dev, BadLinePolicy::skip, Prefetch::no);
      TextPair pair;
      while (reader.next(pair)) {
        ++corpus.read;
        if (pair.en.empty() || pair.fr.empty()) {
          ++corpus.skipped["empty side"];
          continue;
        }
        pairs.push_back(std::move(pair));
      }
      for (PairDirection direction : {PairDirection::en_fr, PairDirection::fr_en}) {
        PairPacker packer(config.pairs_per_document, config.document_bytes);
        for (const TextPair& p : pairs) {
          if (packer.full_before(p)) pipeline.add_val(packer.take(direction), DocKind::bilingual);
          packer.add(p);
          ++corpus.used;
        }
        if (!packer.empty()) pipeline.add_val(packer.take(direction), DocKind::bilingual);
      }
      summary.corpora.push_back(std::move(corpus));
    }
    pipeline.finish();
  }
  if (summary.dev_overlap) {
    summary.warnings.push_back(fmt::format("{} training pairs/lines have a side identical to a newstest2012/2013 "
                                           "(dev set) sentence; they were kept", summary.dev_overlap));
  }
  check_interrupted();
  // summary.json is the commit record: written last, and readers refuse a directory without it.
  atomic_write_file(output.build_dir() / "summary.json", prepare_summary_json(summary) + "\n");
  output.publish();
  return summary;
}

std::string prepare_summary_json(const PrepareSummary& s) {
  nlohmann::ordered_json j;
  auto& corpora = j["corpora"] = nlohmann::ordered_json::array();
  uint64_t read = 0, used = 0;
  std::map<std::string, uint64_t> skipped;
  for (const auto& c : s.corpora) {
    corpora.push_back({{"name", c.name}, {"read", c.read}, {"used", c.used}, {"repeat", c.repeat}, {"skipped", c.skipped}});
    read += c.read;
    used += c.used;
    for (const auto& [reason, n] : c.skipped) skipped[reason] += n;
  }
  j["read"] = read;
  j["used"] = used;
  j["skipped"] = skipped;
  j["documents"] = {{"train", s.documents}, {"val", s.val_documents}};
  j["tokens"] = {{"en", s.tokens_en},
                 {"fr", s.tokens_fr},
                 {"bilingual", s.tokens_bilingual},
                 {"end_of_text", s.tokens_eot},
                 {"total", s.tokens_en + s.tokens_fr + s.tokens_bilingual + s.tokens_eot}};
  j["dev_overlap_kept"] = s.dev_overlap;
  auto shards = [](const std::vector<ShardInfo>& list) {
    auto a = nlohmann::ordered_json::array();
    for (const auto& info : list) a.push_back({{"path", info.path}, {"tokens", info.tokens}, {"crc32", info.crc32}});
    return a;
  };
  j["train_shards"] = shards(s.train_shards);
  j["val_shards"] = shards(s.val_shards);
  j["raw_bytes"] = s.raw_bytes;
  j["seconds"] = {{"read", s.seconds_read},
                  {"tokenize", s.seconds_tokenize},
                  {"write", s.seconds_write},
                  {"total", s.seconds_total}};
  j["mb_per_second"] = s.seconds_total > 0 ? static_cast<double>(s.raw_bytes) / 1e6 / s.seconds_total : 0.0;
  j["warnings"] = s.warnings;
  return j.dump(2);
}

}  // namespace flashgpt

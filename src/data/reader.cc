// Streaming readers: LineReader decompresses gzip/xz on the fly with one fixed-size input
// and output buffer each, so memory stays constant whatever the file size (a single line
// longer than kMaxLineBytes is an error rather than unbounded growth).
#include <flashgpt/data_reader.h>
#include <flashgpt/error.h>
#include <flashgpt/unicode.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#ifdef FLASHGPT_HAVE_ZLIB
#include <zlib.h>
#endif
#ifdef FLASHGPT_HAVE_LZMA
#include <lzma.h>
#endif

namespace flashgpt {
namespace {

constexpr size_t kInBufferBytes = 1 << 18;
constexpr size_t kOutBufferBytes = 1 << 20;
constexpr size_t kMaxLineBytes = size_t{256} << 20;

std::string strip_compression_suffix(const std::string& name, std::string* suffix = nullptr) {
  for (const char* ext : {".gz", ".xz"}) {
    if (name.size() > 3 && name.ends_with(ext)) {
      if (suffix) *suffix = ext;
      return name.substr(0, name.size() - 3);
    }
  }
  if (suffix) suffix->clear();
  return name;
}

}  // namespace

bool compression_supported(Compression compression) {
  switch (compression) {
    case Compression::none: return true;
#ifdef FLASHGPT_HAVE_ZLIB
    case Compression::gzip: return true;
#endif
#ifdef FLASHGPT_HAVE_LZMA
    case Compression::xz: return true;
#endif
    default: return false;
  }
}

struct LineReader::Impl {
  std::filesystem::path path;
  FILE* file = nullptr;
  Compression compression = Compression::none;
  std::string in, out;
  size_t in_len = 0, out_pos = 0, out_len = 0;
  bool input_eof = false, stream_end = false;
  uint64_t raw_line_number = 0;                  // lines decoded (by the prefetch thread if any)
  std::atomic<uint64_t> bytes_in = 0, bytes_out = 0;
  uint64_t line_number = 0;                      // lines returned to the caller

  // Prefetch: a thread decodes blocks of lines ahead into a bounded queue.
  static constexpr size_t kBlockLines = 2048, kQueuedBlocks = 4;
  bool prefetch = false;
  std::thread thread;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::vector<std::string>> blocks;
  bool done = false, stop = false;
  std::exception_ptr error;
  std::vector<std::string> current;
  size_t current_pos = 0;
#ifdef FLASHGPT_HAVE_ZLIB
  z_stream z{};
  bool z_init = false;
#endif
#ifdef FLASHGPT_HAVE_LZMA
  lzma_stream x = LZMA_STREAM_INIT;
  bool x_init = false;
#endif

  ~Impl() {
    if (thread.joinable()) {
      {
        std::lock_guard lock(mutex);
        stop = true;
      }
      changed.notify_all();
      thread.join();
    }
    if (file) std::fclose(file);
#ifdef FLASHGPT_HAVE_ZLIB
    if (z_init) inflateEnd(&z);
#endif
#ifdef FLASHGPT_HAVE_LZMA
    if (x_init) lzma_end(&x);
#endif
  }

  // Reads more compressed (or plain) input into `in`, keeping unconsumed bytes at its front.
  void fill_input(size_t keep_from) {
    const size_t kept = in_len - keep_from;
    if (kept && keep_from) std::memmove(in.data(), in.data() + keep_from, kept);
    in_len = kept;
    if (input_eof) return;
    const size_t got = std::fread(in.data() + in_len, 1, in.size() - in_len, file);
    FLASHGPT_CHECK(!std::ferror(file), "{}: read error: {}", path.string(), std::strerror(errno));
    if (got == 0) input_eof = true;
    in_len += got;
    bytes_in += got;
  }

  // Refills `out`; returns false at the end of the data.
  bool fill_output() {
    out_pos = out_len = 0;
    switch (compression) {
      case Compression::none: {
        const size_t got = std::fread(out.data(), 1, out.size(), file);
        FLASHGPT_CHECK(!std::ferror(file), "{}: read error: {}", path.string(), std::strerror(errno));
        bytes_in += got;
        out_len = got;
        break;
      }
      case Compression::gzip: fill_gzip(); break;
      case Compression::xz: fill_xz(); break;
    }
    bytes_out += out_len;
    return out_len > 0;
  }

  void fill_gzip() {
#ifdef FLASHGPT_HAVE_ZLIB
    while (out_len == 0) {
      if (z.avail_in == 0) {
        fill_input(in_len);
        z.next_in = reinterpret_cast<Bytef*>(in.data());
        z.avail_in = static_cast<uInt>(in_len);
        if (in_len == 0) {
          FLASHGPT_CHECK(stream_end, "{}: truncated gzip file (the compressed data ends before its stream does)",
                         path.string());
          return;
        }
      }
      if (stream_end) {  // another gzip member follows (concatenated .gz, as `cat a.gz b.gz`)
        FLASHGPT_CHECK(inflateReset(&z) == Z_OK, "{}: zlib inflateReset failed", path.string());
        stream_end = false;
      }
      z.next_out = reinterpret_cast<Bytef*>(out.data());
      z.avail_out = static_cast<uInt>(out.size());
      const int rc = inflate(&z, Z_NO_FLUSH);
      out_len = out.size() - z.avail_out;
      if (rc == Z_STREAM_END) {
        stream_end = true;
      } else if (rc == Z_BUF_ERROR) {
        FLASHGPT_CHECK(z.avail_in == 0 || out_len > 0, "{}: corrupt gzip data", path.string());
      } else {
        FLASHGPT_CHECK(rc == Z_OK, "{}: corrupt gzip data ({})", path.string(), z.msg ? z.msg : "inflate failed");
      }
    }
#else
    FLASHGPT_FAIL("{} is gzip-compressed but this build has no zlib (install zlib1g-dev and rebuild, or gunzip it)",
                  path.string());
#endif
  }

  void fill_xz() {
#ifdef FLASHGPT_HAVE_LZMA
    while (out_len == 0 && !stream_end) {
      if (x.avail_in == 0 && !input_eof) {
        fill_input(in_len);
        x.next_in = reinterpret_cast<const uint8_t*>(in.data());
        x.avail_in = in_len;
      }
      x.next_out = reinterpret_cast<uint8_t*>(out.data());
      x.avail_out = out.size();
      const lzma_ret rc = lzma_code(&x, input_eof && x.avail_in == 0 ? LZMA_FINISH : LZMA_RUN);
      out_len = out.size() - x.avail_out;
      if (rc == LZMA_STREAM_END) {
        stream_end = true;
      } else if (rc == LZMA_BUF_ERROR) {
        FLASHGPT_FAIL("{}: truncated xz file (the compressed data ends before its stream does)", path.string());
      } else if (rc != LZMA_OK) {
        FLASHGPT_FAIL("{}: corrupt xz data (liblzma error {}{})", path.string(), static_cast<int>(rc),
                      rc == LZMA_DATA_ERROR ? ", data error" : rc == LZMA_FORMAT_ERROR ? ", not xz" : "");
      }
    }
#else
    FLASHGPT_FAIL("{} is xz-compressed but this build has no liblzma (install liblzma-dev and rebuild, or "
                  "decompress it with `xz -d`)", path.string());
#endif
  }

  // One line from the decompressed stream; false at the end.
  bool read_line(std::string& line) {
    line.clear();
    bool any = false;
    for (;;) {
      if (out_pos == out_len && !fill_output()) {
        if (!any) return false;
        break;
      }
      any = true;
      const char* begin = out.data() + out_pos;
      const size_t avail = out_len - out_pos;
      const auto* newline = static_cast<const char*>(std::memchr(begin, '\n', avail));
      const size_t take = newline ? static_cast<size_t>(newline - begin) : avail;
      line.append(begin, take);
      FLASHGPT_CHECK(line.size() <= kMaxLineBytes, "{}:{}: line longer than {} MiB; is this a text file?",
                     path.string(), raw_line_number + 1, kMaxLineBytes >> 20);
      out_pos += take + (newline ? 1 : 0);
      if (newline) break;
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    ++raw_line_number;
    return true;
  }

  void prefetch_loop() {
    try {
      for (bool more = true; more;) {
        std::vector<std::string> block(kBlockLines);
        size_t n = 0;
        while (n < kBlockLines && (more = read_line(block[n]))) ++n;
        block.resize(n);
        std::unique_lock lock(mutex);
        changed.wait(lock, [&] { return blocks.size() < kQueuedBlocks || stop; });
        if (stop) return;
        if (n) blocks.push_back(std::move(block));
        done = !more;
        lock.unlock();
        changed.notify_all();
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      error = std::current_exception();
      done = true;
      changed.notify_all();
    }
  }

  bool next_prefetched(std::string& line) {
    if (current_pos == current.size()) {
      std::unique_lock lock(mutex);
      changed.wait(lock, [&] { return !blocks.empty() || done; });
      if (blocks.empty()) {
        if (error) std::rethrow_exception(error);  // after every line decoded before it
        return false;
      }
      current = std::move(blocks.front());
      blocks.pop_front();
      current_pos = 0;
      lock.unlock();
      changed.notify_all();
    }
    line = std::move(current[current_pos++]);
    return true;
  }
};

LineReader::LineReader(const std::filesystem::path& path, Prefetch prefetch) : impl_(std::make_unique<Impl>()) {
  auto& s = *impl_;
  s.path = path;
  s.file = std::fopen(path.c_str(), "rb");
  FLASHGPT_CHECK(s.file, "cannot open {}: {}", path.string(), std::strerror(errno));
  unsigned char magic[6] = {};
  const size_t got = std::fread(magic, 1, sizeof magic, s.file);
  std::rewind(s.file);
  if (got >= 2 && magic[0] == 0x1F && magic[1] == 0x8B) s.compression = Compression::gzip;
  if (got == 6 && std::memcmp(magic, "\xFD" "7zXZ\0", 6) == 0) s.compression = Compression::xz;
  s.out.resize(kOutBufferBytes);
  if (s.compression != Compression::none) s.in.resize(kInBufferBytes);
#ifdef FLASHGPT_HAVE_ZLIB
  if (s.compression == Compression::gzip) {
    FLASHGPT_CHECK(inflateInit2(&s.z, 15 + 16) == Z_OK, "{}: zlib inflateInit2 failed", path.string());
    s.z_init = true;
  }
#endif
#ifdef FLASHGPT_HAVE_LZMA
  if (s.compression == Compression::xz) {
    FLASHGPT_CHECK(lzma_stream_decoder(&s.x, UINT64_MAX, LZMA_CONCATENATED) == LZMA_OK,
                   "{}: liblzma decoder initialisation failed", path.string());
    s.x_init = true;
  }
#endif
  if (prefetch == Prefetch::yes) {
    s.prefetch = true;
    s.thread = std::thread([impl = impl_.get()] { impl->prefetch_loop(); });
  }
}

LineReader::LineReader(LineReader&&) noexcept = default;
LineReader& LineReader::operator=(LineReader&&) noexcept = default;
LineReader::~LineReader() = default;

bool LineReader::next(std::string& line) {
  auto& s = *impl_;
  const bool got = s.prefetch ? s.next_prefetched(line) : s.read_line(line);
  s.line_number += got;
  return got;
}

uint64_t LineReader::line_number() const { return impl_->line_number; }
uint64_t LineReader::bytes_in() const { return impl_->bytes_in; }
uint64_t LineReader::bytes_out() const { return impl_->bytes_out; }
const std::filesystem::path& LineReader::path() const { return impl_->path; }
Compression LineReader::compression() const { return impl_->compression; }

std::optional<std::string_view> sgm_segment_text(std::string_view line) {
  const size_t open = line.find("<seg");
  if (open == std::string_view::npos) return std::nullopt;
  const size_t open_end = line.find('>', open);
  const size_t close = line.rfind("</seg>");
  if (open_end == std::string_view::npos || close == std::string_view::npos || close < open_end) return std::nullopt;
  return line.substr(open_end + 1, close - open_end - 1);
}

std::string PairSource::name() const {
  std::string base = strip_compression_suffix(en.filename().string());
  for (const char* ext : {".en", ".fr", ".tsv", ".sgm"}) {
    if (base.ends_with(ext)) base.resize(base.size() - std::strlen(ext));
  }
  if (format == PairFormat::sgm) {
    for (const char* tail : {".en", ".fr", "-src", "-ref"}) {
      if (base.ends_with(tail)) base.resize(base.size() - std::strlen(tail));
    }
  }
  return base;
}

PairSource pair_source_from_path(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::string suffix;
  const std::string base = strip_compression_suffix(path.filename().string(), &suffix);
  const fs::path dir = path.parent_path();
  PairSource source;
  if (base.ends_with(".tsv")) {
    source.format = PairFormat::tsv;
    source.en = path;
    return source;
  }
  if (base.ends_with(".sgm")) {
    // newstest2014-fren-src.en.sgm <-> newstest2014-fren-ref.fr.sgm (or src.fr / ref.en)
    const bool is_en = base.ends_with(".en.sgm");
    FLASHGPT_CHECK(is_en || base.ends_with(".fr.sgm"), "{}: an SGM file must be named *.en.sgm or *.fr.sgm",
                   path.string());
    const size_t dash = base.rfind('-');
    FLASHGPT_CHECK(dash != std::string::npos, "{}: cannot tell the SGM pair's prefix (expected *-src.LANG.sgm)",
                   path.string());
    const std::string prefix = base.substr(0, dash + 1);
    const std::string want = is_en ? ".fr.sgm" : ".en.sgm";
    fs::path other;
    for (const auto& entry : fs::directory_iterator(dir.empty() ? fs::path(".") : dir)) {
      const std::string name = strip_compression_suffix(entry.path().filename().string());
      if (name.starts_with(prefix) && name.ends_with(want)) other = entry.path();
    }
    FLASHGPT_CHECK(!other.empty(), "{}: no matching {}*{} beside it", path.string(), prefix, want);
    source.format = PairFormat::sgm;
    source.en = is_en ? path : other;
    source.fr = is_en ? other : path;
    return source;
  }
  const bool is_en = base.ends_with(".en");
  FLASHGPT_CHECK(is_en || base.ends_with(".fr"),
                 "{}: cannot tell the format: expected X.en / X.fr (aligned), X.tsv or *.sgm, optionally .gz/.xz",
                 path.string());
  const std::string stem = base.substr(0, base.size() - 3);
  const std::string other_lang = is_en ? ".fr" : ".en";
  fs::path other;
  for (const std::string& ext : {suffix, std::string(), std::string(".xz"), std::string(".gz")}) {
    const fs::path candidate = dir / (stem + other_lang + ext);
    if (fs::exists(candidate)) {
      other = candidate;
      break;
    }
  }
  FLASHGPT_CHECK(!other.empty(), "{}: its other side {}{}[.gz|.xz] does not exist", path.string(), stem, other_lang);
  source.format = PairFormat::aligned;
  source.en = is_en ? path : other;
  source.fr = is_en ? other : path;
  return source;
}

struct PairReader::Impl {
  PairSource source;
  BadLinePolicy policy;
  std::optional<LineReader> en, fr;
  ReadStats stats;
  std::string en_line, fr_line;
  uint64_t segment = 0;

  bool reject(const LineReader& reader, uint64_t line, std::string_view why, uint64_t& counter) {
    FLASHGPT_CHECK(policy == BadLinePolicy::skip, "{}:{}: {}", reader.path().string(), line, why);
    ++counter;
    return false;
  }

  bool valid_utf8(const LineReader& reader, const std::string& text) {
    const auto bad = utf8_first_invalid(text);
    if (!bad) return true;
    return reject(reader, reader.line_number(), fmt::format("invalid UTF-8 at byte {}", *bad), stats.invalid_utf8);
  }

  [[noreturn]] void fail_unaligned(LineReader& shorter, LineReader& longer, std::string_view unit) {
    uint64_t longer_count = longer.line_number();  // counts the line just read
    std::string scratch;
    while (longer.next(scratch)) ++longer_count;
    FLASHGPT_FAIL("unaligned corpus: {} has {} {} but {} has {} {} (the files of a pair must match line for line)",
                  shorter.path().string(), shorter.line_number(), unit, longer.path().string(), longer_count, unit);
  }

  bool next_aligned(TextPair& pair) {
    for (;;) {
      const bool has_en = en->next(pair.en);
      const bool has_fr = fr->next(pair.fr);
      if (!has_en && !has_fr) return false;
      if (has_en != has_fr) has_en ? fail_unaligned(*fr, *en, "lines") : fail_unaligned(*en, *fr, "lines");
      ++stats.read;
      stats.bytes += pair.en.size() + pair.fr.size() + 2;
      pair.line = en->line_number();
      if (valid_utf8(*en, pair.en) && valid_utf8(*fr, pair.fr)) return true;
    }
  }

  bool next_tsv(TextPair& pair) {
    const size_t need = static_cast<size_t>(std::max(source.tsv_en_column, source.tsv_fr_column)) + 1;
    while (en->next(en_line)) {
      ++stats.read;
      stats.bytes += en_line.size() + 1;
      if (!valid_utf8(*en, en_line)) continue;
      std::vector<std::string_view> columns;
      std::string_view rest = en_line;
      for (;;) {
        const size_t tab = rest.find('\t');
        columns.push_back(rest.substr(0, tab));
        if (tab == std::string_view::npos) break;
        rest.remove_prefix(tab + 1);
      }
      if (columns.size() < need) {
        reject(*en, en->line_number(), fmt::format("expected at least {} tab-separated columns, found {}", need,
                                                   columns.size()), stats.malformed);
        continue;
      }
      pair.en.assign(columns[source.tsv_en_column]);
      pair.fr.assign(columns[source.tsv_fr_column]);
      pair.line = en->line_number();
      return true;
    }
    return false;
  }

  enum class Segment { end, ok, invalid };

  // The next <seg> of an SGM file, whitespace-normalised.
  Segment next_segment(LineReader& reader, std::string& line, std::string& text) {
    while (reader.next(line)) {
      stats.bytes += line.size() + 1;
      const auto seg = sgm_segment_text(line);
      if (!seg) continue;
      if (const auto bad = utf8_first_invalid(*seg)) {
        FLASHGPT_CHECK(policy == BadLinePolicy::skip, "{}:{}: invalid UTF-8 at byte {}", reader.path().string(),
                       reader.line_number(), *bad);
        return Segment::invalid;  // still a segment: the other file's must be consumed with it
      }
      text = text_normalize_whitespace(*seg);
      return Segment::ok;
    }
    return Segment::end;
  }

  bool next_sgm(TextPair& pair) {
    for (;;) {
      const Segment en_seg = next_segment(*en, en_line, pair.en);
      const Segment fr_seg = next_segment(*fr, fr_line, pair.fr);
      if (en_seg == Segment::end && fr_seg == Segment::end) return false;
      FLASHGPT_CHECK((en_seg == Segment::end) == (fr_seg == Segment::end),
                     "unaligned SGM pair: {} and {} have different numbers of <seg> ({} ended first)",
                     en->path().string(), fr->path().string(),
                     en_seg == Segment::end ? en->path().string() : fr->path().string());
      ++stats.read;
      pair.line = ++segment;
      if (en_seg == Segment::invalid || fr_seg == Segment::invalid) {
        ++stats.invalid_utf8;
        continue;
      }
      return true;
    }
  }
};

PairReader::PairReader(const PairSource& source, BadLinePolicy policy, Prefetch prefetch)
    : impl_(std::make_unique<Impl>()) {
  impl_->source = source;
  impl_->policy = policy;
  // Two files decode in parallel, each on its own thread, ahead of the caller.
  impl_->en.emplace(source.en, prefetch);
  if (source.format != PairFormat::tsv) impl_->fr.emplace(source.fr, prefetch);
}

PairReader::PairReader(PairReader&&) noexcept = default;
PairReader& PairReader::operator=(PairReader&&) noexcept = default;
PairReader::~PairReader() = default;

bool PairReader::next(TextPair& pair) {
  switch (impl_->source.format) {
    case PairFormat::aligned: return impl_->next_aligned(pair);
    case PairFormat::tsv: return impl_->next_tsv(pair);
    case PairFormat::sgm: return impl_->next_sgm(pair);
  }
  return false;
}

const ReadStats& PairReader::stats() const { return impl_->stats; }

}  // namespace flashgpt

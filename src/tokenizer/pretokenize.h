// The pretokenizer: splits valid UTF-8 text into pieces exactly as tiktoken's regex for each
// encoding does, with a hand-written matcher per pattern instead of a regex engine.
//
// Every pattern is an ordered alternation, matched leftmost-first with backtracking; each
// function below takes the alternatives in the pattern's order and returns where the first
// one that matches at `i` ends. Pieces tile the text (some alternative always matches), so a
// piece ends exactly where the next one starts. The comments quote the alternative handled.
//
// for_each_piece goes 64 bytes at a time where it can (the *_block functions): the bytes are
// classified into bit masks (ASCII classes and the two-byte Latin letters; SSE2, AVX2 or a
// byte loop), and every piece start in the block comes out of bit operations that work out
// the same alternatives for each byte from its neighbours. The matcher handles what the
// masks do not cover; for_each_piece_scalar is the matcher alone, the reference the block
// path is tested against.
#pragma once

#include <flashgpt/unicode.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace flashgpt {

enum class PatternKind { r50k, cl100k, o200k };

// The byte classes of 64 bytes of valid UTF-8, bit k for byte k: the ASCII classes, and the
// two-byte letters U+00C0..U+027F (all of them letters but U+00D7 and U+00F7), which are
// 98% of the non-ASCII characters of European text. The other non-ASCII bytes are in no
// class; the masks are clean there (no ASCII class marks a byte >= 0x80).
struct BlockClasses {
  uint64_t ascii;       // < 0x80
  uint64_t letter;      // A-Z a-z
  uint64_t digit;       // 0-9
  uint64_t newline;     // \r \n
  uint64_t space;       // the rest of \s: \t \v \f and ' '
  uint64_t blank;       // ' ' alone
  uint64_t apostrophe;  // '
  uint64_t slash;       // /
  uint64_t latin;       // both bytes of a letter in U+00C0..U+027F (a lead in the last byte counts)
  uint64_t latin1;      // the same in U+00C0..U+00FF
  uint64_t lower;       // a-z, and both bytes of U+00DF..U+00FF (\p{Ll} there; the rest is \p{Lu})
};

// One byte at a time: the reference, and the path where SSE2 is missing.
inline BlockClasses block_classify_portable(const uint8_t* p) {
  BlockClasses b{};
  for (int k = 0; k < 64; ++k) {
    uint8_t c = p[k];
    uint64_t bit = uint64_t(1) << k;
    uint8_t folded = c | 0x20;
    if (c < 0x80) b.ascii |= bit;
    if (folded >= 'a' && folded <= 'z') b.letter |= bit;
    if (c >= '0' && c <= '9') b.digit |= bit;
    if (c == '\r' || c == '\n') b.newline |= bit;
    if (c == ' ' || c == '\t' || c == '\v' || c == '\f') b.space |= bit;
    if (c == ' ') b.blank |= bit;
    if (c == '\'') b.apostrophe |= bit;
    if (c == '/') b.slash |= bit;
    if (c >= 'a' && c <= 'z') b.lower |= bit;
    if (c >= 0xC3 && c <= 0xC9) {
      bool times_or_divide = k < 63 && c == 0xC3 && (p[k + 1] == 0x97 || p[k + 1] == 0xB7);
      if (times_or_divide) continue;
      b.latin |= bit | (bit << 1);  // the shift drops bit 64
      if (c == 0xC3) b.latin1 |= bit | (bit << 1);
      if (c == 0xC3 && (k == 63 || p[k + 1] >= 0x9F)) b.lower |= bit | (bit << 1);
    }
  }
  return b;
}

// The two-byte letters from the masks of the SIMD classifiers: leads C3..C9, C3 alone,
// second bytes 97 or B7 (after C3: U+00D7, U+00F7, not letters) and 80..9E (after C3:
// U+00C0..U+00DE, upper case).
[[gnu::always_inline]] inline void add_latin_letters(BlockClasses& b, uint64_t lead, uint64_t c3, uint64_t not_letter,
                                                     uint64_t upper) {
  lead &= ~(c3 & (not_letter >> 1));
  b.latin = lead | (lead << 1);
  const uint64_t lead1 = lead & c3, lower1 = lead1 & ~(upper >> 1);
  b.latin1 = lead1 | (lead1 << 1);
  b.lower |= lower1 | (lower1 << 1);
}

#if defined(__SSE2__)
// 16 bytes per step; a class is a range test done as one signed compare after moving the
// range's first byte to -128. The two-byte letters take a second pass, in blocks that are
// not all ASCII.
[[gnu::always_inline]] inline BlockClasses block_classify(const uint8_t* p) {
  auto in_range = [](__m128i v, uint8_t first, uint8_t count) {
    return _mm_cmplt_epi8(_mm_add_epi8(v, _mm_set1_epi8(char(uint8_t(0x80 - first)))),
                          _mm_set1_epi8(char(uint8_t(0x80 + count))));
  };
  auto load = [&](int k) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k)); };
  auto bits = [](__m128i m, int k) { return uint64_t(uint32_t(_mm_movemask_epi8(m))) << (16 * k); };
  BlockClasses b{};
  uint64_t whitespace = 0;  // \t \n \v \f \r
  for (int k = 0; k < 4; ++k) {
    __m128i v = load(k);
    b.ascii |= bits(v, k);
    b.letter |= bits(in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), 'a', 26), k);
    b.lower |= bits(in_range(v, 'a', 26), k);
    b.digit |= bits(in_range(v, '0', 10), k);
    whitespace |= bits(in_range(v, '\t', 5), k);
    b.newline |= bits(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('\n')), _mm_cmpeq_epi8(v, _mm_set1_epi8('\r'))), k);
    b.blank |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')), k);
    b.apostrophe |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8('\'')), k);
    b.slash |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8('/')), k);
  }
  b.ascii = ~b.ascii;
  b.space = (whitespace & ~b.newline) | b.blank;
  if (b.ascii != ~uint64_t(0)) {
    // C3..C9; C3; 97 or B7 (after C3: U+00D7, U+00F7); 80..9E (after C3: U+00C0..U+00DE)
    uint64_t lead = 0, c3 = 0, not_letter = 0, upper = 0;
    for (int k = 0; k < 4; ++k) {
      __m128i v = load(k);
      lead |= bits(in_range(v, 0xC3, 7), k);
      c3 |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(char(0xC3))), k);
      __m128i times = _mm_cmpeq_epi8(v, _mm_set1_epi8(char(0x97))), divide = _mm_cmpeq_epi8(v, _mm_set1_epi8(char(0xB7)));
      not_letter |= bits(_mm_or_si128(times, divide), k);
      upper |= bits(in_range(v, 0x80, 0x1F), k);
    }
    add_latin_letters(b, lead, c3, not_letter, upper);
  }
  return b;
}
#else
inline BlockClasses block_classify(const uint8_t* p) { return block_classify_portable(p); }
#endif

#if defined(__x86_64__)
#define FLASHGPT_TARGET_AVX2 gnu::target("avx2,bmi,bmi2,lzcnt,popcnt")
namespace avx2 {  // block_classify_avx2's steps
[[FLASHGPT_TARGET_AVX2]] inline __m256i in_range(__m256i v, uint8_t first, uint8_t count) {
  return _mm256_cmpgt_epi8(_mm256_set1_epi8(char(uint8_t(0x80 + count))),
                           _mm256_add_epi8(v, _mm256_set1_epi8(char(uint8_t(0x80 - first)))));
}
[[FLASHGPT_TARGET_AVX2]] inline __m256i equal(__m256i v, char c) { return _mm256_cmpeq_epi8(v, _mm256_set1_epi8(c)); }
[[FLASHGPT_TARGET_AVX2]] inline __m256i load(const uint8_t* p, int k) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * k));
}
[[FLASHGPT_TARGET_AVX2]] inline uint64_t bits(__m256i m, int k) {
  return uint64_t(uint32_t(_mm256_movemask_epi8(m))) << (32 * k);
}
}  // namespace avx2

// The same 32 bytes per step, for CPUs with AVX2 (Pretokenizer checks at run time). Not
// always_inline: GCC refuses that into a caller without the target (the AVX2 loop is
// flatten instead).
[[FLASHGPT_TARGET_AVX2]] inline BlockClasses block_classify_avx2(const uint8_t* p) {
  using namespace avx2;
  BlockClasses b{};
  uint64_t whitespace = 0;  // \t \n \v \f \r
  for (int k = 0; k < 2; ++k) {
    __m256i v = load(p, k);
    b.ascii |= bits(v, k);
    b.letter |= bits(in_range(_mm256_or_si256(v, _mm256_set1_epi8(0x20)), 'a', 26), k);
    b.lower |= bits(in_range(v, 'a', 26), k);
    b.digit |= bits(in_range(v, '0', 10), k);
    whitespace |= bits(in_range(v, '\t', 5), k);
    b.newline |= bits(_mm256_or_si256(equal(v, '\n'), equal(v, '\r')), k);
    b.blank |= bits(equal(v, ' '), k);
    b.apostrophe |= bits(equal(v, '\''), k);
    b.slash |= bits(equal(v, '/'), k);
  }
  b.ascii = ~b.ascii;
  b.space = (whitespace & ~b.newline) | b.blank;
  if (b.ascii != ~uint64_t(0)) {
    uint64_t lead = 0, c3 = 0, not_letter = 0, upper = 0;
    for (int k = 0; k < 2; ++k) {
      __m256i v = load(p, k);
      lead |= bits(in_range(v, 0xC3, 7), k);
      c3 |= bits(equal(v, char(0xC3)), k);
      not_letter |= bits(_mm256_or_si256(equal(v, char(0x97)), equal(v, char(0xB7))), k);
      upper |= bits(in_range(v, 0x80, 0x1F), k);
    }
    add_latin_letters(b, lead, c3, not_letter, upper);
  }
  return b;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
                          __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("lzcnt") &&
                          __builtin_cpu_supports("popcnt");
  return has;
}
#endif

struct PatternSpec {
  PatternKind kind = PatternKind::cl100k;
  // tiktoken's own patterns write contractions as '(?i:[sdmt]|...), whose Unicode case
  // folding also matches U+017F (long s) for 's'; the spelled-out 's|'S|... form does not.
  bool contraction_long_s = false;
  // tiktoken's own cl100k pattern starts the whitespace rules with \s++$: a whitespace run
  // that reaches the end of the text is one piece, even when it holds a newline.
  bool trailing_space_whole = false;
};

// The spec of a known pattern string (the meta.json spellings and tiktoken's own), or nullopt.
std::optional<PatternSpec> pattern_spec_from_string(std::string_view pat_str);
// tiktoken's own pattern for a known encoding, used when no meta.json is present.
std::optional<std::string_view> pattern_builtin(std::string_view encoding_name);

// Which classifier the block path uses: the byte loop, SSE2 (where the build has it: every
// x86-64), AVX2 (x86-64 CPUs that have it).
enum class BlockIsa { portable, sse2, avx2, best };

inline bool block_isa_available(BlockIsa isa) {
  switch (isa) {
    case BlockIsa::portable: return true;
#if defined(__SSE2__)
    case BlockIsa::sse2: return true;
#endif
#if defined(__x86_64__)
    case BlockIsa::avx2: return cpu_has_avx2();
#endif
    default: return false;
  }
}

class Pretokenizer {
 public:
  // `isa` picks the block classifier (the tests run each one); best: AVX2 where the CPU has it.
  Pretokenizer(const PatternSpec& spec, std::string_view text, BlockIsa isa = BlockIsa::best)
      : spec_(spec),
        s_(reinterpret_cast<const uint8_t*>(text.data())),
        n_(text.size()),
        table_(unicode::unicode_flag_table()),
        isa_(isa != BlockIsa::best                    ? isa
             : block_isa_available(BlockIsa::avx2) ? BlockIsa::avx2
             : block_isa_available(BlockIsa::sse2) ? BlockIsa::sse2
                                                   : BlockIsa::portable) {}

  // Where the piece starting at byte `i` (< size) ends.
  size_t piece_end(size_t i) const {
    switch (spec_.kind) {
      case PatternKind::r50k: return r50k_piece_end(i);
      case PatternKind::cl100k: return cl100k_piece_end(i);
      case PatternKind::o200k: return o200k_piece_end(i);
    }
    return n_;
  }

  // Calls emit(begin, end) for every piece in order.
  template <class Emit>
  void for_each_piece(Emit&& emit) const {
    for_each_piece(emit, [&](size_t base, uint64_t starts, size_t end) __attribute__((always_inline)) {
      block_pieces(base, starts, end, emit);
    });
  }

  // The same, where the pieces that a block gives at once go to one call of
  // emit_block(base, starts, end): pieces start at base + k for every bit k of `starts`
  // (bit 0 always set), and the last one ends at `end` (see block_pieces).
  template <class Emit, class EmitBlock>
  void for_each_piece(Emit&& emit, EmitBlock&& emit_block) const {
#if defined(__x86_64__)
    if (isa_ == BlockIsa::avx2) return for_each_piece_avx2(emit, emit_block);
#endif
#if defined(__SSE2__)
    if (isa_ == BlockIsa::sse2) return for_each_piece_with<block_classify>(emit, emit_block);
#endif
    for_each_piece_with<block_classify_portable>(emit, emit_block);
  }

  // The pieces of one emit_block call, one emit(begin, end) each.
  template <class Emit>
  [[gnu::always_inline]] static void block_pieces(size_t base, uint64_t starts, size_t end, Emit&& emit) {
    size_t begin = base;
    for (starts &= starts - 1; starts != 0; starts &= starts - 1) {
      size_t next = base + size_t(std::countr_zero(starts));
      emit(begin, next);
      begin = next;
    }
    emit(begin, end);
  }

  // The same pieces from the character-at-a-time matcher alone: the reference that the
  // block path of for_each_piece is tested against.
  template <class Emit>
  void for_each_piece_scalar(Emit&& emit) const {
    for (size_t i = 0; i < n_;) {
      size_t e = piece_end(i);
      emit(i, e);
      i = e;
    }
  }

 private:
  // The piece starts among 64 bytes from a piece start, and how far they are final.
  struct BlockCut {
    uint64_t starts;        // bit k: a piece starts at byte k of the block (bit 0 always)
    unsigned cut;           // the starts below `cut` are final, and a piece starts at cut; 0: none
    unsigned scalar_until;  // when cut is 0: past the block's last unclassed byte, or 64
  };

  template <BlockClasses (*kClassify)(const uint8_t*), class Emit, class EmitBlock>
  [[gnu::always_inline]] void for_each_piece_with(Emit&& emit, EmitBlock&& emit_block) const {
    switch (spec_.kind) {
      case PatternKind::r50k:
        return pieces_by_block<kClassify, &Pretokenizer::r50k_block, &Pretokenizer::r50k_piece_end>(emit, emit_block);
      case PatternKind::cl100k:
        return pieces_by_block<kClassify, &Pretokenizer::cl100k_block, &Pretokenizer::cl100k_piece_end>(emit,
                                                                                                          emit_block);
      case PatternKind::o200k:
        return pieces_by_block<kClassify, &Pretokenizer::o200k_block, &Pretokenizer::o200k_piece_end>(emit, emit_block);
    }
  }
#if defined(__x86_64__)
  // flatten: GCC inlines block_classify_avx2 only this way (an always_inline function
  // with the target cannot be called from pieces_by_block, which has none); emit is
  // inlined too unless it is noinline.
  template <class Emit, class EmitBlock>
  [[FLASHGPT_TARGET_AVX2, gnu::flatten]] void for_each_piece_avx2(Emit&& emit, EmitBlock&& emit_block) const {
    for_each_piece_with<block_classify_avx2>(emit, emit_block);
  }
#endif

  // Blocks of 64 bytes while they last; the matcher where a block has no final boundary
  // (other non-ASCII characters, runs longer than a block) and for the last 63 bytes.
  template <BlockClasses (*kClassify)(const uint8_t*),
            BlockCut (Pretokenizer::*kBlock)(size_t, const BlockClasses&) const,
            size_t (Pretokenizer::*kPieceEnd)(size_t) const, class Emit, class EmitBlock>
  [[gnu::always_inline]] void pieces_by_block(Emit&& emit, EmitBlock&& emit_block) const {
    size_t i = 0;
    while (i + 64 <= n_) {
      BlockCut block = (this->*kBlock)(i, kClassify(s_ + i));
      if (block.cut == 0) {
        size_t stop = i + block.scalar_until;
        while (i < stop) { size_t e = (this->*kPieceEnd)(i); emit(i, e); i = e; }
        continue;
      }
      emit_block(i, block.starts & ((uint64_t(1) << block.cut) - 1), i + block.cut);
      i += block.cut;
    }
    while (i < n_) { size_t e = (this->*kPieceEnd)(i); emit(i, e); i = e; }
  }

  // The last cut, or where the matcher takes over when there is none. `cuts`: offsets where
  // a piece starts whatever follows, and below which every start is final.
  static BlockCut block_cut(uint64_t starts, uint64_t cuts, uint64_t unclassed) {
    if (cuts == 0) {
      // (A word, a number or a whitespace or punctuation run over the whole block, or a
      // character in no class near its start.)
      unsigned until = unclassed == 0 ? 64 : 64 - unsigned(std::countl_zero(unclassed));
      return {0, 0, until};
    }
    return {starts, 63 - unsigned(std::countl_zero(cuts)), 0};
  }
  // `starts` with bytes from..end-1 of a contraction inside a piece, and a piece at `end`.
  static uint64_t block_contraction(uint64_t starts, size_t from, size_t end) {
    uint64_t below_end = end < 64 ? (uint64_t(1) << end) - 1 : ~uint64_t(0);
    uint64_t below_from = from < 64 ? (uint64_t(1) << from) - 1 : ~uint64_t(0);
    return (starts & ~(below_end & ~below_from)) | (end < 64 ? uint64_t(1) << end : 0);
  }
  // Bytes before the first unclassed one.
  static uint64_t block_known(uint64_t unclassed) {
    return unclassed == 0 ? ~uint64_t(0) : (uint64_t(1) << std::countr_zero(unclassed)) - 1;
  }

  // '\p{N}{1,3}' (cl100k and o200k): every third digit of a run of digits D starts a piece.
  [[gnu::always_inline]] static uint64_t digit_starts(uint64_t D) {
    uint64_t start_d = D & ~(D << 1);
    const uint64_t digit3 = D & (D << 1) & (D << 2);
    for (uint64_t group = start_d; (group = (group << 3) & digit3) != 0;) start_d |= group;
    return start_d;
  }
  // Where whitespace starts a piece, the same in cl100k and o200k: letters L, digits D,
  // others O, newlines NL, other whitespace R, and the newlines that an O run's piece took
  // (`eaten`).
  [[gnu::always_inline]] static uint64_t whitespace_starts(uint64_t L, uint64_t D, uint64_t O, uint64_t NL,
                                                           uint64_t R, uint64_t eaten) {
    auto prev = [](uint64_t x) { return x << 1; };
    auto next = [](uint64_t x) { return x >> 1; };
    // '\s*[\r\n]+' ends after a run's last newline: newlines start a piece only after a
    // letter or a digit (after whitespace or an O they belong to the piece before).
    const uint64_t start_nl = NL & ~prev(NL | R | O);
    // Other whitespace starts a piece where a run begins (after L, D, O or eaten newlines),
    // and at its last byte before a non-space ('\s+(?!\S)' leaves it for the next piece).
    uint64_t start_r = R & (prev(L | D | O | eaten) | (prev(R) & next(L | D | O)));
    // After a newline that is not eaten, where the newline piece ended: only when no newline
    // follows in the run (smeared back through the run of spaces).
    if (const uint64_t after_newline = R & prev(NL & ~eaten)) {
      uint64_t before_newline = R & next(NL), run = R;
      for (int shift = 1; shift < 64; shift *= 2) {
        before_newline |= (before_newline >> shift) & run;
        run &= run >> shift;
      }
      start_r |= after_newline & ~before_newline;
    }
    return start_nl | start_r;
  }

  // cl100k's pieces in the classed bytes of the 64 at i (a piece start, i + 64 <= n_), all at
  // once with bit operations on class masks; each rule below is the pattern's alternatives
  // worked out for a byte of that class from its neighbours (what cl100k_piece_end does one
  // piece at a time). A start at byte k depends on bytes k-2..k+1, except in whitespace runs
  // (on where the run ends), so the starts are final below a `cut`: a letter or a digit
  // followed by a byte of another class, both classed. A two-byte letter is two letter bytes:
  // no rule starts a piece at a letter after a letter.
  [[gnu::always_inline]] BlockCut cl100k_block(size_t i, const BlockClasses& b) const {
    auto prev = [](uint64_t x) { return x << 1; };  // bit k: byte k-1 is in x
    const uint64_t L = b.letter | b.latin, D = b.digit, NL = b.newline, R = b.space;
    const uint64_t W = NL | R, O = ~(L | D | W);  // O: [^\s\p{L}\p{N}] (and unclassed bytes)
    // Before the first byte in no class; cuts only there.
    const uint64_t unclassed = ~(b.ascii | b.latin);
    const uint64_t cuts = ((prev(L) & ~L) | (prev(D) & ~D)) & block_known(unclassed);
    if (cuts == 0) return block_cut(0, 0, unclassed);
    // ' ?[^\s\p{L}\p{N}]+': a run of O starts a piece unless a ' ' before it takes it.
    const uint64_t start_o = O & ~prev(O | b.blank);
    // '[^\r\n\p{L}\p{N}]?\p{L}+': letters start after a digit or a newline, and after an O
    // that is inside a run; an O that starts a piece, or whitespace before the letters
    // (always the last byte of its run, where a piece starts), is their prefix.
    const uint64_t start_l = L & prev(D | NL | (O & ~start_o));
    // '[\r\n]*' after an O run takes the newlines right after it.
    const uint64_t eaten = NL & ~(NL + (NL & prev(O)));
    uint64_t starts = start_o | start_l | digit_starts(D) | whitespace_starts(L, D, O, NL, R, eaten) | 1;
    // "'(?i:s|t|re|ve|m|ll|d)" comes first where a ' starts a piece: the letters after it
    // start a new one.
    for (uint64_t quotes = b.apostrophe & start_o; quotes != 0; quotes &= quotes - 1) {
      size_t k = size_t(std::countr_zero(quotes));
      if (size_t e = contraction_end(i + k, /*case_insensitive=*/true); e != 0 && e - i < 64)
        starts |= uint64_t(1) << (e - i);
    }
    return block_cut(starts, cuts, unclassed);
  }

  // r50k in the same way: ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+' each take a ' ' before
  // them (the last byte of its whitespace run, where a piece always starts), and
  // '\s+(?!\S)|\s+' leaves a run's last byte for the next piece when one follows.
  [[gnu::always_inline]] BlockCut r50k_block(size_t i, const BlockClasses& b) const {
    auto prev = [](uint64_t x) { return x << 1; };
    auto next = [](uint64_t x) { return x >> 1; };
    const uint64_t L = b.letter | b.latin, D = b.digit, W = b.newline | b.space, O = ~(L | D | W);
    const uint64_t unclassed = ~(b.ascii | b.latin);
    const uint64_t cuts = ((prev(L) & ~L) | (prev(D) & ~D)) & block_known(unclassed);
    if (cuts == 0) return block_cut(0, 0, unclassed);
    const uint64_t start_o = O & ~prev(O | b.blank);
    uint64_t starts = (L & ~prev(L | b.blank)) | (D & ~prev(D | b.blank)) | start_o |
                      (W & ~(prev(W) & ~next(L | D | O))) | 1;
    // "'s|'t|'re|'ve|'m|'ll|'d" comes first where a ' starts a piece: its letters start no
    // piece (there is no prefix before letters here but ' '), the byte after it does.
    for (uint64_t quotes = b.apostrophe & start_o; quotes != 0; quotes &= quotes - 1) {
      size_t k = size_t(std::countr_zero(quotes));
      if (size_t e = contraction_end(i + k, /*case_insensitive=*/false); e != 0)
        starts = block_contraction(starts, k + 1, e - i);
    }
    return block_cut(starts, cuts, unclassed);
  }

  // o200k in the same way, with the letters of U+00C0..U+00FF only (upper or lower case is
  // all that matters there: [Upper]*[Lower]+|[Upper]+[Lower]* splits a letter run before
  // an upper-case letter that follows a lower-case one). Differences to cl100k: a
  // contraction is a suffix, taken right after the letters ("'s" after a letter is no piece
  // start), and an O run takes the newlines and '/' after it ('[\r\n/]*').
  [[gnu::always_inline]] BlockCut o200k_block(size_t i, const BlockClasses& b) const {
    auto prev = [](uint64_t x) { return x << 1; };
    const uint64_t L = b.letter | b.latin1, lower = b.lower, upper = L & ~lower;
    const uint64_t D = b.digit, NL = b.newline, R = b.space;
    const uint64_t W = NL | R, O = ~(L | D | W);
    const uint64_t unclassed = ~(b.ascii | b.latin1);
    // A ' after a letter may be a contraction that continues the word: no cut there.
    const uint64_t cuts = ((prev(L) & ~L & ~b.apostrophe) | (prev(D) & ~D)) & block_known(unclassed);
    if (cuts == 0) return block_cut(0, 0, unclassed);
    // '[\r\n/]*': the newlines and '/' from a newline right after an O run (a '/' is an O
    // itself) to the next other byte are the run's (smeared forward through that run).
    uint64_t eaten = NL & prev(O);
    if (eaten != 0) {
      uint64_t run = NL | b.slash;
      for (int shift = 1; shift < 64; shift *= 2) {
        eaten |= (eaten << shift) & run;
        run &= run << shift;
      }
    }
    const uint64_t start_o = O & ~eaten & ~prev((O & ~eaten) | b.blank);
    const uint64_t after_break = prev(D | NL | (O & ~start_o));  // no prefix before a letter here
    const uint64_t start_l = (upper & (after_break | prev(lower))) | (lower & after_break);
    uint64_t starts = start_o | start_l | digit_starts(D) | whitespace_starts(L, D, O, NL, R, eaten) | 1;
    // "(?i:'s|'t|'re|'ve|'m|'ll|'d)?" right after the letters: the ' is the word's, and a
    // piece starts after the contraction (also where a ' follows: one contraction a word).
    uint64_t contraction_ends = 0;
    for (uint64_t quotes = b.apostrophe & prev(L); quotes != 0; quotes &= quotes - 1) {
      size_t k = size_t(std::countr_zero(quotes));
      if (contraction_ends >> k & 1) continue;
      if (size_t e = contraction_end(i + k, /*case_insensitive=*/true); e != 0) {
        starts = block_contraction(starts, k, e - i);
        if (e - i < 64) contraction_ends |= uint64_t(1) << (e - i);
      }
    }
    return block_cut(starts, cuts, unclassed);
  }

  struct Char {
    uint8_t flags;
    uint8_t length;
  };
  static constexpr uint8_t kLetterNumberSpace = unicode::kLetter | unicode::kNumber | unicode::kSpace;

  [[gnu::always_inline]] Char at(size_t i) const {
    uint8_t b = s_[i];
    if (b < 0x80) return {table_[b], 1};
    uint32_t cp;
    uint8_t length;
    if (b < 0xE0) {
      cp = (b & 0x1Fu) << 6 | (s_[i + 1] & 0x3Fu), length = 2;
    } else if (b < 0xF0) {
      cp = (b & 0x0Fu) << 12 | (s_[i + 1] & 0x3Fu) << 6 | (s_[i + 2] & 0x3Fu), length = 3;
    } else {
      cp = (b & 0x07u) << 18 | (s_[i + 1] & 0x3Fu) << 12 | (s_[i + 2] & 0x3Fu) << 6 | (s_[i + 3] & 0x3Fu), length = 4;
    }
    return {table_[cp], length};
  }
  static bool is_other(Char c) { return !(c.flags & kLetterNumberSpace); }  // [^\s\p{L}\p{N}]
  bool is_newline(size_t i) const { return s_[i] == '\r' || s_[i] == '\n'; }

  // End of the run of characters having any of `mask`, from i.
  [[gnu::always_inline]] size_t run(size_t i, uint8_t mask) const {
    if (mask & unicode::kLetter) i = run_ascii_letters(i);
    while (i < n_) {
      if (s_[i] < 0x80) {
        if (!(table_[s_[i]] & mask)) break;
        ++i;
        continue;
      }
      Char c = at(i);
      if (!(c.flags & mask)) break;
      i += c.length;
    }
    return i;
  }
  // Skips ASCII letters eight at a time (SWAR): with the case bit set, a byte is a letter
  // when it is in 'a'..'z', i.e. adding 0x1F sets its high bit and adding 0x05 does not.
  // No byte carries into the next because all are below 0x80.
  [[gnu::always_inline]] size_t run_ascii_letters(size_t i) const {
    constexpr uint64_t kHigh = 0x8080808080808080ull, kCase = 0x2020202020202020ull;
    constexpr uint64_t kFromA = 0x1F1F1F1F1F1F1F1Full, kPastZ = 0x0505050505050505ull;
    while (i + 8 <= n_) {
      uint64_t w;
      std::memcpy(&w, s_ + i, 8);
      if (w & kHigh) return i;
      uint64_t x = w | kCase;
      uint64_t letters = (x + kFromA) & ~(x + kPastZ) & kHigh;
      if (letters != kHigh) return i + size_t(__builtin_ctzll(~letters & kHigh)) / 8;
      i += 8;
    }
    return i;
  }
  size_t run_other(size_t i) const {
    while (i < n_) {
      Char c = at(i);
      if (!is_other(c)) break;
      i += c.length;
    }
    return i;
  }
  size_t run_digits_max3(size_t i) const {  // \p{N}{1,3}
    for (int k = 0; k < 3 && i < n_; ++k) {
      Char c = at(i);
      if (!(c.flags & unicode::kNumber)) break;
      i += c.length;
    }
    return i;
  }
  size_t run_newlines(size_t i, bool with_slash) const {  // [\r\n]* or [\r\n/]*
    while (i < n_ && (is_newline(i) || (with_slash && s_[i] == '/'))) ++i;
    return i;
  }

  // 's|'t|'re|'ve|'m|'ll|'d at i (s_[i] is '\''), case-insensitive for cl100k and o200k;
  // 0 when none matches.
  size_t contraction_end(size_t i, bool case_insensitive) const {
    if (i + 1 >= n_) return 0;
    auto lower = [&](uint8_t b) -> uint8_t { return case_insensitive && b >= 'A' && b <= 'Z' ? b + 32 : b; };
    uint8_t c1 = lower(s_[i + 1]);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 >= n_) return 0;
    if (spec_.contraction_long_s && c1 == 0xC5 && s_[i + 2] == 0xBF) return i + 3;  // U+017F
    uint8_t c2 = lower(s_[i + 2]);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
    return 0;
  }

  // The whitespace rules at a whitespace character i:
  //   [\s++$]  \s*[\r\n]+ (when `newline_rule`)  |\s+(?!\S)  |\s+
  // \s*[\r\n]+ backtracks to the last newline of the run; \s+(?!\S) leaves the run's last
  // character for the next piece when a non-space follows.
  size_t whitespace_end(size_t i, bool newline_rule) const {
    size_t j = i, last_start = i, last_newline = SIZE_MAX;
    while (j < n_) {
      Char c = at(j);
      if (!(c.flags & unicode::kSpace)) break;
      if (is_newline(j)) last_newline = j;
      last_start = j;
      j += c.length;
    }
    if (spec_.trailing_space_whole && j == n_) return j;
    if (newline_rule && last_newline != SIZE_MAX) return last_newline + 1;
    if (j == n_) return j;
    return last_start > i ? last_start : j;
  }

  // r50k: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  size_t r50k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    if (b == '\'') {
      if (size_t e = contraction_end(i, /*case_insensitive=*/false)) return e;
    }
    if (b == ' ' && i + 1 < n_) {
      Char next = at(i + 1);
      if (next.flags & unicode::kLetter) return run(i + 1, unicode::kLetter);
      if (next.flags & unicode::kNumber) return run(i + 1, unicode::kNumber);
      if (is_other(next)) return run_other(i + 1);
    }
    Char c = at(i);
    if (c.flags & unicode::kLetter) return run(i, unicode::kLetter);
    if (c.flags & unicode::kNumber) return run(i, unicode::kNumber);
    if (is_other(c)) return run_other(i);
    return whitespace_end(i, /*newline_rule=*/false);
  }

  // cl100k: '(?i:s|t|re|ve|m|ll|d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
  //         |\s*[\r\n]+|\s+(?!\S)|\s+
  size_t cl100k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    if (b == '\'') {
      if (size_t e = contraction_end(i, /*case_insensitive=*/true)) return e;
    }
    Char c = at(i);
    if (!(c.flags & (unicode::kLetter | unicode::kNumber)) && !is_newline(i)) {
      size_t k = i + c.length;
      if (k < n_ && (at(k).flags & unicode::kLetter)) return run(k, unicode::kLetter);
    }
    if (c.flags & unicode::kLetter) return run(i, unicode::kLetter);
    if (c.flags & unicode::kNumber) return run_digits_max3(i);
    if (b == ' ' && i + 1 < n_ && is_other(at(i + 1))) return run_newlines(run_other(i + 1), false);
    if (is_other(c)) return run_newlines(run_other(i), false);
    return whitespace_end(i, /*newline_rule=*/true);
  }

  // o200k's first alternative from p: [Upper]*[Lower]+ where the classes overlap (Lm, Lo, M),
  // so when no lower character follows the upper run, [Upper]* gives back its last
  // character that is also lower. 0 when it does not match.
  size_t o200k_upper_then_lower(size_t p) const {
    size_t j = p, after_last_lower = 0;
    while (j < n_) {
      Char c = at(j);
      if (!(c.flags & unicode::kUpper)) break;
      j += c.length;
      if (c.flags & unicode::kLower) after_last_lower = j;
    }
    size_t e = run(j, unicode::kLower);
    return e > j ? e : after_last_lower;
  }
  // o200k's second alternative from p: [Upper]+[Lower]*; 0 when it does not match.
  size_t o200k_upper_run(size_t p) const {
    size_t j = run(p, unicode::kUpper);
    return j == p ? 0 : run(j, unicode::kLower);
  }
  size_t o200k_with_contraction(size_t e) const {
    if (e < n_ && s_[e] == '\'') {
      if (size_t c = contraction_end(e, /*case_insensitive=*/true)) return c;
    }
    return e;
  }

  // o200k: [^\r\n\p{L}\p{N}]?[Upper]*[Lower]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //       |[^\r\n\p{L}\p{N}]?[Upper]+[Lower]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //       |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
  // with Upper = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and Lower = [\p{Ll}\p{Lm}\p{Lo}\p{M}].
  size_t o200k_piece_end(size_t i) const {
    uint8_t b = s_[i];
    Char c = at(i);
    size_t k = i + c.length;
    bool prefix = !(c.flags & (unicode::kLetter | unicode::kNumber)) && !is_newline(i) && k < n_;
    if (prefix) {
      if (size_t e = o200k_upper_then_lower(k)) return o200k_with_contraction(e);
    }
    if (c.flags & (unicode::kUpper | unicode::kLower)) {
      if (size_t e = o200k_upper_then_lower(i)) return o200k_with_contraction(e);
    }
    if (prefix) {
      if (size_t e = o200k_upper_run(k)) return o200k_with_contraction(e);
    }
    if (c.flags & unicode::kUpper) {
      if (size_t e = o200k_upper_run(i)) return o200k_with_contraction(e);
    }
    if (c.flags & unicode::kNumber) return run_digits_max3(i);
    if (b == ' ' && i + 1 < n_ && is_other(at(i + 1))) return run_newlines(run_other(i + 1), true);
    if (is_other(c)) return run_newlines(run_other(i), true);
    return whitespace_end(i, /*newline_rule=*/true);
  }

  PatternSpec spec_;
  const uint8_t* s_;
  size_t n_;
  const uint8_t* table_;
  BlockIsa isa_;
};

}  // namespace flashgpt

#include <flashgpt/unicode.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace flashgpt::unicode {

namespace {
constexpr uint32_t kCodePointCount = 0x110000;
}  // namespace

const uint8_t* unicode_flag_table() {
  static const std::unique_ptr<uint8_t[]> table = [] {
    auto flags = std::make_unique<uint8_t[]>(kCodePointCount);
    for (size_t i = 0; i < kUnicodeRangeCount; ++i) {
      uint32_t end = i + 1 < kUnicodeRangeCount ? kUnicodeRanges[i + 1].first : kCodePointCount;
      std::memset(flags.get() + kUnicodeRanges[i].first, kUnicodeRanges[i].flags, end - kUnicodeRanges[i].first);
    }
    return flags;
  }();
  return table.get();
}

uint8_t unicode_flags_slow(uint32_t code_point) {
  if (code_point >= kCodePointCount) return 0;
  const UnicodeRange* end = kUnicodeRanges + kUnicodeRangeCount;
  const UnicodeRange* it = std::upper_bound(kUnicodeRanges, end, code_point,
                                            [](uint32_t cp, const UnicodeRange& r) { return cp < r.first; });
  return (it - 1)->flags;
}

// Well-formed UTF-8 (Unicode Table 3-7): the lead byte fixes the length and the range of
// the second byte; later bytes are 80..BF.
size_t utf8_sequence_length(std::string_view text, size_t pos, bool* truncated) {
  *truncated = false;
  auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  uint8_t lead = byte(pos);
  if (lead < 0x80) return 1;
  size_t length;
  uint8_t lo = 0x80, hi = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k < length; ++k) {
    if (pos + k >= text.size()) {
      *truncated = true;
      return 0;
    }
    uint8_t b = byte(pos + k);
    if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
  }
  return length;
}

// ASCII and two-byte sequences go 64 bytes at a time, ASCII alone 16 (SSE2; 8 with SWAR
// elsewhere), and the two- and three-byte sequences of Latin, Cyrillic, Devanagari or CJK
// text are checked inline: the call to utf8_sequence_length per character was most of
// this function's time on such text.
size_t utf8_find_invalid(std::string_view text) {
  auto s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t pos = 0;
  while (pos < n) {
#if defined(__SSE2__)
    // 64 bytes at a time while they hold only ASCII and two-byte sequences (Latin, Greek,
    // Cyrillic, Hebrew, Arabic text): every byte >= 0x80 is a lead C2..DF followed by one
    // continuation 80..BF, or that continuation. Anything else goes to the loops below.
    while (pos + 64 <= n) {
      __m128i v[4];
      for (int k = 0; k < 4; ++k) v[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + pos + 16 * k));
      if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(v[0], v[1]), _mm_or_si128(v[2], v[3]))) == 0) {
        pos += 64;
        continue;
      }
      uint64_t high = 0, lead = 0, continuation = 0;
      for (int k = 0; k < 4; ++k) {
        auto bits = [&](__m128i m) { return uint64_t(uint32_t(_mm_movemask_epi8(m))) << (16 * k); };
        high |= bits(v[k]);
        // signed: C2..DF is -62..-33, 80..BF is -128..-65
        lead |= bits(_mm_and_si128(_mm_cmpgt_epi8(v[k], _mm_set1_epi8(char(0xC1))),
                                   _mm_cmplt_epi8(v[k], _mm_set1_epi8(char(0xE0)))));
        continuation |= bits(_mm_cmplt_epi8(v[k], _mm_set1_epi8(char(0xC0))));
      }
      const uint64_t last_lead = lead >> 63;  // its continuation is byte 64
      if (high != (lead | continuation) || continuation != lead << 1) break;
      if (last_lead != 0 && (pos + 64 == n || (s[pos + 64] & 0xC0) != 0x80)) break;
      pos += 64 + last_lead;
    }
    while (pos + 16 <= n) {
      uint32_t high = uint32_t(_mm_movemask_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + pos))));
      if (high != 0) {
        pos += size_t(std::countr_zero(high));
        break;
      }
      pos += 16;
    }
#endif
    while (pos + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, s + pos, 8);
      uint64_t high = word & 0x8080808080808080ull;
      if (high != 0) {
        pos += size_t(std::countr_zero(high)) / 8;
        break;
      }
      pos += 8;
    }
    // Up to the next ASCII byte (or the end), one character at a time.
    while (pos < n) {
      uint8_t lead = s[pos];
      if (lead < 0x80) {
        ++pos;
        break;
      }
      if (lead >= 0xC2 && lead <= 0xDF && pos + 1 < n && (s[pos + 1] & 0xC0) == 0x80) {
        pos += 2;
        continue;
      }
      if ((lead & 0xF0) == 0xE0 && pos + 2 < n) {
        uint8_t second = s[pos + 1];
        uint8_t low = lead == 0xE0 ? 0xA0 : 0x80, high = lead == 0xED ? 0x9F : 0xBF;
        if (second >= low && second <= high && (s[pos + 2] & 0xC0) == 0x80) {
          pos += 3;
          continue;
        }
      }
      bool truncated;
      size_t length = utf8_sequence_length(text, pos, &truncated);
      if (length == 0) return pos;
      pos += length;
    }
  }
  return n;
}

size_t utf8_invalid_length(std::string_view text, size_t pos) {
  size_t skip = 1;
  uint8_t lead = static_cast<uint8_t>(text[pos]);
  if (lead >= 0xC2 && lead <= 0xF4) {
    uint8_t lo = lead == 0xE0 ? 0xA0 : lead == 0xF0 ? 0x90 : 0x80;
    uint8_t hi = lead == 0xED ? 0x9F : lead == 0xF4 ? 0x8F : 0xBF;
    size_t need = lead <= 0xDF ? 2 : lead <= 0xEF ? 3 : 4;
    while (skip < need && pos + skip < text.size()) {
      uint8_t b = static_cast<uint8_t>(text[pos + skip]);
      bool ok = skip == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
      if (!ok) break;
      ++skip;
    }
  }
  return skip;
}

std::string utf8_replace_invalid(std::string_view text) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(text.size() + 16);
  size_t pos = 0;
  while (pos < text.size()) {
    bool truncated;
    size_t length = utf8_sequence_length(text, pos, &truncated);
    if (length > 0) {
      out.append(text.substr(pos, length));
      pos += length;
      continue;
    }
    size_t skip = utf8_invalid_length(text, pos);
    out.append(kReplacement);
    pos += skip;
  }
  return out;
}

}  // namespace flashgpt::unicode

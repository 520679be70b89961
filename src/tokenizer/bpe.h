// Byte-pair merging of one piece, exactly as tiktoken: repeatedly merge the adjacent pair
// of parts whose concatenation has the lowest rank (the leftmost one on ties) until no pair
// is a token. Short pieces use tiktoken's scan (fast for a few parts); long ones a heap of
// candidate pairs over a linked list of parts, O(n log n) instead of O(n^2).
#pragma once

#include <flashgpt/tokenizer.h>

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <bit>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace flashgpt {

inline constexpr uint32_t kNoRank = UINT32_MAX;

// Hash map from token bytes to rank, laid out as a "Swiss table": slots in groups of 16, and
// beside them one tag byte per slot (8 bits of the key's hash; 0: empty). A lookup compares
// its tag with the 16 tags of the key's home group at once (SSE2, or SWAR elsewhere), which
// names the few slots worth comparing: most failed lookups end there, in one line of a
// 128 KB array that stays in L2 (it replaces a Bloom filter of the same size), and a hit
// reads exactly one slot, with no probe loop to mispredict. A key goes to the first group
// from its home on (home, home + 1, ...) that has an empty slot, so a lookup moves to the
// next group only when a group is full (one in five at this load) and does not hold it.
// The bytes live in the tokenizer's arena; a slot holds the key's first 8 bytes, its
// length and rank, and tails_ the next 8 bytes.
class RankMap {
 public:
  static constexpr size_t kGroupSize = 16;
  // tokens[r] = the bytes of rank r (empty for ranks the file does not have).
  void build(const std::vector<std::string_view>& tokens);
  // A key's bytes 0..7 and 8..15 (zero-padded) and its hash, computed once per piece and
  // shared by the tags, the slots and the caller's piece cache.
  struct Key {
    uint64_t head;
    uint64_t tail;
    uint64_t hash;
  };
  static Key key(const uint8_t* p, size_t n) {
    return key_from_words(p, n, prefix8(p, n), n > 8 ? prefix8(p + 8, n - 8) : 0);
  }
  // The same, for a key whose first 8-byte word (and second, when n > 8) may be read whole
  // past its end: one load a word instead of up to three.
  static Key key_overread(const uint8_t* p, size_t n) {
    auto first_bytes = [](uint64_t word, size_t count) { return count >= 8 ? word : word & (~uint64_t(0) >> (64 - 8 * count)); };
    return key_from_words(p, n, first_bytes(load64(p), n), n > 8 ? first_bytes(load64(p + 8), n - 8) : 0);
  }

  // Bit i set where byte i of a 16-byte group equals the tag, and where it is 0 (empty).
  struct GroupMatch {
    uint32_t tags;
    uint32_t empty;
  };
  static GroupMatch group_match(const uint8_t* group, uint8_t tag) {
#if defined(__SSE2__)
    return group_match_sse2(group, tag);
#else
    return group_match_swar(group, tag);
#endif
  }
#if defined(__SSE2__)
  static GroupMatch group_match_sse2(const uint8_t* group, uint8_t tag) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(group));
    return {uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_set1_epi8(char(tag))))),
            uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128())))};
  }
#endif
  // The portable form, eight bytes at a time; exact (no borrow from one byte to the next),
  // because an empty slot it made up would end a lookup too early.
  static GroupMatch group_match_swar(const uint8_t* group, uint8_t tag) {
    const uint64_t broadcast = uint64_t(tag) * 0x0101010101010101ull;
    uint64_t low = load64(group), high = load64(group + 8);
    return {high_bits_gather(zero_bytes(low ^ broadcast)) | high_bits_gather(zero_bytes(high ^ broadcast)) << 8,
            high_bits_gather(zero_bytes(low)) | high_bits_gather(zero_bytes(high)) << 8};
  }

  // What a lookup learns from the tags of a group: the slots whose tag matches (bit i: slot
  // group * 16 + i). The per-piece queue takes it early, to prefetch the one slot that a
  // hit reads. Whether the group is full (the key may then be further on) is asked only
  // when no candidate holds the key.
  struct Probe {
    uint32_t group;
    uint32_t candidates;
  };
  Probe probe(uint64_t hash) const { return probe_group(hash & group_mask_, tag_of(hash)); }
  // The slot of the first candidate (any slot of the group when none), and its tail, for
  // the caller to prefetch.
  const void* slot_address(const Probe& pr) const { return &slots_[first_candidate(pr)]; }
  const void* tail_address(const Probe& pr) const { return &tails_[first_candidate(pr)]; }

  uint32_t find(const uint8_t* bytes, size_t length) const { return find(bytes, length, key(bytes, length)); }
  uint32_t find(const uint8_t* bytes, size_t length, const Key& k) const {
    return find_probed(bytes, length, k, probe(k.hash));
  }
  // The lookup from a probe of the key's home group. A slot keeps the key's first 8 bytes,
  // so keys up to 8 bytes (most lookups) compare in the slot, and keys up to 16 bytes with
  // tails_ beside it; longer ones also compare the rest, out of line (few tokens are).
  uint32_t find_probed(const uint8_t* bytes, size_t length, const Key& k, Probe pr) const {
    const uint32_t want = uint32_t(std::min<size_t>(length, kLongLength)) << kRankBits;
    for (;;) {
      for (uint32_t c = pr.candidates; c != 0; c &= c - 1) {
        size_t i = pr.group * kGroupSize + size_t(std::countr_zero(c));
        const Slot& slot = slots_[i];
        if (slot.head != k.head || (slot.meta & ~kRankMask) != want || (length > 8 && tails_[i] != k.tail)) continue;
        uint32_t rank = slot.meta & kRankMask;
        if (length <= 16 || rest_equal(rank, bytes, length)) return rank;
      }
      if (group_match(&tags_[pr.group * kGroupSize], 0).empty != 0) return kNoRank;
      pr = probe_group((pr.group + 1) & group_mask_, tag_of(k.hash));
    }
  }
  // The rank of a two-byte token, from a direct table (the first lookups of every merge).
  uint32_t find_pair(const uint8_t* p) const { return pair_ranks_[size_t(p[0]) << 8 | p[1]]; }
  uint32_t find_byte(uint8_t b) const { return byte_ranks_[b]; }
  // One more than the highest rank.
  size_t size() const { return offsets_.empty() ? 0 : offsets_.size() - 1; }
  // The first min(n, 8) bytes as a little-endian number, zero-padded; in-bounds loads only.
  static uint64_t prefix8(const uint8_t* p, size_t n) {
    if (n >= 8) return load64(p);
    if (n >= 4) return uint64_t(load32(p)) | uint64_t(load32(p + n - 4)) << (8 * (n - 4));
    if (n == 0) return 0;
    return uint64_t(p[0]) | uint64_t(p[n / 2]) << (8 * (n / 2)) | uint64_t(p[n - 1]) << (8 * (n - 1));
  }
  // Equality of short byte strings without a call to memcmp (all loads stay in bounds).
  static bool bytes_equal(const uint8_t* a, const uint8_t* b, size_t n) {
    if (n >= 8) {
      size_t i = 0;
      for (; i + 8 <= n; i += 8)
        if (load64(a + i) != load64(b + i)) return false;
      return i == n || load64(a + n - 8) == load64(b + n - 8);
    }
    if (n >= 4) return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
    for (size_t i = 0; i < n; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }
  static uint64_t load64(const uint8_t* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
  }
  static uint32_t load32(const uint8_t* p) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return w;
  }

 private:
  static Key key_from_words(const uint8_t* p, size_t n, uint64_t head, uint64_t tail) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
    if (n <= 8) return {head, tail, mix(h ^ head)};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) h = mix(h ^ load64(p + i));
    if (i < n) h = mix(h ^ load64(p + n - 8));  // the tail, overlapping the last full word
    return {head, tail, h};
  }
  Probe probe_group(size_t group, uint8_t tag) const {
    GroupMatch m = group_match(&tags_[group * kGroupSize], tag);
    return {uint32_t(group), m.tags};
  }
  // Bytes 16.. of a key of `length` (> 16) against those of the token of `rank`.
  bool rest_equal(uint32_t rank, const uint8_t* bytes, size_t length) const;
  // One 64x64->128-bit multiply, the halves folded (wyhash's "mum"): every output bit
  // depends on every input bit, in one multiply's latency where splitmix64's finalizer
  // chained two multiplies and two shifts (this hash is on every piece's critical path:
  // hash, tag group, prefetch).
  static uint64_t mix(uint64_t x) {
    unsigned __int128 product = (unsigned __int128)(x ^ 0xA0761D6478BD642Full) * 0xE7037ED1A0B428DBull;
    return uint64_t(product) ^ uint64_t(product >> 64);
  }
  // Tag of a hash: its top byte, 0 (the empty mark) made 1. The group index takes the low
  // bits and the piece cache bits 0..14 and 29..43, so the three stay independent.
  static uint8_t tag_of(uint64_t hash) {
    uint8_t tag = uint8_t(hash >> 56);
    return tag + (tag == 0);
  }
  // (Bit 16 keeps countr_zero from a test for 0, and & 15 sends it to slot 0.)
  size_t first_candidate(const Probe& pr) const {
    return pr.group * kGroupSize + (size_t(std::countr_zero(pr.candidates | 1u << kGroupSize)) & (kGroupSize - 1));
  }
  // Bit 8k + 7 set where byte k of x is 0: the low seven bits of every byte are added to 0x7F
  // apart from the high bit, so no carry crosses into the next byte.
  static uint64_t zero_bytes(uint64_t x) {
    constexpr uint64_t k7F = 0x7F7F7F7F7F7F7F7Full;
    return ~(((x & k7F) + k7F) | x | k7F);
  }
  // The high bits of the 8 bytes of m (others 0) as an 8-bit number, byte k to bit k: the
  // multiply moves bit 8k to 56 + k, and no two partial products meet, so nothing carries.
  static uint32_t high_bits_gather(uint64_t m) { return uint32_t((m >> 7) * 0x0102040810204080ull >> 56); }
  // A slot: a key's prefix8, and its rank with its length above (lengths from kLongLength up
  // share one value and are compared in offsets_). 12 bytes a slot at 3/4 load: 1.5 MB for
  // cl100k_base, where 16-byte slots at half load took 4 MB and most lookups of rare tokens
  // went to L3. Packed, so that a probe reads one cache line (two for 1 slot in 8), where
  // separate head and meta arrays cost two misses per lookup.
  struct [[gnu::packed]] Slot {
    uint64_t head;
    uint32_t meta;
  };
  static_assert(sizeof(Slot) == 12);
  static constexpr int kRankBits = 24;
  static constexpr uint32_t kRankMask = (uint32_t(1) << kRankBits) - 1;
  static constexpr size_t kLongLength = 255;
  std::vector<Slot> slots_;
  // Bytes 8..15 of the key in each slot (zero-padded; 0 for keys up to 8 bytes). A token
  // longer than 8 bytes was checked against the arena through offsets_[rank], two misses
  // that wait on each other and on the slot (13% of the lookup's time on WMT14); a tail's
  // line is known from the probe, so the caller requests it together with the slot's.
  std::vector<uint64_t> tails_;
  std::vector<uint8_t> tags_;  // one a slot, 0: empty
  std::vector<uint32_t> pair_ranks_;  // 65536 entries
  uint32_t byte_ranks_[256] = {};
  std::string arena_;              // every token's bytes, in rank order
  std::vector<uint32_t> offsets_;  // rank -> its bytes in arena_ (and rank + 1 -> their end)
  size_t group_mask_ = 0;  // groups - 1
};

enum class BpeMethod { automatic, scan, heap };

// Appends the tokens of `piece` (at least 2 bytes, every single byte having a rank).
void bpe_encode_piece(const RankMap& ranks, std::string_view piece, std::vector<TokenId>& out,
                      BpeMethod method = BpeMethod::automatic);

}  // namespace flashgpt

// Byte-pair merging of one piece, exactly as tiktoken: repeatedly merge the adjacent pair
// of parts whose concatenation has the lowest rank (the leftmost one on ties) until no pair
// is a token. Short pieces use tiktoken's scan (fast for a few parts); long ones a heap of
// candidate pairs over a linked list of parts, O(n log n) instead of O(n^2).
#pragma once

#include <flashgpt/tokenizer.h>

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

inline constexpr uint32_t kNoRank = UINT32_MAX;

// Open-addressing hash map from token bytes to rank (linear probing at 3/4 load). The bytes
// live in the tokenizer's arena; a slot holds the key's first 8 bytes, its length and rank,
// and a Bloom filter in front turns away most keys that are no token.
class RankMap {
 public:
  // tokens[r] = the bytes of rank r (empty for ranks the file does not have).
  void build(const std::vector<std::string_view>& tokens);
  // A key's first 8 bytes (zero-padded) and its hash, computed once per piece and shared by
  // the filter, the slots and the caller's piece cache.
  struct Key {
    uint64_t head;
    uint64_t hash;
  };
  static Key key(const uint8_t* p, size_t n) { return key_from_head(p, n, prefix8(p, n)); }
  // The same, for a key followed by at least 8 - n readable bytes (one load instead of three).
  static Key key_overread(const uint8_t* p, size_t n) {
    return key_from_head(p, n, n >= 8 ? load64(p) : load64(p) & (~uint64_t(0) >> (64 - 8 * n)));
  }

  uint32_t find(const uint8_t* bytes, size_t length) const { return find(bytes, length, key(bytes, length)); }
  // Most failed lookups (pieces that need merging, candidate merges that are no token)
  // would land on a cold slot; the filter (128 KB, cache-resident) turns ~96% of them away.
  uint32_t find(const uint8_t* bytes, size_t length, const Key& k) const {
    return filter_may_contain(k.hash) ? find_unfiltered(bytes, length, k) : kNoRank;
  }
  // The lookup itself, for a caller that has asked the filter already. A slot keeps the key's
  // first 8 bytes, so keys up to 8 bytes (most lookups) compare in the slot, and keys up to
  // 16 bytes with tails_ beside it.
  uint32_t find_unfiltered(const uint8_t* bytes, size_t length, const Key& k) const {
    uint32_t want = uint32_t(std::min<size_t>(length, kLongLength)) << kRankBits;
    for (size_t i = k.hash & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      uint32_t meta = slot.meta;
      if (meta == kEmpty) return kNoRank;
      if (slot.head == k.head && (meta & ~kRankMask) == want) {
        uint32_t rank = meta & kRankMask;
        if (length <= 8) return rank;
        if (tails_[i] != prefix8(bytes + 8, length - 8)) continue;
        if (length <= 16) return rank;
        uint32_t offset = offsets_[rank];
        if ((length < kLongLength || offsets_[rank + 1] - offset == length) &&
            bytes_equal(reinterpret_cast<const uint8_t*>(arena_.data()) + offset + 16, bytes + 16, length - 16))
          return rank;
      }
    }
  }
  // The same answer, for a caller that prefetched the key's home slot and filter word: a
  // key of up to 8 bytes in its home slot (most tokens that text uses: the frequent ones
  // were inserted first) is found there without waiting for the filter.
  uint32_t find_home_first(const uint8_t* bytes, size_t length, const Key& k) const {
    const Slot& home = slots_[k.hash & mask_];
    if (length <= 8 && home.head == k.head && home.meta >> kRankBits == length) return home.meta & kRankMask;
    return find(bytes, length, k);
  }
  const void* filter_address(uint64_t h) const { return &filter_[h >> 26 & (kFilterWords - 1)]; }
  // The slot that find_unfiltered(.., h) reads first, and the tail beside it that it also
  // reads for keys longer than 8 bytes, for the caller to prefetch.
  const void* slot_address(uint64_t h) const { return &slots_[h & mask_]; }
  const void* tail_address(uint64_t h) const { return &tails_[h & mask_]; }
  // Whether the key of hash h may be a token (no false negatives; ~4% false positives).
  bool filter_may_contain(uint64_t h) const {
    uint64_t word = filter_[h >> 26 & (kFilterWords - 1)];
    return (word >> (h >> 40 & 63) & word >> (h >> 46 & 63) & 1) != 0;
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
  static Key key_from_head(const uint8_t* p, size_t n, uint64_t head) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
    if (n <= 8) return {head, mix(h ^ head)};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) h = mix(h ^ load64(p + i));
    if (i < n) h = mix(h ^ load64(p + n - 8));  // the tail, overlapping the last full word
    return {head, h};
  }
  // One 64x64->128-bit multiply, the halves folded (wyhash's "mum"): every output bit
  // depends on every input bit, in one multiply's latency where splitmix64's finalizer
  // chained two multiplies and two shifts (this hash is on every piece's critical path:
  // hash, filter word, prefetch).
  static uint64_t mix(uint64_t x) {
    unsigned __int128 product = (unsigned __int128)(x ^ 0xA0761D6478BD642Full) * 0xE7037ED1A0B428DBull;
    return uint64_t(product) ^ uint64_t(product >> 64);
  }
  // A blocked Bloom filter of the keys' hashes: one 64-bit word per key, two bits in it,
  // chosen by hash bits that the slot index does not use.
  static constexpr size_t kFilterWords = size_t(1) << 14;
  static uint64_t filter_bits(uint64_t h) { return uint64_t(1) << (h >> 40 & 63) | uint64_t(1) << (h >> 46 & 63); }
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
  static constexpr uint32_t kEmpty = UINT32_MAX;
  std::vector<Slot> slots_;
  // Bytes 8..15 of the key in each slot (zero-padded; 0 for keys up to 8 bytes). A token
  // longer than 8 bytes was checked against the arena through offsets_[rank], two misses
  // that wait on each other and on the slot (13% of the lookup's time on WMT14); a tail's
  // line is known from the hash, so the caller requests it together with the slot's.
  std::vector<uint64_t> tails_;
  std::vector<uint64_t> filter_;
  std::vector<uint32_t> pair_ranks_;  // 65536 entries
  uint32_t byte_ranks_[256] = {};
  std::string arena_;              // every token's bytes, in rank order
  std::vector<uint32_t> offsets_;  // rank -> its bytes in arena_ (and rank + 1 -> their end)
  size_t mask_ = 0;
};

enum class BpeMethod { automatic, scan, heap };

// Appends the tokens of `piece` (at least 2 bytes, every single byte having a rank).
void bpe_encode_piece(const RankMap& ranks, std::string_view piece, std::vector<TokenId>& out,
                      BpeMethod method = BpeMethod::automatic);

}  // namespace flashgpt

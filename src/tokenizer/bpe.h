// Byte-pair merging of one piece, exactly as tiktoken: repeatedly merge the adjacent pair
// of parts whose concatenation has the lowest rank (the leftmost one on ties) until no pair
// is a token. Short pieces use tiktoken's scan (fast for a few parts); long ones a heap of
// candidate pairs over a linked list of parts, O(n log n) instead of O(n^2).
#pragma once

#include <flashgpt/tokenizer.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

inline constexpr uint32_t kNoRank = UINT32_MAX;

// Open-addressing hash map from token bytes to rank. The bytes live in one arena; a slot
// holds the key's hash (to skip most byte comparisons) and its rank.
class RankMap {
 public:
  // tokens[r] = the bytes of rank r (empty for ranks the file does not have).
  void build(const std::vector<std::string_view>& tokens);
  uint32_t find(const uint8_t* bytes, size_t length) const { return find(bytes, length, hash(bytes, length)); }
  // With the hash already computed (the caller reuses it for its piece cache). A slot keeps
  // the key's first 8 bytes, so keys up to 8 bytes (most lookups) compare in the slot.
  uint32_t find(const uint8_t* bytes, size_t length, uint64_t h) const {
    uint64_t head = prefix8(bytes, length);
    for (size_t slot = h & mask_;; slot = (slot + 1) & mask_) {
      const Slot& s = slots_[slot];
      if (s.rank == kNoRank) return kNoRank;
      if (s.head == head && s.length == length &&
          (length <= 8 ||
           bytes_equal(reinterpret_cast<const uint8_t*>(tokens_[s.rank].data()) + 8, bytes + 8, length - 8)))
        return s.rank;
    }
  }
  // The rank of a two-byte token, from a direct table (the first lookups of every merge).
  uint32_t find_pair(const uint8_t* p) const { return pair_ranks_[size_t(p[0]) << 8 | p[1]]; }
  uint32_t find_byte(uint8_t b) const { return byte_ranks_[b]; }
  // The first min(n, 8) bytes as a little-endian number, zero-padded; in-bounds loads only.
  static uint64_t prefix8(const uint8_t* p, size_t n) {
    if (n >= 8) return load64(p);
    if (n >= 4) return uint64_t(load32(p)) | uint64_t(load32(p + n - 4)) << (8 * (n - 4));
    if (n == 0) return 0;
    return uint64_t(p[0]) | uint64_t(p[n / 2]) << (8 * (n / 2)) | uint64_t(p[n - 1]) << (8 * (n - 1));
  }
  static uint64_t hash(const uint8_t* p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
    if (n <= 8) return mix(h ^ prefix8(p, n));
    size_t i = 0;
    for (; i + 8 <= n; i += 8) h = mix(h ^ load64(p + i));
    if (i < n) h = mix(h ^ load64(p + n - 8));  // the tail, overlapping the last full word
    return h;
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
  static uint64_t mix(uint64_t x) {
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 31;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 29;
    return x;
  }
  struct Slot {
    uint64_t head = 0;  // prefix8 of the key
    uint32_t rank = kNoRank;
    uint32_t length = 0;
  };
  std::vector<Slot> slots_;
  std::vector<uint32_t> pair_ranks_;  // 65536 entries
  uint32_t byte_ranks_[256] = {};
  std::vector<std::string_view> tokens_;
  size_t mask_ = 0;
};

enum class BpeMethod { automatic, scan, heap };

// Appends the tokens of `piece` (at least 2 bytes, every single byte having a rank).
void bpe_encode_piece(const RankMap& ranks, std::string_view piece, std::vector<TokenId>& out,
                      BpeMethod method = BpeMethod::automatic);

}  // namespace flashgpt

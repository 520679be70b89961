// Byte-pair merging of one piece, exactly as tiktoken: repeatedly merge the adjacent pair
// of parts whose concatenation has the lowest rank (the leftmost one on ties) until no pair
// is a token. Short pieces use tiktoken's scan (fast for a few parts); long ones a heap of
// candidate pairs over a linked list of parts, O(n log n) instead of O(n^2).
#pragma once

#include <flashgpt/tokenizer.h>

#include <cstddef>
#include <cstdint>
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
  uint32_t find(const uint8_t* bytes, size_t length) const {
    uint64_t h = hash(bytes, length);
    uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t slot = h & mask_;; slot = (slot + 1) & mask_) {
      const Slot& s = slots_[slot];
      if (s.rank == kNoRank) return kNoRank;
      if (s.tag == tag && tokens_[s.rank].size() == length &&
          std::char_traits<char>::compare(tokens_[s.rank].data(), reinterpret_cast<const char*>(bytes), length) == 0)
        return s.rank;
    }
  }
  static uint64_t hash(const uint8_t* p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
    while (n >= 8) {
      uint64_t w;
      std::char_traits<char>::copy(reinterpret_cast<char*>(&w), reinterpret_cast<const char*>(p), 8);
      h = mix(h ^ w);
      p += 8, n -= 8;
    }
    if (n) {
      uint64_t w = 0;
      std::char_traits<char>::copy(reinterpret_cast<char*>(&w), reinterpret_cast<const char*>(p), n);
      h = mix(h ^ w);
    }
    return h;
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
    uint32_t tag = 0;
    uint32_t rank = kNoRank;
  };
  std::vector<Slot> slots_;
  std::vector<std::string_view> tokens_;
  size_t mask_ = 0;
};

enum class BpeMethod { automatic, scan, heap };

// Appends the tokens of `piece` (at least 2 bytes, every single byte having a rank).
void bpe_encode_piece(const RankMap& ranks, std::string_view piece, std::vector<TokenId>& out,
                      BpeMethod method = BpeMethod::automatic);

}  // namespace flashgpt

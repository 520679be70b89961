// Clipped n-gram matching for BLEU and chrF: the reference's n-grams go into a small
// open-addressing table of counts; each hypothesis n-gram takes one count if any is left.
// The number taken is sum over n-grams of min(hypothesis count, reference count), what
// sacreBLEU computes with two Counters. Reused across segments: reset() keeps the memory.
#pragma once

#include <cstdint>
#include <vector>

namespace flashgpt::eval_detail {

inline uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Key: equality-comparable; Hash: uint64_t(const Key&).
template <class Key, class Hash>
class GramCounter {
 public:
  // Room for `n` distinct keys, all counts zero.
  void reset(size_t n) {
    size_t capacity = 16;
    while (capacity < 2 * n) capacity *= 2;
    keys_.resize(capacity);
    state_.assign(capacity, 0);
    mask_ = capacity - 1;
  }
  void add(const Key& key) {
    size_t i = Hash{}(key) & mask_;
    while (state_[i] != 0 && !(keys_[i] == key)) i = (i + 1) & mask_;
    if (state_[i] == 0) {
      keys_[i] = key;
      state_[i] = 1;
    }
    ++state_[i];
  }
  // Takes one count of `key`; false when none is left (or it never was added).
  bool take(const Key& key) {
    size_t i = Hash{}(key) & mask_;
    while (state_[i] != 0) {
      if (keys_[i] == key) {
        if (state_[i] == 1) return false;
        --state_[i];
        return true;
      }
      i = (i + 1) & mask_;
    }
    return false;
  }

 private:
  std::vector<Key> keys_;
  std::vector<uint32_t> state_;  // 0: empty; else 1 + the count left
  size_t mask_ = 0;
};

}  // namespace flashgpt::eval_detail

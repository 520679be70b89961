// The tokenizer's per-thread piece cache, in a header of its own for the tests.
#pragma once

#include <flashgpt/tokenizer.h>

#include "huge_pages.h"

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_set>
#include <vector>

namespace flashgpt {

// A per-thread cache of piece -> ids for the pieces that need merging: text repeats its
// words, and a hit costs a few compares in one cache line. A set is one line of two 32-byte
// entries; an entry holds a piece of up to 16 bytes (zero-padded, compared as two words with
// the length) and up to 5 ids of 24 bits, which 99.6% of the WMT14 pieces that are no token
// fit. 64K entries in 2 MB: the 64-byte entries before took as much for 32K, one a set, and
// the GPU machine's Xeon measured 7% faster first passes with these.
// It belongs to one tokenizer at a time.
struct PieceCache {
  static constexpr size_t kSets = size_t(1) << 15;
  static constexpr size_t kMaxKey = 16;
  static constexpr size_t kMaxIds = 5;
  struct Entry {
    uint64_t head, tail;  // bytes 0..7 and 8..15 of the piece, zero-padded
    uint8_t ids[3 * kMaxIds];
    uint8_t meta;  // length - 1 in the low 4 bits (0 with count 0: empty), count above
    size_t count() const { return meta >> 4; }
    TokenId id(size_t i) const {
      return TokenId(ids[3 * i]) | TokenId(ids[3 * i + 1]) << 8 | TokenId(ids[3 * i + 2]) << 16;
    }
  };
  static_assert(sizeof(Entry) == 32);
  struct alignas(64) Set {
    Entry way[2];
  };
  uint64_t owner = 0;
  std::vector<Set, HugePageAllocator<Set>> sets;

  Set& set_of(uint64_t hash) { return sets[(hash ^ (hash >> 29)) & (kSets - 1)]; }
  // The ids of the piece (head, tail, length), or nullptr.
  static const Entry* find(const Set& set, uint64_t head, uint64_t tail, size_t length) {
    uint8_t meta_low = uint8_t(length - 1);
    for (const Entry& e : set.way)
      if (e.head == head && e.tail == tail && (e.meta & 15) == meta_low && e.meta >> 4) return &e;
    return nullptr;
  }
  // Remembers the piece (ids below 2^24, count 1..kMaxIds) in the set's first way, the one
  // there moving to the second.
  static void insert(Set& set, uint64_t head, uint64_t tail, size_t length, const TokenId* ids, size_t count) {
    set.way[1] = set.way[0];
    Entry& e = set.way[0];
    e.head = head;
    e.tail = tail;
    for (size_t i = 0; i < count; ++i) {
      e.ids[3 * i] = uint8_t(ids[i]);
      e.ids[3 * i + 1] = uint8_t(ids[i] >> 8);
      e.ids[3 * i + 2] = uint8_t(ids[i] >> 16);
    }
    e.meta = uint8_t((length - 1) | count << 4);
  }

  uint64_t last_use = 0;

  PieceCache() = default;
  PieceCache(const PieceCache&) = delete;
  PieceCache& operator=(const PieceCache&) = delete;
  ~PieceCache() { live_erase(sets.data()); }

  // Every thread's cache buffer, listed from a global: LeakSanitizer reported the buffers of
  // OpenMP workers still alive (or exiting) at process exit as leaks, at random, when it
  // could not see them through the thread's TLS; listed here they stay reachable. The list is
  // never destroyed, since workers may exit after static destructors have run.
  struct Live {
    std::mutex mutex;
    std::unordered_set<const void*> buffers;
  };
  static Live& live() {
    static Live* list = new Live;
    return *list;
  }
  static void live_insert(const void* buffer) {
    std::lock_guard lock(live().mutex);
    live().buffers.insert(buffer);
  }
  static void live_erase(const void* buffer) {
    if (!buffer) return;
    std::lock_guard lock(live().mutex);
    live().buffers.erase(buffer);
  }

  // This thread's cache for tokenizer `uid`: a thread keeps two, so that code alternating
  // between two tokenizers does not clear one on every call.
  static PieceCache& for_tokenizer(uint64_t uid) {
    thread_local PieceCache caches[2];
    thread_local uint64_t clock = 0;
    PieceCache* cache = caches[0].owner == uid ? &caches[0] : caches[1].owner == uid ? &caches[1] : nullptr;
    if (!cache) {
      cache = caches[0].last_use <= caches[1].last_use ? &caches[0] : &caches[1];
      live_erase(cache->sets.data());
      cache->sets.assign(kSets, Set{});
      live_insert(cache->sets.data());
      cache->owner = uid;
    }
    cache->last_use = ++clock;
    return *cache;
  }
};

}  // namespace flashgpt

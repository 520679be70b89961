#include "tokenizer/bpe.h"

#include <flashgpt/error.h>

#include <algorithm>
#include <bit>

namespace flashgpt {

void RankMap::build(const std::vector<std::string_view>& tokens) {
  tokens_ = tokens;
  size_t capacity = std::bit_ceil(std::max<size_t>(16, tokens.size() * 2));
  slots_.assign(capacity, Slot{});
  mask_ = capacity - 1;
  for (size_t rank = 0; rank < tokens.size(); ++rank) {
    if (tokens[rank].empty()) continue;
    auto bytes = reinterpret_cast<const uint8_t*>(tokens[rank].data());
    FLASHGPT_CHECK(find(bytes, tokens[rank].size()) == kNoRank, "the rank file has the token of rank {} twice", rank);
    uint64_t h = hash(bytes, tokens[rank].size());
    size_t slot = h & mask_;
    while (slots_[slot].rank != kNoRank) slot = (slot + 1) & mask_;
    slots_[slot] = Slot{prefix8(bytes, tokens[rank].size()), static_cast<uint32_t>(rank),
                        static_cast<uint32_t>(tokens[rank].size())};
  }
  for (int b = 0; b < 256; ++b) {
    uint8_t byte = uint8_t(b);
    byte_ranks_[b] = find(&byte, 1);
  }
  pair_ranks_.assign(65536, kNoRank);
  for (size_t rank = 0; rank < tokens.size(); ++rank) {
    if (tokens[rank].size() != 2) continue;
    auto bytes = reinterpret_cast<const uint8_t*>(tokens[rank].data());
    pair_ranks_[size_t(bytes[0]) << 8 | bytes[1]] = uint32_t(rank);
  }
}

namespace {

// Above this many bytes a piece goes to the heap; below it tiktoken's scan is faster.
constexpr size_t kScanMaxBytes = 128;

// tiktoken's algorithm: parts[i] = (start, rank of merging part i with part i + 1).
void bpe_scan(const RankMap& ranks, const uint8_t* p, size_t n, std::vector<TokenId>& out) {
  struct Part {
    uint32_t start;
    uint32_t rank;   // of merging this part with the next
    uint32_t token;  // this part's own rank
  };
  Part stack_parts[kScanMaxBytes + 1];
  std::vector<Part> heap_parts;  // only when the scan is forced on a long piece (tests)
  if (n > kScanMaxBytes) heap_parts.resize(n + 1);
  Part* parts = n > kScanMaxBytes ? heap_parts.data() : stack_parts;
  for (size_t i = 0; i + 1 < n; ++i) parts[i] = {uint32_t(i), ranks.find_pair(p + i), ranks.find_byte(p[i])};
  parts[n - 1] = {uint32_t(n - 1), kNoRank, ranks.find_byte(p[n - 1])};
  parts[n] = {uint32_t(n), kNoRank, kNoRank};
  size_t count = n + 1;
  auto rank_after_merge = [&](size_t i) {  // rank of parts i..i+2 (i, i+1 about to be merged)
    return i + 3 < count ? ranks.find(p + parts[i].start, parts[i + 3].start - parts[i].start) : kNoRank;
  };
  for (;;) {
    uint32_t min_rank = kNoRank;
    size_t min_i = 0;
    for (size_t i = 0; i + 1 < count; ++i) {
      if (parts[i].rank < min_rank) min_rank = parts[i].rank, min_i = i;
    }
    if (min_rank == kNoRank) break;
    if (min_i > 0) parts[min_i - 1].rank = rank_after_merge(min_i - 1);
    parts[min_i].rank = rank_after_merge(min_i);
    parts[min_i].token = min_rank;
    std::copy(parts + min_i + 2, parts + count, parts + min_i + 1);
    --count;
  }
  for (size_t i = 0; i + 1 < count; ++i) out.push_back(parts[i].token);
}

// The same merges in O(n log n): parts are a linked list indexed by their start byte (a
// merged part keeps its left start), the heap holds (rank << 32 | start) of candidate
// pairs; an entry is stale unless its part is alive and still has that pair rank.
void bpe_heap(const RankMap& ranks, const uint8_t* p, size_t n, std::vector<TokenId>& out) {
  struct Node {
    uint32_t end, prev, next, rank;  // prev/next: start of the neighbour, n when none
    uint32_t token;                  // this part's own rank
    bool alive;
  };
  thread_local std::vector<Node> nodes;
  thread_local std::vector<uint64_t> heap;
  nodes.resize(n);
  heap.clear();
  const uint32_t none = uint32_t(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t rank = i + 1 < n ? ranks.find_pair(p + i) : kNoRank;
    nodes[i] = {uint32_t(i + 1), i == 0 ? none : uint32_t(i - 1), i + 1 < n ? uint32_t(i + 1) : none, rank,
                ranks.find_byte(p[i]), true};
    if (rank != kNoRank) heap.push_back(uint64_t(rank) << 32 | i);
  }
  auto greater = std::greater<uint64_t>();
  std::make_heap(heap.begin(), heap.end(), greater);
  auto pair_rank = [&](uint32_t start) {
    uint32_t next = nodes[start].next;
    return next == none ? kNoRank : ranks.find(p + start, nodes[next].end - start);
  };
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), greater);
    uint64_t top = heap.back();
    heap.pop_back();
    uint32_t rank = uint32_t(top >> 32), start = uint32_t(top);
    Node& node = nodes[start];
    if (!node.alive || node.rank != rank) continue;
    Node& right = nodes[node.next];
    right.alive = false;
    node.end = right.end;
    node.token = rank;
    node.next = right.next;
    if (node.next != none) nodes[node.next].prev = start;
    node.rank = pair_rank(start);
    if (node.rank != kNoRank) {
      heap.push_back(uint64_t(node.rank) << 32 | start);
      std::push_heap(heap.begin(), heap.end(), greater);
    }
    if (node.prev != none) {
      Node& left = nodes[node.prev];
      left.rank = pair_rank(node.prev);
      if (left.rank != kNoRank) {
        heap.push_back(uint64_t(left.rank) << 32 | node.prev);
        std::push_heap(heap.begin(), heap.end(), greater);
      }
    }
  }
  for (uint32_t start = 0; start != none; start = nodes[start].next) out.push_back(nodes[start].token);
}

}  // namespace

void bpe_encode_piece(const RankMap& ranks, std::string_view piece, std::vector<TokenId>& out, BpeMethod method) {
  auto p = reinterpret_cast<const uint8_t*>(piece.data());
  if (method == BpeMethod::automatic) method = piece.size() <= kScanMaxBytes ? BpeMethod::scan : BpeMethod::heap;
  if (method == BpeMethod::scan) {
    bpe_scan(ranks, p, piece.size(), out);
  } else {
    bpe_heap(ranks, p, piece.size(), out);
  }
}

}  // namespace flashgpt

#include "tokenizer/bpe.h"

#include <flashgpt/error.h>

#include <algorithm>
#include <bit>

namespace flashgpt {

void RankMap::build(const std::vector<std::string_view>& tokens) {
  arena_.clear();
  offsets_.assign(tokens.size() + 1, 0);
  for (size_t rank = 0; rank < tokens.size(); ++rank) {
    offsets_[rank] = uint32_t(arena_.size());
    arena_ += tokens[rank];
    FLASHGPT_CHECK(arena_.size() < UINT32_MAX, "the rank file's tokens hold more than 4 GB");
  }
  offsets_[tokens.size()] = uint32_t(arena_.size());
  FLASHGPT_CHECK(tokens.size() < kRankMask, "{} ranks: more than a rank map holds", tokens.size());
  size_t capacity = std::bit_ceil(std::max<size_t>(16, tokens.size() + tokens.size() / 4));
  slots_.assign(capacity, Slot{0, kEmpty});
  tails_.assign(capacity, 0);
  mask_ = capacity - 1;
  filter_.assign(kFilterWords, 0);
  for (size_t rank = 0; rank < tokens.size(); ++rank) {
    if (tokens[rank].empty()) continue;
    auto bytes = reinterpret_cast<const uint8_t*>(tokens[rank].data());
    const size_t length = tokens[rank].size();
    const Key k = key(bytes, length);
    FLASHGPT_CHECK(find_unfiltered(bytes, length, k) == kNoRank, "the rank file has the token of rank {} twice", rank);
    size_t slot = k.hash & mask_;
    while (slots_[slot].meta != kEmpty) slot = (slot + 1) & mask_;
    slots_[slot] = {k.head, uint32_t(rank) | uint32_t(std::min(length, kLongLength)) << kRankBits};
    tails_[slot] = length > 8 ? prefix8(bytes + 8, length - 8) : 0;
    filter_[k.hash >> 26 & (kFilterWords - 1)] |= filter_bits(k.hash);
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
  merges_build(tokens);
}

void RankMap::merges_build(const std::vector<std::string_view>& tokens) {
  merges_ = MergeMap();
  if (tokens.size() > MergeMap::kMaxRank) return;
  for (int b = 0; b < 256; ++b)
    if (byte_ranks_[b] == kNoRank) return;
  // Each token's canonical split (see MergeMap): the two parts that merging its bytes with
  // the splits of every shorter token leaves, if it leaves two. Tokens in order of length.
  std::vector<uint32_t> order;
  for (size_t rank = 0; rank < tokens.size(); ++rank)
    if (tokens[rank].size() >= 2) order.push_back(uint32_t(rank));
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return tokens[a].size() < tokens[b].size(); });
  std::vector<uint64_t> splits(tokens.size(), kNoSplit);  // rank -> left << 32 | right
  merges_.reset(order.size());
  std::vector<TokenId> parts;
  for (uint32_t rank : order) {
    auto bytes = reinterpret_cast<const uint8_t*>(tokens[rank].data());
    parts.clear();
    if (tokens[rank].size() == 2) {
      parts = {byte_ranks_[bytes[0]], byte_ranks_[bytes[1]]};
    } else {
      bpe_encode_piece(*this, tokens[rank], parts, BpeMethod::scan);
    }
    if (parts.size() != 2) continue;
    merges_.insert(parts[0], parts[1], rank);
    splits[rank] = uint64_t(parts[0]) << 32 | parts[1];
  }
  // Again in rank order, so that the frequent (low-rank) merges sit in their home slots.
  merges_.reset(order.size());
  for (size_t rank = 0; rank < tokens.size(); ++rank)
    if (splits[rank] != kNoSplit) merges_.insert(uint32_t(splits[rank] >> 32), uint32_t(splits[rank]), uint32_t(rank));
}

namespace {

// Above this many bytes a piece goes to the heap; below it tiktoken's scan is faster.
constexpr size_t kScanMaxBytes = 128;

// tiktoken's algorithm, on parts packed as rank << 32 | start << 20 | token: rank is that of
// merging the part with the next one, start its first byte, token its own rank. The lowest
// packed value is then the lowest rank, leftmost on ties, and a merge moves one array.
// Written for the ~10-byte pieces that need it (a first pass over text merges every
// distinct word once): the candidates after a merge are looked up by token ids (every part
// is a token), and the parts move down in fixed 128-byte blocks that the compiler inlines,
// instead of a memmove call per merge.
constexpr int kStartBits = 12;
constexpr int kTokenBits = 20;
constexpr size_t kPackedMaxBytes = (size_t(1) << kStartBits) - 1;
constexpr uint32_t kPackedMaxToken = uint32_t(1) << kTokenBits;
static_assert(kPackedMaxToken == MergeMap::kMaxRank, "the scan's ranks are the merge map's");

void bpe_scan(const RankMap& ranks, const uint8_t* p, size_t n, std::vector<TokenId>& out) {
  FLASHGPT_CHECK(n <= kPackedMaxBytes && ranks.size() <= kPackedMaxToken && !ranks.merges().empty(),
                 "the scan merge takes pieces up to {} bytes, ranks below {} and every byte a token", kPackedMaxBytes,
                 kPackedMaxToken);
  constexpr size_t kBlock = 16;  // parts moved per step of a shift
  uint64_t parts_stack[kScanMaxBytes + 1 + kBlock];
  std::vector<uint64_t> long_parts;  // only when the scan is forced on a long piece (tests)
  uint64_t* parts = parts_stack;
  if (n > kScanMaxBytes) {
    long_parts.resize(n + 1 + kBlock);
    parts = long_parts.data();
  }
  auto pack = [](uint32_t rank, size_t start, uint32_t token) {
    return uint64_t(rank) << 32 | uint64_t(start) << kTokenBits | token;
  };
  auto token_of = [](uint64_t part) { return uint32_t(part) & (kPackedMaxToken - 1); };
  for (size_t i = 0; i + 1 < n; ++i) parts[i] = pack(ranks.find_pair(p + i), i, ranks.find_byte(p[i]));
  parts[n - 1] = pack(kNoRank, n - 1, ranks.find_byte(p[n - 1]));
  parts[n] = pack(kNoRank, n, 0);
  size_t count = n + 1;
  auto with_rank = [](uint64_t part, uint32_t rank) { return (part & 0xFFFFFFFFull) | uint64_t(rank) << 32; };
  for (;;) {
    uint64_t best = parts[0];
    size_t min_i = 0;
    for (size_t i = 1; i + 1 < count; ++i) {
      bool lower = parts[i] < best;
      best = lower ? parts[i] : best;
      min_i = lower ? i : min_i;
    }
    uint32_t min_rank = uint32_t(best >> 32);
    if (min_rank == kNoRank) break;
    // Parts min_i and min_i + 1 become the token min_rank; its candidates are with its neighbours.
    if (min_i > 0)
      parts[min_i - 1] = with_rank(parts[min_i - 1], ranks.find_merge(token_of(parts[min_i - 1]), min_rank));
    uint32_t merged_rank = min_i + 3 < count ? ranks.find_merge(min_rank, token_of(parts[min_i + 2])) : kNoRank;
    parts[min_i] = pack(merged_rank, (best >> kTokenBits) & kPackedMaxBytes, min_rank);
    // parts[min_i + 1 ..] = parts[min_i + 2 ..], in blocks (the buffer has kBlock spare parts).
    for (size_t i = min_i + 1; i < count - 1; i += kBlock) {
      uint64_t block[kBlock];
      std::memcpy(block, parts + i + 1, sizeof(block));
      std::memcpy(parts + i, block, sizeof(block));
    }
    --count;
  }
  for (size_t i = 0; i + 1 < count; ++i) out.push_back(TokenId(token_of(parts[i])));
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
  if (method == BpeMethod::automatic)
    method = piece.size() <= kScanMaxBytes && !ranks.merges().empty() ? BpeMethod::scan : BpeMethod::heap;
  if (method == BpeMethod::scan) {
    bpe_scan(ranks, p, piece.size(), out);
  } else {
    bpe_heap(ranks, p, piece.size(), out);
  }
}

}  // namespace flashgpt

// Load-to-use latency of random reads at working-set sizes from 16 KB to 256 MB: a pointer
// chase through one random cycle of 64-byte lines, so every load waits for the last. Says
// where a machine's L2 and L3 end and what a miss costs there, which decides how large the
// tokenizer's tables may be. Standalone:
//   g++ -O2 -std=c++20 bench/tokenizer/memory_latency.cc -o memory_latency && ./memory_latency
#include <algorithm>
#include <sys/mman.h>

#include <chrono>
#include <cstdlib>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

// ns per dependent load through `kib` KiB; with `huge`, the buffer asks for 2 MB pages.
double chase_ns(size_t kib, bool huge, std::mt19937_64& random) {
  constexpr size_t kLine = 64 / sizeof(size_t);  // a node per cache line
  constexpr size_t kHuge = size_t(2) << 20;
  size_t lines = kib * 1024 / 64;
  std::vector<size_t> order(lines);
  std::iota(order.begin(), order.end(), size_t(0));
  std::shuffle(order.begin(), order.end(), random);
  size_t bytes = (lines * 64 + kHuge - 1) / kHuge * kHuge;
  auto* next = static_cast<size_t*>(std::aligned_alloc(kHuge, bytes));
  madvise(next, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  for (size_t i = 0; i < lines * kLine; ++i) next[i] = 0;
  for (size_t i = 0; i < lines; ++i) next[order[i] * kLine] = order[(i + 1) % lines] * kLine;
  size_t at = 0;
  for (size_t i = 0; i < lines; ++i) at = next[at];  // warm
  size_t loads = std::max<size_t>(size_t(1) << 23, 4 * lines);
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < loads; ++i) at = next[at];
  double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  std::free(next);
  return ns / double(loads) + (at == 1 ? 1e-9 : 0.0);
}

int main() {
  std::mt19937_64 random(1);
  std::printf("size_kib,ns_per_load_4k_pages,ns_per_load_2m_pages\n");
  for (size_t kib : {16, 32, 128, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 32768, 65536, 262144})
    std::printf("%zu,%.2f,%.2f\n", kib, chase_ns(kib, false, random), chase_ns(kib, true, random));
}

// A CPU model of the dQ warp's hand-off in the warp-specialized TMA backward
// (src/attention/kernels/flash_bwd_tma_kernel.cuh, kDqWarp, with and without kDqSplitKeys), run
// by threads with random delays, many times over random tile sequences. The kernel has its
// mbarriers, this model has Mbarrier below (expected arrivals, phase, try_wait.parity exactly as
// PTX defines them), and the buffer and parity arithmetic is the kernel's own
// (attention/kernels/pipeline_parity.h).
//
// Actors, one thread each: the producer warp (tiles, K/V and the Q/dO stage ring: the barriers
// that order the consumers' tiles and blocks), consumer warpgroups 0 and 1 (each arrives as its
// four warps wherever a kernel warp arrives), and the dQ warp. The GEMMs, the copy engine and
// the numbers are left out; the hand-off's buffers hold integers that say whose partial of which
// block they are, so a block read by the dQ warp is checked exactly.
//
// Checked, per run: no deadlock (a wait that lasts kWaitLimit fails the run instead of hanging);
// the dQ warp reads the blocks in order, each buffer holding both warpgroups' halves (plain) or
// the sum of their partials (split); no warpgroup writes a dQ buffer or its slot while the dQ
// warp holds it (from the completion of its "dQ full" phase to the dQ warp's release); the stop
// is posted once, after the last block; (plain) the dK/dV staging, over the dQ buffers, is
// written only once the dQ warp has released every buffer, and is not overwritten by the next
// tile's dQ stores before both warpgroups' copy-out has read it; every barrier ends at a phase
// boundary with as many phases as the protocol completes. Mutated protocols (the checks' own
// test) must fail.
#include "attention/kernels/pipeline_parity.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace flashgpt::attn {
namespace {

using Clock = std::chrono::steady_clock;

// The kernel instances (flash_bwd_launch.cuh): BwdTmaTraits<64, 128, 2, 2> (plain d64: one dQ
// buffer, 2 x 64 x 64 fp32 = 32 KB over the 2 x 16 KB staging of dK and dV),
// BwdTmaTraits<128, 64, 2, 1> (plain d128: two buffers of 32 KB over 2 x 32 KB, one dS^T
// buffer) and BwdTmaTraits<64, 64, 4, 2> (the d64 variant, kDqSplitKeys: two buffers of their
// own). The flags are restated here (the traits need CUDA headers); a static_assert in the
// kernel's traits keeps kDqBuffers == 2 with kDqSplitKeys.
template <bool kSplit_, int kDqBuffers_, int kStages_, int kDsBuffers_>
struct ModelTraits {
  static constexpr bool kSplit = kSplit_;
  static constexpr int kDqBuffers = kDqBuffers_;
  static constexpr int kStages = kStages_;
  static constexpr int kDsBuffers = kDsBuffers_;
  static constexpr bool kDqOwnStage = kSplit;
  static_assert(!kSplit || kDqBuffers == 2, "each warpgroup sums the partials of one buffer");
};
using PlainD64 = ModelTraits</*split=*/false, 1, 2, 2>;
using PlainD128 = ModelTraits</*split=*/false, 2, 2, 1>;
using SplitD64 = ModelTraits</*split=*/true, 2, 4, 2>;

constexpr int kConsumers = 2;
constexpr int kWarpsPerGroup = 4;
constexpr int kConsumerThreads = 128 * kConsumers;
// A warp's share of a sub-tile (the kernel: 32 lanes x 8 float4), and a buffer: two sub-tiles
// (plain: warpgroup wg's at kSubTile wg) or one (split: both partials over the same elements).
constexpr int kWarpElems = 8;
constexpr int kSubTile = kWarpsPerGroup * kWarpElems;
constexpr int kBufferElems = 2 * kSubTile;

enum class Mutation {
  kNone,
  kSkipEmptyWait,      // the consumers store into a buffer without waiting for its release
  kSkipEpilogueWaits,  // (plain) the epilogue writes the staging without waiting for the buffers
  kPartialFreeParity,  // (split) the summing warpgroup waits "partial" with the "empty" parity
  kSkipDsReady,        // (plain) no consumers' barrier before the dQ stores
};

struct Aborted {};  // out of every wait once a run is given up

// Everything the actors synchronize through, under one lock: the barriers' state changes and
// waits. The buffers are relaxed atomics, so that a broken protocol is a failed check rather
// than a data race; their ordering comes from the barriers' lock, as the kernel's from the
// mbarriers' release/acquire.
class Cta {
 public:
  explicit Cta(std::chrono::milliseconds wait_limit) : wait_limit_(wait_limit) {}

  void fail(const std::string& what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failures_.size() < 8) failures_.push_back(what);
  }
  std::vector<std::string> failures() {
    std::lock_guard<std::mutex> lock(mu_);
    return failures_;
  }
  bool aborted() {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

  // Runs `change` under the lock and wakes every waiter.
  template <typename F>
  void update(F&& change) {
    std::lock_guard<std::mutex> lock(mu_);
    change();
    cv_.notify_all();
  }
  // Blocks until `ready` holds (checked under the lock); throws Aborted once the run is given up,
  // by this wait's time limit (recorded as a deadlock) or by another actor's.
  template <typename P>
  void wait(P&& ready, const std::function<std::string()>& what) {
    std::unique_lock<std::mutex> lock(mu_);
    const auto deadline = Clock::now() + wait_limit_;
    for (;;) {
      if (aborted_) throw Aborted{};
      if (ready()) return;
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && !ready() && !aborted_) {
        aborted_ = true;
        failures_.push_back("deadlock: " + what());
        cv_.notify_all();
        throw Aborted{};
      }
    }
  }
  template <typename F>
  auto locked(F&& read) {
    std::lock_guard<std::mutex> lock(mu_);
    return read();
  }

 private:
  std::chrono::milliseconds wait_limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool aborted_ = false;
  std::vector<std::string> failures_;
};

// An mbarrier as PTX defines it: `count` expected arrivals per phase; the arrival that makes the
// pending count 0 completes the current phase (phases completed so far: `phase`) and rearms the
// count. try_wait.parity P is true once the phase of parity P has completed, i.e. while the
// current phase's parity, phase & 1, differs from P.
struct Mbarrier {
  std::string name;
  int count = 1;
  int pending = 1;
  uint32_t phase = 0;
  std::function<void()> on_complete;  // the model's bookkeeping, at the completing arrival

  void init(std::string n, int expected) {
    name = std::move(n);
    count = pending = expected;
  }
  bool try_wait_parity(uint32_t parity) const { return (phase & 1u) != parity; }
  void arrive() {
    if (--pending == 0) {
      ++phase;
      pending = count;
      if (on_complete) on_complete();
    }
  }
};

// A named barrier (bar.sync id, n): the n-th arrival releases the generation.
struct NamedBarrier {
  std::string name;
  int count = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

// An actor's random delays, between the steps of the protocol: mostly none, often a yield,
// sometimes a sleep of a few microseconds.
class Jitter {
 public:
  explicit Jitter(uint32_t seed) : rng_(seed) {}
  void operator()() {
    const uint32_t r = rng_() % 32;
    if (r < 16) return;
    if (r < 30) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng_() % 30));
  }
  // The order in which a warpgroup's warps reach an arrival (they run independently).
  std::array<int, kWarpsPerGroup> warp_order() {
    std::array<int, kWarpsPerGroup> order{0, 1, 2, 3};
    std::shuffle(order.begin(), order.end(), rng_);
    return order;
  }

 private:
  std::mt19937 rng_;
};

// What warpgroup wg's warp w stores at element e of its part of `block` (plain: its half of the
// buffer; split: its partial); never 0, and distinct over (block, wg, w, e).
int64_t partial_value(int block, int wg, int w, int e) {
  return int64_t{block + 1} * 1000 + wg * 100 + w * 10 + e + 1;
}
// The dK/dV staging's contents in the model, over the dQ buffers (plain): negative, per tile.
int64_t staging_value(int tile, int wg) { return -int64_t{tile + 1} * 10 - wg - 1; }

enum Holder : int { kHeldByConsumers = 0, kHeldByDqWarp = 1 };

template <typename T>
class HandoffRun {
 public:
  static constexpr int B = T::kDqBuffers;

  HandoffRun(std::vector<int> tile_blocks, uint32_t seed, Mutation mutation, std::chrono::milliseconds wait_limit)
      : tile_blocks_(std::move(tile_blocks)), seed_(seed), mutation_(mutation), cta_(wait_limit) {
    int next_block = 0;
    for (int n : tile_blocks_) {
      std::vector<int> blocks;
      // An index of the accumulator, as the kernel's slot holds; any distinct values will do.
      for (int it = 0; it < n; ++it) blocks.push_back(3 * next_block++ + 7);
      blocks_of_tile_.push_back(blocks);
      fill_order_.insert(fill_order_.end(), blocks.begin(), blocks.end());
    }
    // The kernel's initialization (tid 0, before the __syncthreads).
    kv_full_.init("K/V full", 1);
    kv_empty_.init("K/V empty", kConsumerThreads / 32);
    for (int s = 0; s < T::kStages; ++s) {
      // (The kernel's 33 arrivals of the producer warp, with the copies' bytes, are one here.)
      stage_full_[s].init("stage full " + std::to_string(s), 1);
      stage_empty_[s].init("stage empty " + std::to_string(s), kConsumerThreads / 32);
    }
    for (int i = 0; i < B; ++i) {
      dq_full_[i].init("dQ full " + std::to_string(i), dq_handoff_full_arrivals(kConsumerThreads, T::kSplit));
      dq_empty_[i].init("dQ empty " + std::to_string(i), kDqHandoffEmptyArrivals);
      if (T::kSplit) dq_partial_[i].init("dQ partial " + std::to_string(i), kDqHandoffPartialArrivals);
      // The completion of a "dQ full" phase hands the buffer to the dQ warp.
      dq_full_[i].on_complete = [this, i] { holder_[i].store(kHeldByDqWarp, std::memory_order_relaxed); };
      holder_[i].store(kHeldByConsumers);
      dq_slot_[i].store(0);
      for (auto& x : stage_[i]) x.store(0);
    }
    ds_ready_ = {"DsReady", kConsumers, 0, 0};
    ds_free_ = {"DsFree", kConsumers, 0, 0};
    epilogue_ = {"Epilogue", kConsumers, 0, 0};
  }

  std::vector<std::string> run() {
    std::vector<std::thread> actors;
    actors.emplace_back([this] { guarded([this] { producer(); }); });
    for (int wg = 0; wg < kConsumers; ++wg) actors.emplace_back([this, wg] { guarded([this, wg] { consumer(wg); }); });
    actors.emplace_back([this] { guarded([this] { dq_warp(); }); });
    for (auto& a : actors) a.join();
    if (!cta_.aborted()) final_checks();
    return cta_.failures();
  }

  int stop_buffer() const { return stop_buffer_; }

 private:
  template <typename F>
  void guarded(F&& body) {
    try {
      body();
    } catch (const Aborted&) {
    }
  }

  void arrive(Mbarrier& bar) {
    cta_.update([&] { bar.arrive(); });
  }
  void wait(Mbarrier& bar, uint32_t parity, const std::string& who) {
    cta_.wait([&] { return bar.try_wait_parity(parity); },
              [&] {
                std::ostringstream os;
                os << who << " on \"" << bar.name << "\" parity " << parity << " (phases completed " << bar.phase
                   << ", arrivals pending " << bar.pending << "/" << bar.count << ")";
                return os.str();
              });
  }
  void sync(NamedBarrier& bar, const std::string& who) {
    uint64_t generation = 0;
    bool last = false;
    cta_.update([&] {
      generation = bar.generation;
      if (++bar.arrived == bar.count) {
        bar.arrived = 0;
        ++bar.generation;
        last = true;
      }
    });
    if (!last)
      cta_.wait([&] { return bar.generation != generation; }, [&] { return who + " at named barrier " + bar.name; });
  }
  // A warp's arrival per warp (the kernel's release(): __syncwarp, lane 0 arrives).
  void arrive_as_warps(Mbarrier& bar, Jitter& jitter) {
    for (int w = 0; w < kWarpsPerGroup; ++w) {
      jitter();
      arrive(bar);
    }
  }

  // A consumer's store into dQ buffer buf (or its slot): only while the consumers hold it.
  void check_held(int buf, const std::string& who, const char* what) {
    if (holder_[buf].load(std::memory_order_relaxed) != kHeldByConsumers)
      cta_.fail(who + " wrote " + what + " of dQ buffer " + std::to_string(buf) + " while the dQ warp held it");
  }
  void store(int buf, int e, int64_t v, const std::string& who) {
    check_held(buf, who, "data");
    stage_[buf][e].store(v, std::memory_order_relaxed);
  }
  void write_slot(int buf, int block, const std::string& who) {
    check_held(buf, who, "the slot");
    dq_slot_[buf].store(block, std::memory_order_relaxed);
  }

  // ---- Producer warp (the kernel's "Producer", tid < 32) ----
  void producer() {
    Jitter jitter(seed_ * 4 + 0);
    const int num_tiles = int(tile_blocks_.size());
    PipelineState<T::kStages> st;
    uint32_t kv_phase = 0;
    int tile_counter = 0;
    for (;;) {
      // mbarrier_wait(bar_kv_empty, kv_phase ^ 1): the consumers are done with the previous K/V.
      wait(kv_empty_, kv_phase ^ 1u, "producer");
      const int tile_index = tile_counter++;  // atomicAdd(ws.tile_counter, 1): one CTA here
      const bool valid = tile_index < num_tiles;
      jitter();
      // *tile_slot = tile_index, released by the arrival on "K/V full" (the TMA's completion).
      tile_slot_.store(tile_index, std::memory_order_relaxed);
      arrive(kv_full_);
      if (!valid) break;
      kv_phase ^= 1u;
      for (int it = 0; it < tile_blocks_[tile_index]; ++it) {
        wait(stage_empty_[st.index], st.phase ^ 1u, "producer");
        jitter();  // Q and dO by TMA, LSE and D by the warp's lanes
        arrive(stage_full_[st.index]);
        st.advance();
      }
    }
  }

  // ---- Consumer warpgroup wg (the kernel's "Consumers") ----
  void consumer(int wg) {
    Jitter jitter(seed_ * 4 + 1 + wg);
    const std::string me = "warpgroup " + std::to_string(wg);
    const int num_tiles = int(tile_blocks_.size());
    PipelineState<T::kStages> st;
    uint32_t dq_fills = 0;
    uint32_t kv_phase = 0;
    for (;;) {
      wait(kv_full_, kv_phase, me);
      kv_phase ^= 1u;
      const int tile_index = tile_slot_.load(std::memory_order_relaxed);
      if (tile_index >= num_tiles) {
        // The dQ warp's stop: -1 in the next buffer's slot (kSplit: by the buffer's summing
        // warpgroup only).
        const int buf = dq_handoff_buffer<B>(dq_fills);
        if (!T::kSplit || buf == wg) {
          wait(dq_empty_[buf], dq_handoff_free_parity<B>(dq_fills), me + " (stop)");
          for (int w : jitter.warp_order()) {
            jitter();
            if (w == 0) write_slot(buf, -1, me);  // (ctid & 127) == 0
            arrive(dq_full_[buf]);                // release(bar_dq_full(buf))
          }
        }
        break;
      }
      const std::vector<int>& blocks = blocks_of_tile_[tile_index];
      for (int it = 0; it < int(blocks.size()); ++it) {
        wait(stage_full_[st.index], st.phase, me);
        jitter();  // S^T, dP^T, P^T, dS^T
        // (kDsBuffers == 1) the previous block's dQ GEMMs completed before dS^T is overwritten.
        if (T::kDsBuffers == 1 && it > 0) sync(ds_free_, me);
        jitter();  // dS^T stores, the dV GEMM
        // Plain: both warpgroups' dS^T stored (kBwdTmaBarDsReady, 256 threads). kSplit: only
        // this warpgroup's (kBwdTmaBarDsReadyWg + wg, its own 128 threads: within this actor).
        if (!T::kSplit && mutation_ != Mutation::kSkipDsReady) sync(ds_ready_, me);
        jitter();  // the dQ GEMM, dK's GEMM issued
        if (T::kSplit)
          handoff_split(wg, blocks[it], dq_fills, jitter, me);
        else
          handoff_plain(wg, blocks[it], dq_fills, jitter, me);
        ++dq_fills;
        jitter();  // wgmma_wait<0>
        arrive_as_warps(stage_empty_[st.index], jitter);  // release(bar_empty(st.index))
        st.advance();
      }
      arrive_as_warps(kv_empty_, jitter);  // release(bar_kv_empty)
      if (!T::kDqOwnStage) {
        // The epilogue's waits: each buffer's next fill's "dQ empty" barrier, as that fill would.
        if (mutation_ != Mutation::kSkipEpilogueWaits)
          for (uint32_t i = 0; i < B; ++i)
            wait(dq_empty_[dq_handoff_buffer<B>(dq_fills + i)], dq_handoff_free_parity<B>(dq_fills + i),
                 me + " (epilogue)");
      }
      sync(epilogue_, me);
      if (!T::kDqOwnStage) {
        // Staged::put of dK and dV, over the dQ buffers (this warpgroup's keys: its half here).
        for (int i = 0; i < B; ++i)
          for (int e = 0; e < kSubTile; ++e) {
            if (e % kWarpElems == 0) jitter();
            store(i, wg * kSubTile + e, staging_value(tile_index, wg), me + " (epilogue)");
          }
      }
      sync(epilogue_, me);
      if (!T::kDqOwnStage) {
        // Staged::copy_out by all 256 threads: this warpgroup reads both halves.
        for (int i = 0; i < B; ++i)
          for (int e = 0; e < kBufferElems; ++e) {
            if (e % kWarpElems == 0) jitter();
            const int64_t v = stage_[i][e].load(std::memory_order_relaxed);
            if (v != staging_value(tile_index, e / kSubTile))
              cta_.fail(me + ": the copy-out of tile " + std::to_string(tile_index) + " read " + std::to_string(v) +
                        " at element " + std::to_string(e) + " of buffer " + std::to_string(i) +
                        " (overwritten by a dQ store)");
          }
      } else {
        jitter();
      }
    }
  }

  // The kDqWarp hand-off without kDqSplitKeys: this warpgroup's sub-tile into its half of the
  // buffer, ctid 0 writes the slot, each warp arrives on "dQ full".
  void handoff_plain(int wg, int block, uint32_t dq_fills, Jitter& jitter, const std::string& me) {
    const int buf = dq_handoff_buffer<B>(dq_fills);
    if (mutation_ != Mutation::kSkipEmptyWait) wait(dq_empty_[buf], dq_handoff_free_parity<B>(dq_fills), me);
    for (int w : jitter.warp_order()) {
      for (int e = 0; e < kWarpElems; ++e) {
        if (e == kWarpElems / 2) jitter();
        store(buf, wg * kSubTile + w * kWarpElems + e, partial_value(block, wg, w, e), me);
      }
      if (wg == 0 && w == 0) write_slot(buf, block, me);  // ctid == 0
      jitter();                                          // fence_proxy_async_smem
      arrive(dq_full_[buf]);                             // release(bar_dq_full(buf))
    }
  }

  // kDqSplitKeys: warpgroup buf sums buffer buf; the other stores its partial and arrives on
  // "partial".
  void handoff_split(int wg, int block, uint32_t dq_fills, Jitter& jitter, const std::string& me) {
    const int buf = dq_handoff_buffer<B>(dq_fills);
    if (buf == wg) {
      const uint32_t parity = mutation_ == Mutation::kPartialFreeParity ? dq_handoff_free_parity<B>(dq_fills)
                                                                        : dq_handoff_partial_parity<B>(dq_fills);
      wait(dq_partial_[buf], parity, me);
      for (int w : jitter.warp_order()) {
        for (int e = 0; e < kWarpElems; ++e) {
          if (e == kWarpElems / 2) jitter();
          const int idx = w * kWarpElems + e;
          const int64_t other = stage_[buf][idx].load(std::memory_order_relaxed);
          if (other != partial_value(block, 1 - wg, w, e))
            cta_.fail(me + " summing block " + std::to_string(block) + " in buffer " + std::to_string(buf) +
                      " read " + std::to_string(other) + " instead of the other warpgroup's partial");
          store(buf, idx, other + partial_value(block, wg, w, e), me);
        }
        if (w == 0) write_slot(buf, block, me);  // (ctid & 127) == 0
        jitter();                                // fence_proxy_async_smem
        arrive(dq_full_[buf]);                   // release(bar_dq_full(buf))
      }
    } else {
      if (mutation_ != Mutation::kSkipEmptyWait) wait(dq_empty_[buf], dq_handoff_free_parity<B>(dq_fills), me);
      for (int w : jitter.warp_order()) {
        for (int e = 0; e < kWarpElems; ++e) {
          if (e == kWarpElems / 2) jitter();
          store(buf, w * kWarpElems + e, partial_value(block, wg, w, e), me);
        }
        jitter();
        arrive(dq_partial_[buf]);  // release(bar_dq_partial(buf))
      }
    }
  }

  // ---- dQ warp (tid 32; the kernel's "dQ warp") ----
  void dq_warp() {
    Jitter jitter(seed_ * 4 + 3);
    PipelineState<B> dq_st;
    size_t next = 0;
    for (;;) {
      wait(dq_full_[dq_st.index], dq_st.phase, "dQ warp");
      const int block = dq_slot_[dq_st.index].load(std::memory_order_relaxed);
      if (block < 0) {
        ++stops_seen_;
        stop_buffer_ = dq_st.index;
        if (next != fill_order_.size())
          cta_.fail("the dQ warp saw the stop after " + std::to_string(next) + " of " +
                    std::to_string(fill_order_.size()) + " blocks");
        break;
      }
      if (next >= fill_order_.size() || block != fill_order_[next])
        cta_.fail("the dQ warp read block " + std::to_string(block) + " as fill " + std::to_string(next) +
                  ", expected " + (next < fill_order_.size() ? std::to_string(fill_order_[next]) : "the stop"));
      // The bulk reduce-adds read the buffer, until cp.async.bulk.wait_group.read 0.
      const int elems = T::kSplit ? kSubTile : kBufferElems;
      for (int idx = 0; idx < elems; ++idx) {
        if (idx % kWarpElems == 0) jitter();
        const int w = idx % kSubTile / kWarpElems, e = idx % kWarpElems;
        const int64_t expected = T::kSplit ? partial_value(block, 0, w, e) + partial_value(block, 1, w, e)
                                           : partial_value(block, idx / kSubTile, w, e);
        const int64_t v = stage_[dq_st.index][idx].load(std::memory_order_relaxed);
        if (v != expected) {
          cta_.fail("the dQ warp read " + std::to_string(v) + " at element " + std::to_string(idx) + " of block " +
                    std::to_string(block) + " in buffer " + std::to_string(dq_st.index) + ", expected " +
                    std::to_string(expected));
          break;
        }
      }
      holder_[dq_st.index].store(kHeldByConsumers, std::memory_order_relaxed);
      arrive(dq_empty_[dq_st.index]);  // mbarrier_arrive(bar_dq_empty(dq_st.index))
      ++next;
      dq_st.advance();
    }
    blocks_read_ = next;
  }

  // After the join: every arrival made was expected, and the phases add up.
  void final_checks() {
    const int fills = int(fill_order_.size());
    if (stops_seen_ != 1) cta_.fail("the dQ warp saw " + std::to_string(stops_seen_) + " stops");
    if (blocks_read_ != fill_order_.size())
      cta_.fail("the dQ warp read " + std::to_string(blocks_read_) + " of " + std::to_string(fills) + " blocks");
    uint32_t full_phases = 0, empty_phases = 0, partial_phases = 0;
    std::vector<const Mbarrier*> all = {&kv_full_, &kv_empty_};
    for (int s = 0; s < T::kStages; ++s) all.push_back(&stage_full_[s]), all.push_back(&stage_empty_[s]);
    for (int i = 0; i < B; ++i) {
      all.push_back(&dq_full_[i]), all.push_back(&dq_empty_[i]);
      if (T::kSplit) all.push_back(&dq_partial_[i]);
      full_phases += dq_full_[i].phase, empty_phases += dq_empty_[i].phase;
      partial_phases += T::kSplit ? dq_partial_[i].phase : 0;
    }
    for (const Mbarrier* bar : all)
      if (bar->pending != bar->count)
        cta_.fail("\"" + bar->name + "\" ended with " + std::to_string(bar->count - bar->pending) + " stray arrivals");
    if (full_phases != uint32_t(fills + 1))
      cta_.fail("\"dQ full\" completed " + std::to_string(full_phases) + " phases for " + std::to_string(fills) +
                " blocks and one stop");
    if (empty_phases != uint32_t(fills))
      cta_.fail("\"dQ empty\" completed " + std::to_string(empty_phases) + " phases for " + std::to_string(fills) +
                " blocks");
    if (T::kSplit && partial_phases != uint32_t(fills))
      cta_.fail("\"partial\" completed " + std::to_string(partial_phases) + " phases for " + std::to_string(fills) +
                " blocks");
    for (const NamedBarrier* bar : {&ds_ready_, &ds_free_, &epilogue_})
      if (bar->arrived != 0) cta_.fail("named barrier " + bar->name + " ended with arrivals");
  }

  const std::vector<int> tile_blocks_;
  std::vector<std::vector<int>> blocks_of_tile_;
  std::vector<int> fill_order_;
  const uint32_t seed_;
  const Mutation mutation_;
  Cta cta_;

  Mbarrier kv_full_, kv_empty_;
  std::array<Mbarrier, T::kStages> stage_full_, stage_empty_;
  std::array<Mbarrier, B> dq_full_, dq_empty_, dq_partial_;
  NamedBarrier ds_ready_, ds_free_, epilogue_;
  std::atomic<int> tile_slot_{0};
  std::array<std::atomic<int>, B> dq_slot_;
  std::array<std::array<std::atomic<int64_t>, kBufferElems>, B> stage_;  // the dQ buffers
  std::array<std::atomic<int>, B> holder_;                                // Holder, per buffer

  int stops_seen_ = 0;
  int stop_buffer_ = -1;
  size_t blocks_read_ = 0;
};

// Random tile sequences: 0 to 5 tiles (0: a CTA that claims none), each of 0 to 4 query blocks
// (0: a causal key block past every query), 0 and 1 more often.
std::vector<int> random_tiles(std::mt19937& rng) {
  std::vector<int> tiles(rng() % 6);
  for (int& n : tiles) {
    const uint32_t r = rng() % 8;
    n = r < 2 ? 0 : r < 4 ? 1 : int(rng() % 5);
  }
  return tiles;
}

std::string describe(const std::vector<int>& tiles, uint32_t seed) {
  std::ostringstream os;
  os << "seed " << seed << ", query blocks per tile {";
  for (size_t i = 0; i < tiles.size(); ++i) os << (i ? ", " : "") << tiles[i];
  os << "}";
  return os.str();
}

template <typename T>
void check_handoff(int runs) {
  std::mt19937 rng(20261208u);
  int stops_on[2] = {0, 0}, empty_tiles = 0, single_tiles = 0, odd_totals = 0, even_totals = 0;
  for (int r = 0; r < runs; ++r) {
    const std::vector<int> tiles = random_tiles(rng);
    const uint32_t seed = rng();
    HandoffRun<T> run(tiles, seed, Mutation::kNone, std::chrono::milliseconds(10000));
    const std::vector<std::string> failures = run.run();
    if (!failures.empty()) {
      std::string all;
      for (const auto& f : failures) all += "\n  " + f;
      FAIL() << "run " << r << " (" << describe(tiles, seed) << "):" << all;
    }
    ++stops_on[run.stop_buffer()];
    int total = 0;
    for (int n : tiles) total += n, empty_tiles += n == 0, single_tiles += n == 1;
    ++(total % 2 ? odd_totals : even_totals);
  }
  // The runs covered what they are for.
  EXPECT_GT(empty_tiles, 0);
  EXPECT_GT(single_tiles, 0);
  EXPECT_GT(odd_totals, 0);
  EXPECT_GT(even_totals, 0);
  EXPECT_GT(stops_on[0], 0);
  if (T::kDqBuffers == 2) {
    EXPECT_GT(stops_on[1], 0) << "no run posted its stop on buffer 1";
  }
}

constexpr int kRuns = 400;

TEST(DqHandoffModel, MbarrierParityAsPtx) {
  Mbarrier bar;
  bar.init("b", 2);
  // A fresh barrier: phase 0 in progress; its "previous phase" (parity 1) counts as completed.
  EXPECT_TRUE(bar.try_wait_parity(1));
  EXPECT_FALSE(bar.try_wait_parity(0));
  bar.arrive();
  EXPECT_FALSE(bar.try_wait_parity(0));
  bar.arrive();  // phase 0 completes
  EXPECT_TRUE(bar.try_wait_parity(0));
  EXPECT_FALSE(bar.try_wait_parity(1));
  bar.arrive(), bar.arrive();  // phase 1 completes
  EXPECT_TRUE(bar.try_wait_parity(1));
  EXPECT_FALSE(bar.try_wait_parity(0));
}

TEST(DqHandoffModel, ParityArithmetic) {
  // Fill f of buffer f % B is the buffer's (f / B)-th; its "empty" wait is for the release of the
  // previous one, phase f / B - 1 (the fresh barrier's parity 1 for the first), its "partial"
  // wait for phase f / B of the other warpgroup's stores.
  for (uint32_t f = 0; f < 16; ++f) {
    EXPECT_EQ(dq_handoff_buffer<2>(f), int(f % 2));
    EXPECT_EQ(dq_handoff_free_parity<2>(f), ((f / 2) + 1) % 2);
    EXPECT_EQ(dq_handoff_partial_parity<2>(f), (f / 2) % 2);
    EXPECT_EQ(dq_handoff_buffer<1>(f), 0);
    EXPECT_EQ(dq_handoff_free_parity<1>(f), (f + 1) % 2);
  }
  EXPECT_EQ(dq_handoff_full_arrivals(kConsumerThreads, /*split_keys=*/false), 8);
  EXPECT_EQ(dq_handoff_full_arrivals(kConsumerThreads, /*split_keys=*/true), 4);
}

TEST(DqHandoffModel, PlainOneBufferD64) { check_handoff<PlainD64>(kRuns); }
TEST(DqHandoffModel, PlainTwoBuffersD128) { check_handoff<PlainD128>(kRuns); }
TEST(DqHandoffModel, SplitKeysD64) { check_handoff<SplitD64>(kRuns); }

// The checks' own test: each mutation of the protocol fails some run (a wrong value, a write
// into a held buffer, or a deadlock within the shorter limit).
template <typename T>
bool mutation_detected(Mutation mutation) {
  std::mt19937 rng(7u);
  for (int r = 0; r < kRuns; ++r) {
    std::vector<int> tiles = random_tiles(rng);
    tiles.push_back(3);  // at least a few blocks
    HandoffRun<T> run(tiles, rng(), mutation, std::chrono::milliseconds(500));
    if (!run.run().empty()) return true;
  }
  return false;
}

TEST(DqHandoffModel, MutationsAreCaught) {
  EXPECT_TRUE(mutation_detected<PlainD64>(Mutation::kSkipEmptyWait));
  EXPECT_TRUE(mutation_detected<PlainD128>(Mutation::kSkipEmptyWait));
  EXPECT_TRUE(mutation_detected<SplitD64>(Mutation::kSkipEmptyWait));
  EXPECT_TRUE(mutation_detected<PlainD64>(Mutation::kSkipEpilogueWaits));
  EXPECT_TRUE(mutation_detected<PlainD128>(Mutation::kSkipEpilogueWaits));
  EXPECT_TRUE(mutation_detected<SplitD64>(Mutation::kPartialFreeParity));
  // The next tile's dQ stores overwrite the staging while the other warpgroup's copy-out reads it.
  EXPECT_TRUE(mutation_detected<PlainD64>(Mutation::kSkipDsReady));
  EXPECT_TRUE(mutation_detected<PlainD128>(Mutation::kSkipDsReady));
}

}  // namespace
}  // namespace flashgpt::attn

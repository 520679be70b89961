// When a loop is worth an OpenMP team. A parallel region costs a few microseconds on an
// idle machine and a scheduler time slice on a busy one (a tiny model's step runs ~40x
// slower on two threads than on one when the cores are shared), so loops over fewer than
// kParallelMinWork elements run on the calling thread. Results do not change: every loop
// computes each output in the same order on any number of threads.
#pragma once

#include <cstdint>

namespace flashgpt::model {

inline constexpr int64_t kParallelMinWork = int64_t{1} << 15;

inline bool parallel_worth(int64_t work) { return work >= kParallelMinWork; }

}  // namespace flashgpt::model

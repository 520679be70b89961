// Data parallelism inside train_run: the step's gradient summed over the ranks in buckets
// that start as the backward finishes them, and ZeRO-1 (each rank updates its slice of the
// flat buffers with AdamW, then the slices are all-gathered).
//
// Bucketing. A backend that reports finished gradient ranges (GptModel::grad_ready_hook_set;
// the CPU one, layer by layer from the last) has them copied into a pack buffer in that
// order; whenever the open bucket holds bucket_floats, its reduction starts (MPI_Iallreduce)
// while the backward goes on with the layers below. A backend that reports nothing (CUDA
// today) has its flat gradient buffer reduced after the backward, in place, in contiguous
// buckets. Only the micro-batch that completes a rank's share of the step arms the hook:
// earlier ones still add into the gradients.
//
// ZeRO-1. The moments of a rank's slice are current only on that rank; before a checkpoint
// gather_optimizer_state() all-gathers them so that rank 0 writes the full state (a run can
// then resume on any number of ranks). The model still allocates full-size moments: the
// update is sharded, the memory is not (yet).
#pragma once

#include <flashgpt/dist.h>
#include <flashgpt/model.h>

#include <cstdint>
#include <span>
#include <vector>

namespace flashgpt {

class DataParallel {
 public:
  DataParallel(Communicator& comm, GptModel& model, bool zero1, int64_t bucket_floats);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  // The next forward_backward completes this rank's gradient of the step.
  void arm();
  // After that backward: the model's gradient buffer holds the sum over the ranks.
  void reduce_gradients();
  // AdamW on the reduced gradients: the whole buffer, or (ZeRO-1) this rank's slice then
  // an all-gather of the weights.
  void adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale);
  // ZeRO-1: makes every rank's moments complete (collective; call on every rank before a
  // checkpoint). A no-op otherwise.
  void gather_optimizer_state();

  // Reductions started while the backward was still running, and after it, in all.
  int64_t buckets_overlapped() const { return buckets_overlapped_; }
  int64_t buckets_after() const { return buckets_after_; }

 private:
  struct Packed {
    int64_t begin, end, at;  // gradient range [begin, end) sits at pack_[at, at + end - begin)
  };
  void on_grad_ready(int64_t begin, int64_t end);
  void start_bucket();

  Communicator& comm_;
  GptModel& model_;
  int rank_, world_;
  bool zero1_;
  int64_t bucket_floats_, count_;
  std::vector<int64_t> slices_;  // ZeRO-1 ownership: rank r owns [slices_[r], slices_[r + 1])
  // Every communicator but the local one runs the whole path, one rank included (the GPU
  // test runs NCCL with world size 1).
  bool active_;
  bool armed_ = false;
  std::vector<float> pack_;      // host packing of reported ranges
  std::vector<Packed> packed_;
  int64_t cursor_ = 0, bucket_start_ = 0;
  int64_t buckets_overlapped_ = 0, buckets_after_ = 0;
};

}  // namespace flashgpt

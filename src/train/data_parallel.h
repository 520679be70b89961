// Data parallelism inside train_run: the step's gradient summed over the ranks in buckets
// that start as the backward finishes them, and ZeRO-1 (each rank keeps and updates the
// AdamW moments of its slice of the flat buffers, then the slices' weights are all-gathered).
//
// Bucketing. While the micro-batch that completes a rank's share of the step runs, the model
// has a gradient-ready hook (GptModel::grad_ready_hook_set): it reports each tensor range as
// its backward finishes it, the last layer first, the embeddings last. Whenever the ranges
// reported since the last bucket hold bucket_floats, that bucket's reduction starts while
// the backward goes on with the layers below:
//   - host memory (CPU, MPI): the ranges are copied into a pack buffer in that order and the
//     packed bucket goes to MPI_Iallreduce; unpacked after the wait.
//   - device memory (CUDA, NCCL): the hook runs as the backward is enqueued, so the bucket's
//     ranges are reduced in place, as one NCCL group on the communicator's own stream, after
//     an event recorded on the model's stream right after the kernels that wrote them; the
//     model's stream waits for the last bucket before the optimizer. No host synchronisation.
//     A step with a hook runs eagerly on CUDA (a captured graph cannot report as it goes);
//     the micro-batches before the last one, and every step with overlap off, keep the graphs.
// With overlap off, or a backend that reports nothing, the flat gradient buffer is reduced
// after the backward, in place, in contiguous buckets.
//
// ZeRO-1. The model keeps the moments of this rank's slice only (GptModel::adam_state_shard:
// 1/W of the moment memory); before a checkpoint gather_optimizer_state() all-gathers them
// into host buffers so that rank 0 writes the full state (a run can then resume on any
// number of ranks).
#pragma once

#include <flashgpt/dist.h>
#include <flashgpt/model.h>

#include <cstdint>
#include <span>
#include <vector>

namespace flashgpt {

class DataParallel {
 public:
  DataParallel(Communicator& comm, GptModel& model, bool zero1, int64_t bucket_floats, bool overlap = true);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  // ZeRO-1 is on for a communicator that runs the data-parallel path: the moments are sharded.
  bool sharded() const { return active_ && zero1_; }
  // This rank's ZeRO-1 slice [begin, end) of the flat buffers.
  int64_t slice_begin() const { return slices_[static_cast<size_t>(rank_)]; }
  int64_t slice_end() const { return slices_[static_cast<size_t>(rank_) + 1]; }
  // The next forward_backward completes this rank's gradient of the step.
  void arm();
  // After that backward: the model's gradient buffer holds the sum over the ranks.
  void reduce_gradients();
  // AdamW on the reduced gradients: the whole buffer, or (ZeRO-1) this rank's slice then
  // an all-gather of the weights.
  void adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale);
  // ZeRO-1: every rank's moments, all-gathered into host buffers of model_param_count floats
  // (collective: call on every rank before a checkpoint). Empty without ZeRO-1 (the model's
  // own moments are complete then).
  struct AdamState {
    std::vector<float> m, v;
  };
  AdamState gather_optimizer_state();

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
  bool zero1_, overlap_;
  int64_t bucket_floats_, count_;
  std::vector<int64_t> slices_;  // ZeRO-1 ownership: rank r owns [slices_[r], slices_[r + 1])
  // Every communicator but the local one runs the whole path, one rank included (the GPU
  // test runs NCCL with world size 1).
  bool active_;
  bool host_;                    // the communicator reduces host memory (else the GPU's, in place)
  bool armed_ = false;
  int64_t cursor_ = 0;           // floats reported since arm()
  // Host: the packing of reported ranges; the open bucket is pack_[bucket_start_, cursor_).
  std::vector<float> pack_;
  std::vector<Packed> packed_;
  int64_t bucket_start_ = 0;
  // Device: the open bucket's ranges, in place.
  std::vector<Communicator::Range> open_;
  int64_t open_floats_ = 0;
  int64_t buckets_overlapped_ = 0, buckets_after_ = 0;
};

}  // namespace flashgpt

#include "data_parallel.h"

#include <flashgpt/error.h>

#include <algorithm>
#include <cstring>

namespace flashgpt {

DataParallel::DataParallel(Communicator& comm, GptModel& model, bool zero1, int64_t bucket_floats, bool overlap)
    : comm_(comm),
      model_(model),
      rank_(comm.rank()),
      world_(comm.world()),
      zero1_(zero1),
      overlap_(overlap),
      bucket_floats_(std::max<int64_t>(1, bucket_floats)),
      count_(model_param_count(model.config())),
      slices_(dist_slices(count_, world_)),
      active_(comm.backend() != "local"),
      host_(comm.memory() == MemorySpace::host) {
  if (!active_) return;
  const GptModel::FlatBuffers flat = model_.flat_buffers();  // throws for a backend without them
  FLASHGPT_CHECK(flat.params && flat.grads, "data parallel: the model exposes no parameter or gradient buffer");
  FLASHGPT_CHECK(host_ == (model_.device() == Device::cpu),
                 "data parallel: the {} communicator reduces {} memory but the model keeps its gradients on the {}",
                 comm_.backend(), host_ ? "host" : "device", model_.device() == Device::cpu ? "host" : "GPU");
  if (host_ && overlap_) pack_.resize(static_cast<size_t>(count_));
  // The moments of this rank's slice only (a no-op where the model was created with it).
  if (zero1_) model_.adam_state_shard(slice_begin(), slice_end());
}

DataParallel::~DataParallel() {
  if (armed_) model_.grad_ready_hook_set({});
}

void DataParallel::arm() {
  if (!active_) return;
  armed_ = true;
  packed_.clear();
  open_.clear();
  cursor_ = bucket_start_ = open_floats_ = 0;
  if (overlap_) model_.grad_ready_hook_set([this](int64_t begin, int64_t end) { on_grad_ready(begin, end); });
}

void DataParallel::start_bucket() {
  if (host_) {
    if (cursor_ == bucket_start_) return;
    comm_.allreduce_sum_start(pack_.data() + bucket_start_, cursor_ - bucket_start_);
    bucket_start_ = cursor_;
    return;
  }
  if (open_.empty()) return;
  comm_.allreduce_sum_ranges_start(model_.flat_buffers().grads, open_);
  open_.clear();
  open_floats_ = 0;
}

void DataParallel::on_grad_ready(int64_t begin, int64_t end) {
  FLASHGPT_CHECK(0 <= begin && begin <= end && end <= count_ && cursor_ + (end - begin) <= count_,
                 "data parallel: the backend reported the gradient range [{}, {}) of {} (or a range twice)", begin, end,
                 count_);
  bool full = false;
  if (host_) {
    const float* grads = model_.flat_buffers().grads;
    std::memcpy(pack_.data() + cursor_, grads + begin, static_cast<size_t>(end - begin) * sizeof(float));
    packed_.push_back(Packed{begin, end, cursor_});
    cursor_ += end - begin;
    full = cursor_ - bucket_start_ >= bucket_floats_;
  } else {
    open_.push_back(Communicator::Range{begin, end});
    open_floats_ += end - begin;
    cursor_ += end - begin;
    full = open_floats_ >= bucket_floats_;
  }
  // The range that completes the buffer is the backward's last: its bucket goes in reduce().
  if (cursor_ < count_ && full) {
    start_bucket();
    buckets_overlapped_ += 1;
  }
  comm_.progress();
}

void DataParallel::reduce_gradients() {
  if (!active_) return;
  FLASHGPT_CHECK(armed_, "data parallel: reduce_gradients without arm() before the step's last backward");
  armed_ = false;
  if (overlap_) model_.grad_ready_hook_set({});
  float* grads = model_.flat_buffers().grads;
  if (cursor_ == 0) {
    // Overlap off, or the backend reported nothing: reduce the flat buffer in place, bucket by bucket.
    for (int64_t at = 0; at < count_; at += bucket_floats_) {
      comm_.allreduce_sum_start(grads + at, std::min(bucket_floats_, count_ - at));
      buckets_after_ += 1;
    }
    comm_.wait_all();
    return;
  }
  FLASHGPT_CHECK(cursor_ == count_, "data parallel: the backward reported {} of the {} gradients as final", cursor_,
                 count_);
  if (host_ ? cursor_ > bucket_start_ : !open_.empty()) buckets_after_ += 1;
  start_bucket();
  comm_.wait_all();
  for (const Packed& p : packed_) {
    std::memcpy(grads + p.begin, pack_.data() + p.at, static_cast<size_t>(p.end - p.begin) * sizeof(float));
  }
}

void DataParallel::adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) {
  if (!sharded()) {
    model_.adamw_step(adam, t, grad_scale);
    return;
  }
  model_.adamw_step_range(adam, t, grad_scale, slice_begin(), slice_end());
  comm_.allgather(model_.flat_buffers().params, slices_);
  model_.params_changed();
}

DataParallel::AdamState DataParallel::gather_optimizer_state() {
  AdamState state;
  if (!sharded()) return state;
  state.m.resize(static_cast<size_t>(count_));
  state.v.resize(static_cast<size_t>(count_));
  model_.adam_state_get(state.m, state.v);  // this rank's slice
  comm_.allgather_host(state.m.data(), slices_);
  comm_.allgather_host(state.v.data(), slices_);
  return state;
}

}  // namespace flashgpt

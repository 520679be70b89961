// The NCCL communicator: one GPU per process. The gradient reductions run on a stream of
// their own (highest priority, so that their kernels get SMs between the backward's), each
// started after an event recorded on the model's stream at that moment, i.e. after the
// kernels that wrote its gradients; wait_all() makes the model's stream wait for an event
// recorded on the communication stream, so the optimizer that follows reads reduced
// gradients. The other collectives (weights, host values) run on the model's stream.
// The multicast variables are set before ncclCommInitRank (dist_disable_multicast), and
// nothing here creates multicast objects.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>

#if FLASHGPT_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace flashgpt {

void dist_mpi_broadcast_bytes(std::span<std::byte> data);  // comm_mpi.cc

#if FLASHGPT_WITH_NCCL
namespace {

#define FLASHGPT_NCCL_CHECK(call)                                                                      \
  do {                                                                                                 \
    const ncclResult_t flashgpt_nccl_rc = (call);                                                      \
    FLASHGPT_CHECK(flashgpt_nccl_rc == ncclSuccess, "{} failed: {}", #call, ncclGetErrorString(flashgpt_nccl_rc)); \
  } while (0)
#define FLASHGPT_NCCL_CUDA_CHECK(call)                                                                   \
  do {                                                                                                   \
    const cudaError_t flashgpt_cuda_rc = (call);                                                         \
    FLASHGPT_CHECK(flashgpt_cuda_rc == cudaSuccess, "{} failed: {}", #call, cudaGetErrorString(flashgpt_cuda_rc)); \
  } while (0)

class NcclComm final : public Communicator {
 public:
  NcclComm(const DistEnv& env, cudaStream_t stream) : rank_(env.rank), world_(env.world), stream_(stream) {
    dist_disable_multicast();  // before the first NCCL call, whatever the launcher passed
    int devices = 0;
    FLASHGPT_NCCL_CUDA_CHECK(cudaGetDeviceCount(&devices));
    int current = -1;
    FLASHGPT_NCCL_CUDA_CHECK(cudaGetDevice(&current));
    FLASHGPT_CHECK(current == env.local_rank % devices,
                   "NCCL: rank {} runs on GPU {} but its LOCAL_RANK {} asks for GPU {}: select the device before the "
                   "model is created", env.rank, current, env.local_rank, env.local_rank % devices);
    ncclUniqueId id;
    std::memset(&id, 0, sizeof(id));
    if (env.rank == 0) FLASHGPT_NCCL_CHECK(ncclGetUniqueId(&id));
    const std::span<std::byte> bytes(reinterpret_cast<std::byte*>(&id), sizeof(id));
    if (env.launcher == "openmpi" && comm_have_mpi()) {
      dist_mpi_broadcast_bytes(bytes);
    } else {
      dist_rendezvous_broadcast(env, bytes);
    }
    FLASHGPT_NCCL_CHECK(ncclCommInitRank(&comm_, world_, id, rank_));
    int least = 0, greatest = 0;
    FLASHGPT_NCCL_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    FLASHGPT_NCCL_CUDA_CHECK(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, greatest));
    FLASHGPT_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    FLASHGPT_NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
  }
  ~NcclComm() override {
    if (comm_stream_) cudaStreamSynchronize(comm_stream_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (fork_) cudaEventDestroy(fork_);
    if (join_) cudaEventDestroy(join_);
    if (comm_stream_) cudaStreamDestroy(comm_stream_);
    if (scratch_) cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  std::string_view backend() const override { return "nccl"; }
  MemorySpace memory() const override { return MemorySpace::device; }

  void allreduce_sum_start(float* data, int64_t count) override {
    fork();
    FLASHGPT_NCCL_CHECK(
        ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat32, ncclSum, comm_, comm_stream_));
  }
  void allreduce_sum_ranges_start(float* base, std::span<const Range> ranges) override {
    fork();
    FLASHGPT_NCCL_CHECK(ncclGroupStart());
    for (const Range& r : ranges) {
      if (r.end > r.begin) {
        FLASHGPT_NCCL_CHECK(ncclAllReduce(base + r.begin, base + r.begin, static_cast<size_t>(r.end - r.begin),
                                          ncclFloat32, ncclSum, comm_, comm_stream_));
      }
    }
    FLASHGPT_NCCL_CHECK(ncclGroupEnd());
  }
  void wait_all() override {
    if (!pending_) return;
    FLASHGPT_NCCL_CUDA_CHECK(cudaEventRecord(join_, comm_stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaStreamWaitEvent(stream_, join_, 0));
    pending_ = false;
  }
  void allgather(float* data, std::span<const int64_t> offsets) override {
    FLASHGPT_CHECK(offsets.size() == static_cast<size_t>(world_) + 1, "allgather: {} offsets for {} ranks",
                   offsets.size(), world_);
    // Slices of unequal size: one broadcast per owner, grouped into one launch.
    FLASHGPT_NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      const int64_t begin = offsets[static_cast<size_t>(r)], end = offsets[static_cast<size_t>(r) + 1];
      if (end > begin) {
        FLASHGPT_NCCL_CHECK(ncclBroadcast(data + begin, data + begin, static_cast<size_t>(end - begin), ncclFloat32, r,
                                          comm_, stream_));
      }
    }
    FLASHGPT_NCCL_CHECK(ncclGroupEnd());
  }
  // Through a device window of at most kHostGatherFloats (ZeRO-1's moments before a
  // checkpoint: a full-size device copy would undo the memory the sharding saves).
  void allgather_host(float* data, std::span<const int64_t> offsets) override {
    FLASHGPT_CHECK(offsets.size() == static_cast<size_t>(world_) + 1, "allgather_host: {} offsets for {} ranks",
                   offsets.size(), world_);
    const int64_t n = offsets.back();
    const int64_t window = std::min<int64_t>(n, gather_window_floats());
    if (window <= 0) return;
    float* device = nullptr;
    FLASHGPT_NCCL_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&device), static_cast<size_t>(window) * sizeof(float), stream_));
    for (int64_t w0 = 0; w0 < n; w0 += window) {
      const int64_t w1 = std::min(n, w0 + window);
      const size_t bytes = static_cast<size_t>(w1 - w0) * sizeof(float);
      FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(device, data + w0, bytes, cudaMemcpyHostToDevice, stream_));
      FLASHGPT_NCCL_CHECK(ncclGroupStart());
      for (int r = 0; r < world_; ++r) {  // the owners' parts of the window
        const int64_t begin = std::max(w0, offsets[static_cast<size_t>(r)]);
        const int64_t end = std::min(w1, offsets[static_cast<size_t>(r) + 1]);
        if (end > begin) {
          FLASHGPT_NCCL_CHECK(ncclBroadcast(device + (begin - w0), device + (begin - w0),
                                            static_cast<size_t>(end - begin), ncclFloat32, r, comm_, stream_));
        }
      }
      FLASHGPT_NCCL_CHECK(ncclGroupEnd());
      FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(data + w0, device, bytes, cudaMemcpyDeviceToHost, stream_));
      FLASHGPT_NCCL_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the pageable copy out is done before reuse
    }
    FLASHGPT_NCCL_CUDA_CHECK(cudaFreeAsync(device, stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void allreduce_sum_host(std::span<double> data) override {
    if (data.empty()) return;
    if (data.size() > scratch_doubles_) {  // a few doubles a step (losses, stop flags): grows once
      if (scratch_) FLASHGPT_NCCL_CUDA_CHECK(cudaFree(scratch_));
      scratch_ = nullptr;
      FLASHGPT_NCCL_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scratch_), data.size() * sizeof(double)));
      scratch_doubles_ = data.size();
    }
    const size_t bytes = data.size() * sizeof(double);
    FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(scratch_, data.data(), bytes, cudaMemcpyHostToDevice, stream_));
    FLASHGPT_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, data.size(), ncclFloat64, ncclSum, comm_, stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(data.data(), scratch_, bytes, cudaMemcpyDeviceToHost, stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void barrier() override {
    double zero = 0;
    allreduce_sum_host(std::span<double>(&zero, 1));
  }

 private:
  static constexpr int64_t kHostGatherFloats = int64_t{16} << 20;  // 64 MiB of device scratch
  // kHostGatherFloats, or FLASHGPT_NCCL_GATHER_FLOATS (a test knob: many windows on a small model).
  static int64_t gather_window_floats() {
    const char* text = std::getenv("FLASHGPT_NCCL_GATHER_FLOATS");
    if (text == nullptr || *text == '\0') return kHostGatherFloats;
    const long long value = std::atoll(text);
    FLASHGPT_CHECK(value > 0, "FLASHGPT_NCCL_GATHER_FLOATS must be a positive number of floats, got '{}'", text);
    return value;
  }

  // The communication stream waits for what the model's stream has enqueued so far.
  void fork() {
    FLASHGPT_NCCL_CUDA_CHECK(cudaEventRecord(fork_, stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, fork_, 0));
    pending_ = true;
  }

  int rank_, world_;
  cudaStream_t stream_;                   // the model's
  cudaStream_t comm_stream_ = nullptr;    // the gradient reductions'
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  bool pending_ = false;                  // reductions started since the last wait_all
  ncclComm_t comm_ = nullptr;
  double* scratch_ = nullptr;  // device staging of allreduce_sum_host
  size_t scratch_doubles_ = 0;
};

}  // namespace

void dist_select_gpu(int local_rank) {
  int devices = 0;
  FLASHGPT_NCCL_CUDA_CHECK(cudaGetDeviceCount(&devices));
  FLASHGPT_CHECK(devices > 0, "LOCAL_RANK {}: no GPU is visible", local_rank);
  FLASHGPT_NCCL_CUDA_CHECK(cudaSetDevice(local_rank % devices));
}

std::unique_ptr<Communicator> comm_create_nccl(const DistEnv& env, void* stream) {
  return std::make_unique<NcclComm>(env, static_cast<cudaStream_t>(stream));
}
bool comm_have_nccl() { return true; }

#else

std::unique_ptr<Communicator> comm_create_nccl(const DistEnv&, void*) {
  FLASHGPT_FAIL("flashgpt was built without NCCL: configure with -DFLASHGPT_CUDA=ON and NCCL's headers and library "
                "where CMake finds them (-DNCCL_ROOT=..., e.g. the nvidia-nccl-cu12 wheel's nvidia/nccl)");
}
bool comm_have_nccl() { return false; }
void dist_select_gpu(int local_rank) {
  FLASHGPT_FAIL("LOCAL_RANK {}: several GPUs need the NCCL backend, and flashgpt was built without it", local_rank);
}

#endif

}  // namespace flashgpt

// The NCCL communicator: one GPU per process, reductions on the model's stream so that
// they are ordered after the backward that wrote the gradients and before the optimizer.
// The multicast variables are set before ncclCommInitRank (dist_disable_multicast), and
// nothing here creates multicast objects.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>

#if FLASHGPT_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

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
  }
  ~NcclComm() override {
    if (stream_) cudaStreamSynchronize(stream_);
    if (scratch_) cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  std::string_view backend() const override { return "nccl"; }
  MemorySpace memory() const override { return MemorySpace::device; }

  // Enqueued on the model's stream: the optimizer kernels that follow wait for it.
  void allreduce_sum_start(float* data, int64_t count) override {
    FLASHGPT_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat32, ncclSum, comm_, stream_));
  }
  void wait_all() override {}  // stream order is the wait
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
  void allgather_host(float* data, std::span<const int64_t> offsets) override {
    const int64_t n = offsets.back();
    float* device = nullptr;
    FLASHGPT_NCCL_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&device), static_cast<size_t>(n) * sizeof(float), stream_));
    FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(device, data, static_cast<size_t>(n) * sizeof(float), cudaMemcpyHostToDevice, stream_));
    allgather(device, offsets);
    FLASHGPT_NCCL_CUDA_CHECK(cudaMemcpyAsync(data, device, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
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
  int rank_, world_;
  cudaStream_t stream_;
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

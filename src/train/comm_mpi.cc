// The MPI communicator: MPI_COMM_WORLD between CPU processes started by mpirun. Gradient
// buckets go out with MPI_Iallreduce as the backward finishes them; MPI has no progress
// thread by default, so progress() (MPI_Testall) is called between layers to move them on.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>

#if FLASHGPT_WITH_MPI
// The C API only: OpenMPI's and MPICH's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <vector>

namespace flashgpt {

#if FLASHGPT_WITH_MPI
namespace {

#define FLASHGPT_MPI_CHECK(call)                                                               \
  do {                                                                                         \
    const int flashgpt_mpi_rc = (call);                                                        \
    if (flashgpt_mpi_rc != MPI_SUCCESS) {                                                      \
      char flashgpt_mpi_text[MPI_MAX_ERROR_STRING];                                            \
      int flashgpt_mpi_len = 0;                                                                \
      MPI_Error_string(flashgpt_mpi_rc, flashgpt_mpi_text, &flashgpt_mpi_len);                 \
      FLASHGPT_FAIL("{} failed: {}", #call, std::string(flashgpt_mpi_text, flashgpt_mpi_len)); \
    }                                                                                          \
  } while (0)

// MPI counts are ints: larger buffers go in pieces.
constexpr int64_t kMaxCount = int64_t{1} << 30;

void finalize_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

class MpiComm final : public Communicator {
 public:
  MpiComm() {
    dist_disable_multicast();
    int initialized = 0;
    FLASHGPT_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      // FUNNELED: only the main thread calls MPI (the gradient hook runs between OpenMP regions).
      int provided = 0;
      FLASHGPT_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
      std::atexit(finalize_at_exit);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    FLASHGPT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
    FLASHGPT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_));
  }
  ~MpiComm() override {
    if (!requests_.empty()) MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  std::string_view backend() const override { return "mpi"; }
  MemorySpace memory() const override { return MemorySpace::host; }

  void allreduce_sum_start(float* data, int64_t count) override {
    for (int64_t at = 0; at < count; at += kMaxCount) {
      MPI_Request request;
      FLASHGPT_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data + at, static_cast<int>(std::min(kMaxCount, count - at)),
                                        MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request));
      requests_.push_back(request);
    }
  }
  void progress() override {
    if (requests_.empty()) return;
    int done = 0;
    FLASHGPT_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE));
  }
  void wait_all() override {
    if (requests_.empty()) return;
    FLASHGPT_MPI_CHECK(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
    requests_.clear();
  }
  void allgather(float* data, std::span<const int64_t> offsets) override { allgather_host(data, offsets); }
  void allgather_host(float* data, std::span<const int64_t> offsets) override {
    FLASHGPT_CHECK(offsets.size() == static_cast<size_t>(world_) + 1, "allgather: {} offsets for {} ranks",
                   offsets.size(), world_);
    FLASHGPT_CHECK(offsets.back() < INT_MAX, "allgather: {} floats exceed MPI's int displacements", offsets.back());
    std::vector<int> counts(static_cast<size_t>(world_)), displs(static_cast<size_t>(world_));
    for (int r = 0; r < world_; ++r) {
      displs[static_cast<size_t>(r)] = static_cast<int>(offsets[static_cast<size_t>(r)]);
      counts[static_cast<size_t>(r)] = static_cast<int>(offsets[static_cast<size_t>(r) + 1] - offsets[static_cast<size_t>(r)]);
    }
    FLASHGPT_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, counts.data(), displs.data(), MPI_FLOAT,
                                      MPI_COMM_WORLD));
  }
  void allreduce_sum_host(std::span<double> data) override {
    FLASHGPT_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_DOUBLE, MPI_SUM,
                                     MPI_COMM_WORLD));
  }
  void barrier() override { FLASHGPT_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); }

 private:
  int rank_ = 0, world_ = 1;
  std::vector<MPI_Request> requests_;
};

}  // namespace

std::unique_ptr<Communicator> comm_create_mpi() { return std::make_unique<MpiComm>(); }
bool comm_have_mpi() { return true; }

// NCCL's unique id by MPI_Bcast from rank 0 (comm_nccl.cc, when MPI launched the job).
void dist_mpi_broadcast_bytes(std::span<std::byte> data) {
  MpiComm comm;  // initialises MPI if needed
  FLASHGPT_MPI_CHECK(MPI_Bcast(data.data(), static_cast<int>(data.size()), MPI_BYTE, 0, MPI_COMM_WORLD));
}

#else

std::unique_ptr<Communicator> comm_create_mpi() {
  FLASHGPT_FAIL("flashgpt was built without MPI: install OpenMPI (libopenmpi-dev, scripts/install-deps.sh) and "
                "reconfigure, or run one process");
}
bool comm_have_mpi() { return false; }
void dist_mpi_broadcast_bytes(std::span<std::byte>) { FLASHGPT_FAIL("flashgpt was built without MPI"); }

#endif

}  // namespace flashgpt

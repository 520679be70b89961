// Data-parallel training across processes: the rank layout a launcher puts in the
// environment, the communicators the trainer reduces gradients through (MPI between CPU
// processes, NCCL between GPUs, a trivial one for a single process), and the switch that
// keeps NVLink multicast off on shared GPU machines.
//
// One process per GPU (or per CPU process). Launchers:
//   mpirun -np N flashgpt train ...            OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
//   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun's variables): NCCL's
//   unique id goes from rank 0 to the others over one TCP connection to MASTER_ADDR:MASTER_PORT.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flashgpt {

struct DistEnv {
  int rank = 0, world = 1;
  int local_rank = 0;        // the GPU this process takes on its host
  std::string master_addr;   // torchrun-style only
  int master_port = 0;
  // Where rank 0 listens for dist_rendezvous_broadcast: MASTER_PORT, or MASTER_PORT + 1
  // under torchrun itself (TORCHELASTIC_USE_AGENT_STORE=True: its agent's store holds
  // MASTER_PORT).
  int rendezvous_port = 0;
  std::string launcher = "none";  // "none", "torchrun" (RANK/WORLD_SIZE), "openmpi" (OMPI_COMM_WORLD_*)
};

// Reads the layout from `lookup` (getenv, or a map in tests): torchrun's variables when
// WORLD_SIZE is set, else OpenMPI's, else one process. Throws naming the variable that is
// missing, not a number, or out of range (rank outside [0, world), a port outside 1..65535).
using EnvLookup = std::function<const char*(const char*)>;
DistEnv dist_env_from(const EnvLookup& lookup);
DistEnv dist_env_from_environment();

// NVLink SHARP / multicast objects can take a shared machine's GPUs out of service: these
// stay off in every process, whatever a launcher passed.
inline constexpr std::array<std::pair<std::string_view, std::string_view>, 3> kMulticastOffVariables = {{
    {"NCCL_NVLS_ENABLE", "0"},
    {"TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"},
    {"NVSHMEM_DISABLE_NVLS", "1"},
}};
// Sets them (overwriting) in this process's environment. Every communicator calls it
// before its first collective; `flashgpt train` calls it first thing.
void dist_disable_multicast();
// "" when all three hold their value in this process's environment, else the ones that do not.
std::string dist_multicast_check();

// Rank 0 sends `data` to every other rank over TCP (rank 0 listens on env.rendezvous_port,
// the others connect to env.master_addr, retrying for `timeout_s`): how NCCL's unique id
// travels when no MPI launched the processes. Every rank passes a buffer of the same size.
void dist_rendezvous_broadcast(const DistEnv& env, std::span<std::byte> data, double timeout_s = 120.0);

// Where the float buffers a communicator reduces live.
enum class MemorySpace { host, device };

// Collectives over the ranks of one job. Float buffers are in memory() (host for MPI and
// local, device for NCCL); the *_host calls take host memory on every backend. Every rank
// calls the same collectives in the same order.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual std::string_view backend() const = 0;  // "local", "mpi" or "nccl"
  virtual MemorySpace memory() const = 0;

  // Starts summing data[0, count) over the ranks in place; wait_all() completes every
  // reduction started. progress() lets a backend without a progress thread move them on.
  // On NCCL the reductions run on a communication stream of their own, each after an event
  // recorded on the model's stream when it is started (so after the work enqueued there so
  // far), and wait_all() makes the model's stream wait for them: no host synchronisation.
  virtual void allreduce_sum_start(float* data, int64_t count) = 0;
  // One bucket: every range [begin, end) of base summed in place, started together (NCCL: one
  // group). The default starts one allreduce_sum_start per range.
  struct Range {
    int64_t begin = 0, end = 0;
  };
  virtual void allreduce_sum_ranges_start(float* base, std::span<const Range> ranges);
  virtual void progress() {}
  virtual void wait_all() = 0;
  // data[offsets[r], offsets[r + 1]) of rank r reaches every rank, in place
  // (offsets.size() == world + 1).
  virtual void allgather(float* data, std::span<const int64_t> offsets) = 0;
  virtual void allgather_host(float* data, std::span<const int64_t> offsets) = 0;
  // Sums host doubles over the ranks (losses, the stop flag).
  virtual void allreduce_sum_host(std::span<double> data) = 0;
  virtual void barrier() = 0;
};

// One process: every collective is the identity.
std::unique_ptr<Communicator> comm_create_local();
// MPI_COMM_WORLD (MPI_Init on first use, MPI_Finalize at exit). Throws on a build without MPI.
std::unique_ptr<Communicator> comm_create_mpi();
// NCCL over the GPUs of env's ranks. `stream` is the model's (a cudaStream_t): the gradient
// reductions run on a stream of the communicator's own, each ordered after the work enqueued
// on `stream` when it starts, and wait_all() orders `stream` after them; the other
// collectives run on `stream`. The unique id travels
// by MPI when MPI launched the job and the build has it, else by dist_rendezvous_broadcast.
// Throws on a build without NCCL.
std::unique_ptr<Communicator> comm_create_nccl(const DistEnv& env, void* stream);
// CUDA builds with NCCL: makes GPU local_rank (modulo the visible GPUs) this process's
// device, before the model allocates. Throws elsewhere.
void dist_select_gpu(int local_rank);
bool comm_have_mpi();
bool comm_have_nccl();

// Splits [0, count) into `parts` contiguous slices (multiples of `align` floats except the
// last): offsets[r], offsets[r + 1] bound slice r. ZeRO-1's ownership of the flat buffers.
std::vector<int64_t> dist_slices(int64_t count, int parts, int64_t align = 64);

}  // namespace flashgpt

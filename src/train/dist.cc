// The rank layout from the environment, the multicast switch, the TCP rendezvous that
// carries NCCL's unique id under torchrun-style launches, ZeRO-1 slices, and the
// single-process communicator.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <thread>

namespace flashgpt {
namespace {

int env_int(const EnvLookup& lookup, const char* name, int lo, int hi, bool required, int fallback) {
  const char* text = lookup(name);
  if (text == nullptr || *text == '\0') {
    FLASHGPT_CHECK(!required, "{} is not set (data-parallel launches need it beside the variables that are set)", name);
    return fallback;
  }
  int value = 0;
  const char* end = text + std::strlen(text);
  const auto [ptr, ec] = std::from_chars(text, end, value);
  FLASHGPT_CHECK(ec == std::errc() && ptr == end, "{}='{}' is not an integer", name, text);
  FLASHGPT_CHECK(value >= lo && value <= hi, "{}={} is outside [{}, {}]", name, value, lo, hi);
  return value;
}

// Closes a socket on every path out.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

void send_all(int fd, const std::byte* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    FLASHGPT_CHECK(k > 0, "rendezvous: send failed: {}", std::strerror(errno));
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void recv_all(int fd, std::byte* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    FLASHGPT_CHECK(k > 0, "rendezvous: the connection to rank 0 ended early ({})", k == 0 ? "closed" : std::strerror(errno));
    p += k;
    n -= static_cast<size_t>(k);
  }
}

class LocalComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  std::string_view backend() const override { return "local"; }
  MemorySpace memory() const override { return MemorySpace::host; }
  void allreduce_sum_start(float*, int64_t) override {}
  void wait_all() override {}
  void allgather(float*, std::span<const int64_t>) override {}
  void allgather_host(float*, std::span<const int64_t>) override {}
  void allreduce_sum_host(std::span<double>) override {}
  void barrier() override {}
};

}  // namespace

DistEnv dist_env_from(const EnvLookup& lookup) {
  DistEnv env;
  const char* world_size = lookup("WORLD_SIZE");
  if (world_size != nullptr && *world_size != '\0') {
    env.launcher = "torchrun";
    env.world = env_int(lookup, "WORLD_SIZE", 1, 1 << 20, true, 1);
    env.rank = env_int(lookup, "RANK", 0, env.world - 1, true, 0);
    env.local_rank = env_int(lookup, "LOCAL_RANK", 0, env.world - 1, false, env.rank);
    if (env.world > 1) {
      const char* addr = lookup("MASTER_ADDR");
      FLASHGPT_CHECK(addr != nullptr && *addr != '\0', "MASTER_ADDR is not set (WORLD_SIZE={} needs rank 0's address)",
                     env.world);
      env.master_addr = addr;
      env.master_port = env_int(lookup, "MASTER_PORT", 1, 65535, true, 0);
      const char* agent_store = lookup("TORCHELASTIC_USE_AGENT_STORE");
      const bool torchrun_store = agent_store != nullptr && std::string_view(agent_store) == "True";
      FLASHGPT_CHECK(!torchrun_store || env.master_port < 65535,
                     "MASTER_PORT=65535 under torchrun: the rendezvous needs MASTER_PORT + 1");
      env.rendezvous_port = env.master_port + (torchrun_store ? 1 : 0);
    }
    return env;
  }
  const char* ompi_size = lookup("OMPI_COMM_WORLD_SIZE");
  if (ompi_size != nullptr && *ompi_size != '\0') {
    env.launcher = "openmpi";
    env.world = env_int(lookup, "OMPI_COMM_WORLD_SIZE", 1, 1 << 20, true, 1);
    env.rank = env_int(lookup, "OMPI_COMM_WORLD_RANK", 0, env.world - 1, true, 0);
    env.local_rank = env_int(lookup, "OMPI_COMM_WORLD_LOCAL_RANK", 0, env.world - 1, false, env.rank);
  }
  return env;
}

DistEnv dist_env_from_environment() {
  return dist_env_from([](const char* name) { return std::getenv(name); });
}

void dist_disable_multicast() {
  for (const auto& [name, value] : kMulticastOffVariables) {
    FLASHGPT_CHECK(::setenv(std::string(name).c_str(), std::string(value).c_str(), /*overwrite=*/1) == 0,
                   "cannot set {}={}: {}", name, value, std::strerror(errno));
  }
}

std::string dist_multicast_check() {
  std::string wrong;
  for (const auto& [name, value] : kMulticastOffVariables) {
    const char* is = std::getenv(std::string(name).c_str());
    if (is != nullptr && value == is) continue;
    wrong += fmt::format("{}{}={} (needs {})", wrong.empty() ? "" : ", ", name, is ? is : "<unset>", value);
  }
  return wrong;
}

void dist_rendezvous_broadcast(const DistEnv& env, std::span<std::byte> data, double timeout_s) {
  if (env.world <= 1) return;
  FLASHGPT_CHECK(env.rendezvous_port > 0 && !env.master_addr.empty(),
                 "rendezvous: MASTER_ADDR and MASTER_PORT are needed to start {} ranks", env.world);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  if (env.rank == 0) {
    Fd server(::socket(AF_INET, SOCK_STREAM, 0));
    FLASHGPT_CHECK(server.fd >= 0, "rendezvous: socket: {}", std::strerror(errno));
    const int one = 1;
    ::setsockopt(server.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons(static_cast<uint16_t>(env.rendezvous_port));
    FLASHGPT_CHECK(::bind(server.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0,
                   "rendezvous: rank 0 cannot listen on port {} (MASTER_PORT{}): {}", env.rendezvous_port,
                   env.rendezvous_port == env.master_port ? "" : " + 1", std::strerror(errno));
    FLASHGPT_CHECK(::listen(server.fd, env.world) == 0, "rendezvous: listen: {}", std::strerror(errno));
    for (int served = 1; served < env.world; ++served) {
      timeval tv{};
      const double left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
      FLASHGPT_CHECK(left > 0, "rendezvous: {} of {} ranks connected to port {} within {} s", served - 1,
                     env.world - 1, env.rendezvous_port, timeout_s);
      tv.tv_sec = static_cast<time_t>(left) + 1;
      ::setsockopt(server.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      Fd client(::accept(server.fd, nullptr, nullptr));
      if (client.fd < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) {
        --served;
        continue;
      }
      FLASHGPT_CHECK(client.fd >= 0, "rendezvous: accept: {}", std::strerror(errno));
      send_all(client.fd, data.data(), data.size());
    }
    return;
  }
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(env.rendezvous_port);
  const int rc = ::getaddrinfo(env.master_addr.c_str(), port.c_str(), &hints, &found);
  FLASHGPT_CHECK(rc == 0 && found, "rendezvous: cannot resolve MASTER_ADDR={}: {}", env.master_addr, gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(found, &::freeaddrinfo);
  while (true) {  // rank 0 may not listen yet
    Fd sock(::socket(AF_INET, SOCK_STREAM, 0));
    FLASHGPT_CHECK(sock.fd >= 0, "rendezvous: socket: {}", std::strerror(errno));
    if (::connect(sock.fd, found->ai_addr, found->ai_addrlen) == 0) {
      recv_all(sock.fd, data.data(), data.size());
      return;
    }
    FLASHGPT_CHECK(std::chrono::steady_clock::now() < deadline, "rendezvous: rank {} could not reach {}:{} in {} s: {}",
                   env.rank, env.master_addr, env.rendezvous_port, timeout_s, std::strerror(errno));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::vector<int64_t> dist_slices(int64_t count, int parts, int64_t align) {
  FLASHGPT_CHECK(parts >= 1 && count >= 0 && align >= 1, "dist_slices: {} floats in {} parts (align {})", count, parts,
                 align);
  std::vector<int64_t> offsets(static_cast<size_t>(parts) + 1, count);
  const int64_t per = (count / parts + align - 1) / align * align;
  for (int r = 0; r < parts; ++r) offsets[static_cast<size_t>(r)] = std::min(count, per * r);
  return offsets;
}

void Communicator::allreduce_sum_ranges_start(float* base, std::span<const Range> ranges) {
  for (const Range& r : ranges) {
    if (r.end > r.begin) allreduce_sum_start(base + r.begin, r.end - r.begin);
  }
}

std::unique_ptr<Communicator> comm_create_local() { return std::make_unique<LocalComm>(); }

}  // namespace flashgpt

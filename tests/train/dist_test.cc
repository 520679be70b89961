// Data parallel, the parts one process can test: the rank layout from the environment, the
// multicast switch, the TCP rendezvous (ranks as threads), ZeRO-1's slices and range update
// against the whole update (bit for bit), a model holding one slice of the moments (its
// memory, its update against the full model's), and the CPU backward's gradient hook (every
// range reported once, already final). The reductions between processes: train_dp_test.py.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace flashgpt {
namespace {

EnvLookup lookup_in(const std::map<std::string, std::string>& env) {
  return [env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
}

TEST(DistEnv, TorchrunVariables) {
  const DistEnv e = dist_env_from(lookup_in(
      {{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.2"}, {"MASTER_PORT", "29500"}}));
  EXPECT_EQ(e.launcher, "torchrun");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world, 4);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.master_addr, "10.0.0.2");
  EXPECT_EQ(e.master_port, 29500);
  EXPECT_EQ(e.rendezvous_port, 29500);
  // Under torchrun itself its agent's store holds MASTER_PORT: the rendezvous takes the next.
  const DistEnv agent = dist_env_from(lookup_in({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                                 {"MASTER_PORT", "29500"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}}));
  EXPECT_EQ(agent.rendezvous_port, 29501);
  // torchrun's variables win over OpenMPI's when both are present.
  const DistEnv both = dist_env_from(lookup_in({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                                                {"OMPI_COMM_WORLD_RANK", "1"}}));
  EXPECT_EQ(both.launcher, "torchrun");
  EXPECT_EQ(both.world, 1);
  EXPECT_EQ(both.local_rank, 0);  // LOCAL_RANK absent: the rank
}

TEST(DistEnv, OpenMpiVariablesAndNone) {
  const DistEnv e = dist_env_from(lookup_in(
      {{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}));
  EXPECT_EQ(e.launcher, "openmpi");
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.world, 2);
  EXPECT_EQ(e.local_rank, 1);
  const DistEnv none = dist_env_from(lookup_in({}));
  EXPECT_EQ(none.launcher, "none");
  EXPECT_EQ(none.rank, 0);
  EXPECT_EQ(none.world, 1);
}

void expect_error(const std::map<std::string, std::string>& env, const std::string& needle) {
  try {
    dist_env_from(lookup_in(env));
    ADD_FAILURE() << "no error; expected one naming " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(DistEnv, BadLayoutsNameTheVariable) {
  expect_error({{"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}, "RANK is not set");
  expect_error({{"WORLD_SIZE", "2"}, {"RANK", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}, "RANK=2 is outside [0, 1]");
  expect_error({{"WORLD_SIZE", "two"}, {"RANK", "0"}}, "WORLD_SIZE='two' is not an integer");
  expect_error({{"WORLD_SIZE", "0"}, {"RANK", "0"}}, "WORLD_SIZE=0 is outside");
  expect_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_PORT", "29500"}}, "MASTER_ADDR is not set");
  expect_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}},
               "MASTER_PORT=70000 is outside");
  expect_error({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "-1"}}, "OMPI_COMM_WORLD_RANK=-1");
}

TEST(DistMulticast, OffOverridesWhatTheLauncherPassed) {
  ::setenv("NCCL_NVLS_ENABLE", "1", 1);
  ::unsetenv("NVSHMEM_DISABLE_NVLS");
  const std::string before = dist_multicast_check();
  EXPECT_NE(before.find("NCCL_NVLS_ENABLE=1 (needs 0)"), std::string::npos) << before;
  EXPECT_NE(before.find("NVSHMEM_DISABLE_NVLS=<unset>"), std::string::npos) << before;
  dist_disable_multicast();
  EXPECT_EQ(dist_multicast_check(), "");
  EXPECT_STREQ(std::getenv("NCCL_NVLS_ENABLE"), "0");
  EXPECT_STREQ(std::getenv("TORCH_SYMM_MEM_DISABLE_MULTICAST"), "1");
  EXPECT_STREQ(std::getenv("NVSHMEM_DISABLE_NVLS"), "1");
  // The local communicator is what a single process trains with; creating it leaves them on.
  auto comm = comm_create_local();
  EXPECT_EQ(comm->world(), 1);
  EXPECT_EQ(dist_multicast_check(), "");
}

TEST(DistSlices, CoverTheBufferInAlignedParts) {
  for (const int64_t count : {0, 1, 17, 1000, 4097, 6'520'000}) {
    for (const int parts : {1, 2, 3, 8}) {
      const auto o = dist_slices(count, parts, 64);
      ASSERT_EQ(o.size(), static_cast<size_t>(parts) + 1);
      EXPECT_EQ(o.front(), 0);
      EXPECT_EQ(o.back(), count);
      for (int r = 0; r < parts; ++r) {
        EXPECT_LE(o[r], o[r + 1]);
        if (o[r] < count) {
          EXPECT_EQ(o[r] % 64, 0) << count << " " << parts;
        }
      }
    }
  }
  const auto o = dist_slices(1000, 2, 1);
  EXPECT_EQ(o, (std::vector<int64_t>{0, 500, 1000}));
}

// A port nothing listens on: bind port 0, read what the kernel chose, release it.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

TEST(DistRendezvous, RankZeroReachesEveryRank) {
  constexpr int kWorld = 4;
  const int port = free_port();
  std::vector<std::vector<std::byte>> got(kWorld, std::vector<std::byte>(128));
  for (size_t i = 0; i < 128; ++i) got[0][i] = static_cast<std::byte>(i * 7 + 3);  // NCCL's id is 128 bytes
  std::vector<std::string> errors(kWorld);
  std::vector<std::thread> ranks;
  // Rank 0 starts last: the others retry until it listens.
  for (int r = kWorld - 1; r >= 0; --r) {
    ranks.emplace_back([&, r] {
      DistEnv env;
      env.rank = r;
      env.world = kWorld;
      env.master_addr = "127.0.0.1";
      env.master_port = env.rendezvous_port = port;
      try {
        dist_rendezvous_broadcast(env, got[static_cast<size_t>(r)], 20.0);
      } catch (const Error& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
    if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
    EXPECT_EQ(got[static_cast<size_t>(r)], got[0]) << "rank " << r;
  }
}

TEST(DistRendezvous, UnreachableRankZeroTimesOutNamingTheAddress) {
  DistEnv env;
  env.rank = 1;
  env.world = 2;
  env.master_addr = "127.0.0.1";
  env.master_port = env.rendezvous_port = free_port();
  std::vector<std::byte> data(8);
  try {
    dist_rendezvous_broadcast(env, data, 0.3);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not reach 127.0.0.1:"), std::string::npos) << e.what();
  }
}

ModelConfig tiny_model() {
  ModelConfig mc = model_preset("tiny", 200);
  mc.dropout = 0.1f;
  return mc;
}

std::vector<TokenId> random_windows(int64_t B, int64_t T, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> w(static_cast<size_t>(B * (T + 1)));
  for (auto& t : w) t = static_cast<TokenId>(rng() % 200);
  return w;
}

// Two CPU models with the same weights, moments and gradients.
struct TwinModels {
  std::unique_ptr<GptModel> a, b;
  int64_t n;
  explicit TwinModels(const ModelConfig& mc) {
    ModelOptions mo;
    mo.max_batch = 2;
    mo.max_context = 16;
    mo.threads = 1;
    a = gpt_create_cpu(mc, mo);
    b = gpt_create_cpu(mc, mo);
    n = model_param_count(mc);
    std::vector<float> p(static_cast<size_t>(n)), m(static_cast<size_t>(n)), v(static_cast<size_t>(n));
    model_init_params(mc, 9, p);
    std::mt19937 rng(4);
    std::normal_distribution<float> normal(0.0f, 1e-3f);
    for (size_t i = 0; i < m.size(); ++i) {
      m[i] = normal(rng);
      v[i] = std::abs(normal(rng)) * 1e-3f;
    }
    for (auto* model : {a.get(), b.get()}) {
      model->params_set(p);
      model->adam_state_set(m, v);
      model->grads_zero();
      model->forward_backward(random_windows(2, 16, 1), 2, 16, StepRng{3, 0}, 1.0f);
    }
  }
};

std::vector<float> all_state(const GptModel& m, int64_t n) {
  std::vector<float> p(static_cast<size_t>(n)), mm(static_cast<size_t>(n)), v(static_cast<size_t>(n));
  m.params_get(p);
  m.adam_state_get(mm, v);
  p.insert(p.end(), mm.begin(), mm.end());
  p.insert(p.end(), v.begin(), v.end());
  return p;
}

TEST(Zero1, RangeUpdatesOverSlicesEqualTheWholeUpdate) {
  AdamWConfig adam;
  adam.lr = 1e-3;
  adam.weight_decay = 0.1;  // decay on the matrices only: a slice boundary inside a tensor must keep it
  for (const int parts : {2, 3, 7}) {
    TwinModels twins(tiny_model());
    twins.a->adamw_step(adam, 3, 0.5f);
    const auto slices = dist_slices(twins.n, parts, /*align=*/1);
    for (int r = parts - 1; r >= 0; --r) twins.b->adamw_step_range(adam, 3, 0.5f, slices[r], slices[r + 1]);
    EXPECT_EQ(all_state(*twins.a, twins.n), all_state(*twins.b, twins.n)) << parts << " slices";
  }
  TwinModels twins(tiny_model());
  // One slice alone: the rest of the buffers is untouched.
  const auto before = all_state(*twins.b, twins.n);
  twins.b->adamw_step_range(adam, 1, 1.0f, 100, 200);
  const auto after = all_state(*twins.b, twins.n);
  for (int64_t i = 0; i < twins.n; ++i) {
    if (i >= 100 && i < 200) continue;
    ASSERT_EQ(before[static_cast<size_t>(i)], after[static_cast<size_t>(i)]) << "param " << i;
  }
  EXPECT_NE(std::vector<float>(before.begin() + 100, before.begin() + 200),
            std::vector<float>(after.begin() + 100, after.begin() + 200));
  EXPECT_THROW(twins.b->adamw_step_range(adam, 1, 1.0f, 10, 5), Error);
  EXPECT_THROW(twins.b->adamw_step_range(adam, 1, 1.0f, 0, twins.n + 1), Error);
}

// ZeRO-1's memory: a CPU model that keeps the moments of a slice (from ModelOptions or
// re-sharded) holds that slice alone and updates it like the full model, bit for bit.
TEST(Zero1, ShardedMomentsAreTheSliceAndUpdateLikeTheFullModel) {
  AdamWConfig adam;
  adam.lr = 1e-3;
  adam.weight_decay = 0.1;
  TwinModels twins(tiny_model());
  const int64_t n = twins.n;
  std::vector<float> p(static_cast<size_t>(n)), m(static_cast<size_t>(n)), v(static_cast<size_t>(n)),
      g(static_cast<size_t>(n));
  twins.a->params_get(p);
  twins.a->adam_state_get(m, v);
  const GptModel::MemoryReport full_mem = twins.a->memory_report();
  EXPECT_EQ(full_mem.adam_begin, 0);
  EXPECT_EQ(full_mem.adam_end, n);
  EXPECT_EQ(full_mem.adam_bytes, static_cast<size_t>(2 * n) * sizeof(float));
  twins.a->adamw_step(adam, 3, 0.5f);
  const auto expected = all_state(*twins.a, n);
  for (const int parts : {2, 3}) {
    const auto slices = dist_slices(n, parts);
    for (int r = 0; r < parts; ++r) {
      SCOPED_TRACE(testing::Message() << "rank " << r << " of " << parts);
      const int64_t begin = slices[static_cast<size_t>(r)], end = slices[static_cast<size_t>(r) + 1];
      ModelOptions mo;
      mo.max_batch = 2;
      mo.max_context = 16;
      mo.threads = 1;
      if (r == 0) {
        mo.adam_begin = begin;
        mo.adam_end = end;
      }
      auto shard = gpt_create_cpu(tiny_model(), mo);
      if (r != 0) shard->adam_state_shard(begin, end);
      const GptModel::MemoryReport mem = shard->memory_report();
      EXPECT_EQ(mem.adam_begin, begin);
      EXPECT_EQ(mem.adam_end, end);
      EXPECT_EQ(mem.adam_bytes, static_cast<size_t>(2 * (end - begin)) * sizeof(float));
      EXPECT_EQ(full_mem.total_bytes - mem.total_bytes, full_mem.adam_bytes - mem.adam_bytes);
      shard->params_set(p);
      shard->adam_state_set(m, v);
      shard->grads_zero();
      shard->forward_backward(random_windows(2, 16, 1), 2, 16, StepRng{3, 0}, 1.0f);
      EXPECT_THROW(shard->adamw_step(adam, 3, 0.5f), Error);
      EXPECT_THROW(shard->adamw_step_range(adam, 3, 0.5f, begin == 0 ? 0 : begin - 1, begin == 0 ? end + 1 : end),
                   Error);
      shard->adamw_step_range(adam, 3, 0.5f, begin, end);
      std::vector<float> sp(static_cast<size_t>(n)), sm(static_cast<size_t>(n), -7.0f), sv(static_cast<size_t>(n), -7.0f);
      shard->params_get(sp);
      shard->adam_state_get(sm, sv);
      for (int64_t i = 0; i < n; ++i) {
        const auto k = static_cast<size_t>(i);
        if (i >= begin && i < end) {
          ASSERT_EQ(sp[k], expected[k]) << "param " << i;
          ASSERT_EQ(sm[k], expected[k + static_cast<size_t>(n)]) << "m " << i;
          ASSERT_EQ(sv[k], expected[k + 2 * static_cast<size_t>(n)]) << "v " << i;
        } else {  // not this rank's: the caller's values stay
          ASSERT_EQ(sm[k], -7.0f) << "m " << i;
          ASSERT_EQ(sv[k], -7.0f) << "v " << i;
        }
      }
    }
  }
  EXPECT_THROW(twins.b->adam_state_shard(10, 5), Error);
  EXPECT_THROW(twins.b->adam_state_shard(0, n + 1), Error);
}

TEST(GradReadyHook, EveryRangeOnceAndAlreadyFinal) {
  const ModelConfig mc = tiny_model();
  ModelOptions mo;
  mo.max_batch = 2;
  mo.max_context = 16;
  mo.threads = 1;
  auto model = gpt_create_cpu(mc, mo);
  std::vector<float> p(static_cast<size_t>(model_param_count(mc)));
  model_init_params(mc, 9, p);
  model->params_set(p);
  const float* grads = model->flat_buffers().grads;
  struct Seen {
    int64_t begin, end;
    std::vector<float> values;
  };
  std::vector<Seen> seen;
  model->grad_ready_hook_set([&](int64_t begin, int64_t end) {
    seen.push_back(Seen{begin, end, std::vector<float>(grads + begin, grads + end)});
  });
  model->grads_zero();
  // Two micro-batches: the hook reports each range after each backward.
  model->forward_backward(random_windows(2, 16, 5), 2, 16, StepRng{1, 0}, 1.0f);
  const size_t per_backward = seen.size();
  model->forward_backward(random_windows(2, 16, 6), 2, 16, StepRng{1, 1}, 1.0f);
  ASSERT_EQ(seen.size(), 2 * per_backward);
  EXPECT_EQ(per_backward, static_cast<size_t>(12 * mc.n_layer + 4));
  std::vector<float> final_grads(p.size());
  model->grads_get(final_grads);
  std::vector<int> covered(p.size(), 0);
  for (size_t i = per_backward; i < seen.size(); ++i) {
    const Seen& s = seen[i];
    for (int64_t k = s.begin; k < s.end; ++k) covered[static_cast<size_t>(k)] += 1;
    // What the hook saw is what the step ends with: the backward never wrote it again.
    ASSERT_EQ(s.values, std::vector<float>(final_grads.begin() + s.begin, final_grads.begin() + s.end))
        << "range [" << s.begin << ", " << s.end << ")";
  }
  for (size_t k = 0; k < covered.size(); ++k) ASSERT_EQ(covered[k], 1) << "float " << k;
  // The last layer's tensors come first, the embeddings last (wte after the classifier and the lookup).
  const auto specs = model_param_specs(mc);
  EXPECT_EQ(seen[per_backward].begin, specs[static_cast<size_t>(ParamKind::lnf_w)].offset);
  EXPECT_EQ(seen.back().begin, specs[static_cast<size_t>(ParamKind::wte)].offset);
  model->grad_ready_hook_set({});
  model->forward_backward(random_windows(2, 16, 7), 2, 16, StepRng{1, 2}, 1.0f);
  EXPECT_EQ(seen.size(), 2 * per_backward);
}

}  // namespace
}  // namespace flashgpt

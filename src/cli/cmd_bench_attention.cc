// `flashgpt bench attention --device cpu`: the naive reference against the tiled
// FlashAttention on the CPU, for growing N. It validates the tiled path against the
// reference first, then times both, reports the workspace each one allocates (the
// reference grows as N^2, the tiled one as N), and counts the bytes the tiled forward
// moves between the tensors and its tiles for several on-chip budgets M, next to the
// paper's Theta(N^2 d^2 / M) bound (its Theorem 2 and Figure 2, left, with a counter
// in place of a profiler). Writes CSV and, when matplotlib is there, a PNG.
#include "commands.h"
#include "options.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/process.h>

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>
#include <flashgpt/error.h>
#include <flashgpt/process.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

struct BenchAttentionConfig {
  std::string device = "cpu";
  std::string out_dir;  // empty: print only
  int min_seqlen = 256;
  int max_seqlen = 16384;
  int naive_max_seqlen = 8192;  // the reference's backward holds 2 N^2 doubles: 1 GiB at 8k
  int io_max_seqlen = 4096;
  int batch = 1;
  int heads = 1;
  int head_dim = 64;
  bool causal = false;
  bool backward = true;
  bool quick = false;
  int threads = 0;
  int64_t onchip_kib = 128;
  std::string rule = "paper";  // tile rule of the timed tiled run: paper | max_rows
  std::vector<int64_t> io_onchip_kib = {16, 64, 256, 1024};
  double min_time_s = 0.3;  // repeat a measurement until this long, keep the fastest run
};

// Inputs and outputs of one dense problem, contiguous, fp32.
struct BenchProblem {
  std::vector<float> q, k, v, o, lse, d_o, dq, dk, dv;
  AttentionParams params;
  BenchProblem(const BenchAttentionConfig& c, int n, uint64_t seed) {
    const size_t elements = size_t(c.batch) * n * c.heads * c.head_dim;
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v, &d_o}) {
      t->resize(elements);
      for (float& x : *t) x = normal(gen);
    }
    o.resize(elements), dq.resize(elements), dk.resize(elements), dv.resize(elements);
    lse.resize(size_t(c.batch) * c.heads * n);
    params.q = q.data(), params.k = k.data(), params.v = v.data(), params.o = o.data(), params.lse = lse.data();
    params.d_o = d_o.data(), params.dq = dq.data(), params.dk = dk.data(), params.dv = dv.data();
    params.batch = c.batch, params.seqlen_q = params.seqlen_k = n;
    params.heads_q = params.heads_kv = c.heads, params.head_dim = c.head_dim;
    params.mask = c.causal ? Mask::causal : Mask::none;
    attention_set_dense_strides(params);
  }
};

template <typename F>
double time_best_s(const BenchAttentionConfig& c, F&& run) {
  double best = 1e300, total = 0.0;
  for (int rep = 0; rep < 20 && (rep < 1 || total < c.min_time_s); ++rep) {
    const auto start = std::chrono::steady_clock::now();
    run();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, seconds);
    total += seconds;
  }
  return best;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024.0 && unit < 4) bytes /= 1024.0, ++unit;
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[unit]);
}

std::string format_ms(double seconds) { return fmt::format("{:.1f}", seconds * 1e3); }

double max_relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double worst = 0.0, scale = 1.0;
  for (float w : want) scale = std::max(scale, double(std::abs(w)));
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i]));
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return worst / scale;
}

CpuTileRule bench_rule(const std::string& name) {
  return name == "max_rows" ? CpuTileRule::max_rows : CpuTileRule::paper;
}

CpuTiling bench_tiling(const BenchAttentionConfig& c, int64_t kib, CpuTileRule rule) {
  CpuTiling t;
  t.onchip_bytes = kib * 1024;
  t.threads = c.threads;
  t.rule = rule;
  return t;
}

// Tiled against the reference, forward and backward, with and without dropout.
void bench_validate(const BenchAttentionConfig& c, int n) {
  constexpr double kTolerance = 1e-4;
  for (float dropout : {0.0f, 0.1f}) {
    BenchProblem want(c, n, 1), got(c, n, 1);
    want.params.dropout_p = got.params.dropout_p = dropout;
    const CpuTiling tiling = bench_tiling(c, c.onchip_kib, bench_rule(c.rule));
    attention_forward_reference(want.params);
    attention_forward_cpu(got.params, tiling);
    const double o_error = max_relative_error(got.o, want.o), lse_error = max_relative_error(got.lse, want.lse);
    want.o = got.o, want.lse = got.lse;  // both backward passes read the same O and LSE
    attention_backward_reference(want.params);
    attention_backward_cpu(got.params, tiling);
    const double errors[] = {o_error, lse_error, max_relative_error(got.dq, want.dq),
                             max_relative_error(got.dk, want.dk), max_relative_error(got.dv, want.dv)};
    fmt::print(
        "validate N={:<5} dropout={:.1f}: max error relative to max |ref|: O {:.1e} LSE {:.1e} dQ {:.1e} "
        "dK {:.1e} dV {:.1e}\n",
        n, dropout, errors[0], errors[1], errors[2], errors[3], errors[4]);
    for (double e : errors) {
      FLASHGPT_CHECK(e <= kTolerance,
                     "bench attention: the tiled path disagrees with the reference at N={} "
                     "(error {:.2e} > {:.0e}); not timing a wrong kernel",
                     n, e, kTolerance);
    }
  }
}

struct TimingRow {
  int n;
  bool naive_ran;
  double naive_fwd_s, naive_bwd_s, tiled_fwd_s, tiled_bwd_s;
  int64_t naive_fwd_bytes, naive_bwd_bytes, tiled_fwd_bytes, tiled_bwd_bytes;
  uint64_t tiled_io_bytes;      // counted in the timed forward
  uint64_t tiled_bwd_io_bytes;  // counted in the timed backward
  double standard_io_bytes;     // Algorithm 0's reads and writes, by formula
};

struct IoRow {
  int n;
  int64_t onchip_bytes;
  const char* rule;
  CpuTileShape tile;
  uint64_t counted_bytes;
  double bound_bytes;  // N^2 d^2 / M, M in floats, times 4 bytes, per (batch, head)
};

// What the option table does not show: --quick's caps and the thread count OpenMP resolves.
void bench_print_effective(const BenchAttentionConfig& c) {
  if (c.quick) {
    fmt::print("--quick: N up to {}, naive up to {}, IO sweep up to {}\n", c.max_seqlen, c.naive_max_seqlen,
               c.io_max_seqlen);
  }
  fmt::print("{} threads; times are the fastest of repeated runs (at least {:.1f} s per measurement)\n\n",
             c.threads > 0 ? c.threads : omp_get_max_threads(), c.min_time_s);
}

void bench_attention_run(BenchAttentionConfig c) {
  FLASHGPT_CHECK(c.device == "cpu", "bench attention: --device {} is not available; this harness measures the CPU",
                 c.device);
  if (c.quick) {
    c.max_seqlen = std::min(c.max_seqlen, 2048);
    c.naive_max_seqlen = std::min(c.naive_max_seqlen, 2048);
    c.io_max_seqlen = std::min(c.io_max_seqlen, 1024);
    c.min_time_s = 0.05;
  }
  FLASHGPT_CHECK(c.min_seqlen >= 1 && c.min_seqlen <= c.max_seqlen,
                 "bench attention: need 1 <= --min-seqlen ({}) <= --max-seqlen ({})", c.min_seqlen, c.max_seqlen);
  bench_print_effective(c);
  std::vector<int> sizes;
  for (int64_t n = c.min_seqlen; n <= c.max_seqlen; n *= 2) sizes.push_back(static_cast<int>(n));

  for (size_t i = 0; i < std::min<size_t>(2, sizes.size()); ++i) bench_validate(c, std::min(sizes[i], 1024));
  fmt::print("\n");

  // ---- time and memory ----
  const CpuTiling tiling = bench_tiling(c, c.onchip_kib, bench_rule(c.rule));
  const CpuTileShape tile = attention_cpu_tile_shape(tiling, c.head_dim);
  fmt::print(
      "naive = reference (S and P in double), tiled = FlashAttention (Br={}, Bc={}); peak = workspace "
      "allocated beyond inputs and outputs (max of forward and backward); IO = bytes between tensors and "
      "tiles in the tiled passes (counted) vs standard attention's forward (Algorithm 0, 4N^2 + 4Nd "
      "floats)\n",
      tile.block_rows, tile.block_cols);
  fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", "N",
             "naive fwd", "tiled fwd", "ratio", "naive bwd", "tiled bwd", "ratio", "naive peak", "tiled peak",
             "tiled fwd", "tiled bwd", "standard");
  fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", "", "ms",
             "ms", "", "ms", "ms", "", "", "", "IO counted", "IO counted", "fwd IO");
  std::vector<TimingRow> rows;
  for (int n : sizes) {
    BenchProblem x(c, n, 7);
    TimingRow row{};
    row.n = n;
    row.naive_ran = n <= c.naive_max_seqlen;
    row.naive_fwd_bytes = attention_reference_workspace_bytes(x.params, AttentionPass::forward);
    row.naive_bwd_bytes = attention_reference_workspace_bytes(x.params, AttentionPass::backward);
    row.tiled_fwd_bytes = attention_cpu_workspace_bytes(x.params, AttentionPass::forward, tiling);
    row.tiled_bwd_bytes = attention_cpu_workspace_bytes(x.params, AttentionPass::backward, tiling);
    row.standard_io_bytes = 4.0 * c.batch * c.heads * (4.0 * n * n + 4.0 * n * c.head_dim);
    // The first timed run of each pass is also the instrumented one: counting costs a few
    // additions per tile, nothing next to the tile's arithmetic.
    IoCounter fwd_io, bwd_io;
    bool counting = true;
    row.tiled_fwd_s = time_best_s(c, [&] {
      attention_forward_cpu(x.params, tiling, counting ? &fwd_io : nullptr);
      counting = false;
    });
    row.tiled_io_bytes = fwd_io.total();
    if (c.backward) {
      counting = true;
      row.tiled_bwd_s = time_best_s(c, [&] {
        attention_backward_cpu(x.params, tiling, counting ? &bwd_io : nullptr);
        counting = false;
      });
      row.tiled_bwd_io_bytes = bwd_io.total();
    }
    if (row.naive_ran) {
      row.naive_fwd_s = time_best_s(c, [&] { attention_forward_reference(x.params); });
      if (c.backward) row.naive_bwd_s = time_best_s(c, [&] { attention_backward_reference(x.params); });
    }
    const std::string skipped = "skipped";
    auto ratio = [&](double naive, double tiled) {
      return row.naive_ran && tiled > 0 ? fmt::format("{:.1f}x", naive / tiled) : std::string("-");
    };
    fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", n,
               row.naive_ran ? format_ms(row.naive_fwd_s) : skipped, format_ms(row.tiled_fwd_s),
               ratio(row.naive_fwd_s, row.tiled_fwd_s),
               row.naive_ran && c.backward ? format_ms(row.naive_bwd_s) : skipped,
               c.backward ? format_ms(row.tiled_bwd_s) : skipped, ratio(row.naive_bwd_s, row.tiled_bwd_s),
               format_bytes(std::max(row.naive_fwd_bytes, c.backward ? row.naive_bwd_bytes : 0)),
               format_bytes(std::max(row.tiled_fwd_bytes, c.backward ? row.tiled_bwd_bytes : 0)),
               format_bytes(row.tiled_io_bytes), c.backward ? format_bytes(row.tiled_bwd_io_bytes) : skipped,
               format_bytes(row.standard_io_bytes));
    std::fflush(stdout);
    rows.push_back(row);
  }
  if (c.naive_max_seqlen < c.max_seqlen) {
    fmt::print("naive skipped above N={} (--naive-max-seqlen): its backward would allocate {} at N={}\n",
               c.naive_max_seqlen, format_bytes(2.0 * 8 * double(c.max_seqlen) * c.max_seqlen), c.max_seqlen);
  }

  // ---- IO against the bound, several M ----
  fmt::print(
      "\nIO of the tiled forward against Theorem 2's bound N^2 d^2 / M (M in floats, x4 bytes, x batch*heads), "
      "valid for d <= M <= N d\n");
  fmt::print("{:>6} {:>9} {:>9} {:>11} {:>13} {:>13} {:>13}\n", "N", "M", "rule", "Br x Bc", "counted", "bound",
             "counted/bound");
  std::vector<IoRow> io_rows;
  for (int n : sizes) {
    if (n > c.io_max_seqlen) break;
    BenchProblem x(c, n, 9);
    for (int64_t kib : c.io_onchip_kib) {
      for (CpuTileRule rule : {CpuTileRule::paper, CpuTileRule::max_rows}) {
        const CpuTiling t = bench_tiling(c, kib, rule);
        IoCounter io;
        attention_forward_cpu(x.params, t, &io);
        const double m_floats = kib * 1024 / 4.0;
        IoRow r{n,
                kib * 1024,
                rule == CpuTileRule::paper ? "paper" : "max_rows",
                attention_cpu_tile_shape(t, c.head_dim),
                io.total(),
                4.0 * c.batch * c.heads * double(n) * n * c.head_dim * c.head_dim / m_floats};
        fmt::print("{:>6} {:>9} {:>9} {:>11} {:>13} {:>13} {:>13.2f}{}\n", n, format_bytes(double(r.onchip_bytes)),
                   r.rule, fmt::format("{}x{}", r.tile.block_rows, r.tile.block_cols),
                   format_bytes(double(r.counted_bytes)), format_bytes(r.bound_bytes), r.counted_bytes / r.bound_bytes,
                   m_floats > double(n) * c.head_dim ? "  (M > N d: outside the bound's range)" : "");
        io_rows.push_back(r);
      }
    }
    std::fflush(stdout);
  }

  if (c.out_dir.empty()) return;
  const std::filesystem::path dir(c.out_dir);
  std::filesystem::create_directories(dir);
  const std::filesystem::path timing_csv = dir / "attention_cpu_timing.csv", io_csv = dir / "attention_cpu_io.csv";
  atomic_write_file(timing_csv, [&](AtomicFile& out) {
    out.write(std::string_view(
        "n,batch,heads,head_dim,causal,naive_ran,naive_fwd_s,naive_bwd_s,tiled_fwd_s,tiled_bwd_s,"
        "naive_fwd_bytes,naive_bwd_bytes,tiled_fwd_bytes,tiled_bwd_bytes,tiled_io_bytes,tiled_bwd_io_bytes,standard_"
        "io_bytes\n"));
    for (const TimingRow& r : rows) {
      out.write(fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r.n, c.batch, c.heads, c.head_dim,
                            int(c.causal), int(r.naive_ran), r.naive_fwd_s, r.naive_bwd_s, r.tiled_fwd_s,
                            r.tiled_bwd_s, r.naive_fwd_bytes, r.naive_bwd_bytes, r.tiled_fwd_bytes, r.tiled_bwd_bytes,
                            r.tiled_io_bytes, r.tiled_bwd_io_bytes, r.standard_io_bytes));
    }
  });
  atomic_write_file(io_csv, [&](AtomicFile& out) {
    out.write(std::string_view("n,head_dim,onchip_bytes,rule,block_rows,block_cols,counted_bytes,bound_bytes\n"));
    for (const IoRow& r : io_rows) {
      out.write(fmt::format("{},{},{},{},{},{},{},{}\n", r.n, c.head_dim, r.onchip_bytes, r.rule, r.tile.block_rows,
                            r.tile.block_cols, r.counted_bytes, r.bound_bytes));
    }
  });
  fmt::print("\nwrote {} and {}\n", timing_csv.string(), io_csv.string());

  // The plot is matplotlib's job; the CSVs are the result, the PNG a convenience.
  std::filesystem::path script = std::filesystem::path(FLASHGPT_SOURCE_DIR) / "scripts" / "plot_attention_cpu.py";
  if (!std::filesystem::exists(script)) script = "scripts/plot_attention_cpu.py";
  const std::filesystem::path png = dir / "attention_cpu.png";
  const std::vector<std::string> plot = {"python3", script.string(), "--timing", timing_csv.string(), "--io",
                                         io_csv.string(), "--out", atomic_temp_path(png).string()};
  if (process_run({"python3", "-c", "import matplotlib"}, ChildOutput::discard) != 0) {
    fmt::print("no plot: python3 with matplotlib is needed (pip install matplotlib), then run\n  python3 {} "
               "--timing {} --io {} --out {}\n", script.string(), timing_csv.string(), io_csv.string(), png.string());
    return;
  }
  const int status = process_run(plot);
  if (status != 0) {
    std::error_code ignored;
    std::filesystem::remove(plot.back(), ignored);
    FLASHGPT_FAIL("plotting {} failed: python3 {} exited with status {}", png.string(), script.string(), status);
  }
  atomic_publish(plot.back(), png);
  fmt::print("wrote {}\n", png.string());
}

}  // namespace

void cli_add_bench_attention(CLI::App& bench) {
  auto config = std::make_shared<BenchAttentionConfig>();
  auto* cmd = bench.add_subcommand("attention", "Naive vs tiled (FlashAttention) attention: time, memory, IO");
  cmd->add_option("--device", config->device, "Where to run")->check(CLI::IsMember({"cpu"}))->capture_default_str();
  cli_option_out(*cmd, config->out_dir, "Write CSV and PNG into this directory");
  cmd->add_option("--min-seqlen", config->min_seqlen, "Smallest N (then doubling)")->capture_default_str();
  cmd->add_option("--max-seqlen", config->max_seqlen, "Largest N")->capture_default_str();
  cmd->add_option("--naive-max-seqlen", config->naive_max_seqlen,
                  "Largest N for the naive reference (its backward needs 16 N^2 bytes)")
      ->capture_default_str();
  cmd->add_option("--io-max-seqlen", config->io_max_seqlen, "Largest N of the IO-vs-M sweep")->capture_default_str();
  cmd->add_option("--batch", config->batch, "Batch size")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--heads", config->heads, "Heads")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--head-dim", config->head_dim, "Head dimension")
      ->check(CLI::IsMember(std::vector<int>(kAttentionHeadDims.begin(), kAttentionHeadDims.end())))
      ->capture_default_str();
  cmd->add_flag("--causal", config->causal, "Causal mask");
  cmd->add_flag("!--no-backward", config->backward, "Time the forward pass only");
  cmd->add_flag("--quick", config->quick, "N up to 2048, short measurements (a smoke run)");
  cli_option_threads(*cmd, config->threads, "OpenMP threads");
  cmd->add_option("--onchip-kib", config->onchip_kib, "On-chip budget M of the timed tiled run, KiB")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--rule", config->rule, "Tile rule of the timed tiled run: paper (Br = min(Bc, d)) or max_rows")
      ->check(CLI::IsMember({"paper", "max_rows"}))
      ->capture_default_str();
  cmd->add_option("--io-onchip-kib", config->io_onchip_kib, "Budgets M of the IO sweep, KiB")->capture_default_str();
  cmd->add_option("--min-time", config->min_time_s, "Seconds to repeat each measurement for")->capture_default_str();
  cmd->callback([cmd, config] {
    cli_config_print(*cmd, stdout);
    bench_attention_run(*config);
  });
}

}  // namespace flashgpt

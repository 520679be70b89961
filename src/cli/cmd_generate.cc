// `flashgpt generate --run RUN "prompt"`: text from a trained run (CPU or GPU), streamed as it
// is produced (one prompt) or batched (--prompts FILE, one prompt per line).
#include "commands.h"
#include "options.h"

#include <flashgpt/data.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

struct GenerateOptions {
  std::string run;
  std::vector<std::string> prompts;  // positional
  std::string prompts_file;
  int64_t max_new_tokens = 128;
  bool greedy = false;
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 1234;
  std::vector<std::string> stop;
  bool ignore_end_of_text = false;
  int64_t batch = 8;
  int threads = 0;
  std::string device = "auto";
  std::string tokenizer_dir;
  bool json = false;
  bool quiet = false;
};

void run_generate(const GenerateOptions& o) {
  std::vector<std::string> prompts = o.prompts;
  if (!o.prompts_file.empty()) {
    LineReader reader(o.prompts_file);
    std::string line;
    while (reader.next(line)) prompts.push_back(line);
  }
  FLASHGPT_CHECK(!prompts.empty(), "no prompt: give one as an argument or --prompts FILE");
  std::vector<std::string> stops;
  for (const auto& s : o.stop) stops.push_back(stop_string_unescape(s));
  fmt::print(stderr,
             "generate: run={} prompts={} max_new_tokens={} greedy={} temperature={} top_k={} top_p={} seed={} "
             "stop=[{}] stop_at_end_of_text={} batch={} threads={} device={}\n",
             o.run, prompts.size(), o.max_new_tokens, o.greedy, o.temperature, o.top_k, o.top_p, o.seed,
             fmt::join(o.stop, ","), !o.ignore_end_of_text, o.batch, o.threads, o.device);

  const RunWeights weights = run_load_weights(o.run);
  const Tokenizer tokenizer = Tokenizer::load(weights.encoding, cli_tokenizer_dir(o.tokenizer_dir));
  const ModelConfig& c = weights.config;
  fmt::print(stderr, "model: {} (step {}), {} preset, V {}, C {}, L {}, NH {}, T {}; tokenizer {}\n",
             weights.checkpoint.string(), weights.step, c.preset, c.vocab_size, c.d_model, c.n_layer, c.n_head,
             c.context, tokenizer.name());
  InferenceOptions io;
  io.max_slots = std::min<int64_t>(o.batch, static_cast<int64_t>(prompts.size()));
  io.threads = o.threads;
  auto engine = inference_create(o.device, c, weights.params, io);

  GenerateConfig config;
  config.max_new_tokens = o.max_new_tokens;
  config.sampling = {o.greedy, o.temperature, o.top_k, o.top_p, o.seed};
  config.stop = stops;
  config.stop_at_end_of_text = !o.ignore_end_of_text;
  const bool stream = prompts.size() == 1 && !o.json;
  GenerateStats stats;
  StreamCallback on_text;
  if (stream) {
    fmt::print("{}", prompts[0]);
    std::fflush(stdout);
    on_text = [](size_t, std::string_view text, bool done) {
      fmt::print("{}{}", text, done ? "\n" : "");
      std::fflush(stdout);
    };
  }
  const auto results = generate_texts(*engine, tokenizer, prompts, config, on_text, &stats);
  if (!stream) {
    for (size_t i = 0; i < results.size(); ++i) {
      if (o.json) {
        nlohmann::ordered_json j;
        j["index"] = i;
        j["prompt"] = prompts[i];
        j["output"] = results[i].text;
        j["finish"] = finish_reason_name(results[i].finish);
        j["prompt_tokens"] = results[i].prompt_tokens;
        j["tokens"] = results[i].tokens.size();
        fmt::print("{}\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      } else {
        fmt::print("=== {} ({}, {} tokens)\n{}{}\n", i, finish_reason_name(results[i].finish), results[i].tokens.size(),
                   prompts[i], results[i].text);
      }
    }
  }
  if (!o.quiet) {
    const int64_t decoded = stats.generated_tokens - static_cast<int64_t>(results.size());
    fmt::print(stderr,
               "generated {} tokens for {} prompts ({} prompt tokens): prefill {:.3f} s ({:.0f} tokens/s), decode "
               "{} steps in {:.3f} s ({:.1f} tokens/s)\n",
               stats.generated_tokens, results.size(), stats.prompt_tokens, stats.seconds_prefill,
               stats.seconds_prefill > 0 ? stats.prompt_tokens / stats.seconds_prefill : 0.0, stats.decode_steps,
               stats.seconds_decode, stats.seconds_decode > 0 ? decoded / stats.seconds_decode : 0.0);
  }
}

}  // namespace

void cli_add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  auto* g = app.add_subcommand("generate", "Generate text from a trained run (CPU or GPU, KV cache), streamed as it comes");
  g->add_option("prompt", o->prompts, "Prompt text (several: a batch)");
  g->add_option("--run", o->run, "Run directory (or its checkpoint.safetensors)")->required();
  g->add_option("--prompts", o->prompts_file, "File of prompts, one per line (.xz/.gz fine), run as a batch");
  g->add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate at most per prompt")
      ->capture_default_str()->check(CLI::PositiveNumber);
  g->add_flag("--greedy", o->greedy, "Argmax decoding (ignores temperature, top-k, top-p)");
  g->add_option("--temperature", o->temperature, "Divide the logits by this (> 0)")->capture_default_str();
  g->add_option("--top-k", o->top_k, "Sample among the k most likely tokens (0: all)")->capture_default_str();
  g->add_option("--top-p", o->top_p, "Sample among the most likely tokens holding this much probability (1: all)")
      ->capture_default_str();
  cli_option_seed(*g, o->seed, "the sampler (a prompt's output does not depend on its batch)");
  g->add_option("--stop", o->stop, "Stop a row at this text (repeatable; escapes \\n \\t \\\\ \\xHH \\uHHHH)");
  g->add_flag("--ignore-end-of-text", o->ignore_end_of_text, "Do not stop at <|endoftext|>");
  g->add_option("--batch", o->batch, "Prompts in flight at once (KV-cache slots)")->capture_default_str()
      ->check(CLI::PositiveNumber);
  cli_option_threads(*g, o->threads, "CPU threads");
  g->add_option("--device", o->device, "cpu, cuda, or auto (cuda where a GPU is present)")->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cli_option_tokenizer_dir(*g, o->tokenizer_dir);
  g->add_flag("--json", o->json, "One JSON object per prompt (index, prompt, output, finish, tokens) instead of text");
  g->add_flag("--quiet", o->quiet, "No timing line on stderr");
  g->callback([o] { run_generate(*o); });
}

}  // namespace flashgpt

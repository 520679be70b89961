// generate(): prompts through an InferenceEngine, every slot kept busy, text streamed.
//
// Each prompt owns one slot from its prefill to its last token. When a row finishes, the
// next prompt is prefilled into its slot in the same forward call in which the other rows
// decode, so a batch of prompts of different lengths never waits on its longest row.
#include <flashgpt/error.h>
#include <flashgpt/generate.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <optional>

namespace flashgpt {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::stop_string: return "stop";
    case FinishReason::end_of_text: return "end_of_text";
    case FinishReason::max_new_tokens: return "length";
    case FinishReason::context: return "context";
  }
  return "?";
}

// ---- stop strings --------------------------------------------------------------------

StopStreamer::StopStreamer(const Tokenizer& tokenizer, std::vector<std::string> stops)
    : decoder_(tokenizer), stops_(std::move(stops)) {
  for (const auto& s : stops_) FLASHGPT_CHECK(!s.empty(), "generate: a stop string is empty");
}

// held_ is valid UTF-8 (the decoder emits whole characters). A stop string found in it
// ends the row; otherwise everything is released except the longest tail that is a proper
// prefix of some stop string. Such a tail starts with a stop string's first byte, a lead
// byte, so the cut never falls inside a character.
std::string StopStreamer::release(bool final) {
  size_t first_stop = std::string::npos;
  for (const auto& s : stops_) first_stop = std::min(first_stop, held_.find(s));
  std::string out;
  if (first_stop != std::string::npos) {
    out = held_.substr(0, first_stop);
    held_.clear();
    stopped_ = true;
  } else {
    size_t keep = 0;
    if (!final) {
      for (const auto& s : stops_) {
        for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k) {
          if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
            keep = k;
            break;
          }
        }
      }
    }
    out = held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
  }
  text_ += out;
  return out;
}

std::string StopStreamer::push(TokenId token) {
  if (stopped_) return {};
  held_ += decoder_.push(token);
  return release(/*final=*/false);
}

std::string StopStreamer::finish() {
  if (stopped_) return {};
  held_ += decoder_.finish();
  return release(/*final=*/true);
}

std::string stop_string_unescape(std::string_view text) {
  auto hex = [&](size_t at, size_t digits) {
    FLASHGPT_CHECK(at + digits <= text.size(), "stop string '{}': \\x needs 2 and \\u 4 hex digits", text);
    uint32_t value = 0;
    for (size_t i = at; i < at + digits; ++i) {
      const char c = text[i];
      const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      FLASHGPT_CHECK(d >= 0, "stop string '{}': '{}' is not a hex digit", text, c);
      value = value * 16 + static_cast<uint32_t>(d);
    }
    return value;
  };
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\\') {
      out += text[i];
      continue;
    }
    FLASHGPT_CHECK(i + 1 < text.size(), "stop string '{}' ends with a lone backslash", text);
    const char c = text[++i];
    if (c == 'n') {
      out += '\n';
    } else if (c == 't') {
      out += '\t';
    } else if (c == 'r') {
      out += '\r';
    } else if (c == '\\') {
      out += '\\';
    } else if (c == 'x') {
      out += static_cast<char>(hex(i + 1, 2));
      i += 2;
    } else if (c == 'u') {
      const uint32_t cp = hex(i + 1, 4);
      i += 4;
      FLASHGPT_CHECK(cp < 0xD800 || cp > 0xDFFF, "stop string '{}': \\u{:04X} is a surrogate", text, cp);
      if (cp < 0x80) {
        out += static_cast<char>(cp);
      } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      } else {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      }
    } else {
      FLASHGPT_FAIL("stop string '{}': unknown escape '\\{}' (known: \\n \\t \\r \\\\ \\xHH \\uHHHH)", text, c);
    }
  }
  FLASHGPT_CHECK(!out.empty(), "a stop string is empty");
  // Valid UTF-8, so that a held-back tail always starts on a character boundary.
  for (size_t i = 0; i < out.size();) {
    const auto b = static_cast<unsigned char>(out[i]);
    const size_t len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    FLASHGPT_CHECK(len > 0 && i + len <= out.size(), "stop string '{}' is not valid UTF-8 at byte {}", text, i);
    for (size_t k = 1; k < len; ++k) {
      FLASHGPT_CHECK((static_cast<unsigned char>(out[i + k]) & 0xC0) == 0x80,
                     "stop string '{}' is not valid UTF-8 at byte {}", text, i + k);
    }
    i += len;
  }
  return out;
}

// ---- choosing an engine ----------------------------------------------------------------

std::string inference_resolve_device(std::string_view device, const ModelConfig* config) {
  if (device == "cpu" || device == "cuda") return std::string(device);
  FLASHGPT_CHECK(device == "auto", "unknown device '{}' (choices: cpu, cuda, auto)", device);
  const bool cuda = config ? inference_cuda_supports(*config) : inference_cuda_available();
  return cuda ? "cuda" : "cpu";
}

std::unique_ptr<InferenceEngine> inference_create(std::string_view device, const ModelConfig& config,
                                                  std::span<const float> params, const InferenceOptions& options) {
  return inference_resolve_device(device, &config) == "cuda" ? inference_create_cuda(config, params, options)
                                                     : inference_create_cpu(config, params, options);
}

// ---- the engine's default sampling ------------------------------------------------------

void InferenceEngine::forward_sample(std::span<const SlotChunk> chunks, const SamplingConfig& sampling,
                                     std::span<const uint64_t> prompt_index, std::span<const uint64_t> step,
                                     std::span<TokenId> tokens_out) {
  const size_t B = chunks.size();
  FLASHGPT_CHECK(prompt_index.size() == B && step.size() == B && tokens_out.size() == B,
                 "forward_sample: {} chunks but {} prompt indices, {} steps, {} outputs", B, prompt_index.size(),
                 step.size(), tokens_out.size());
  const auto V = static_cast<size_t>(config().vocab_size);
  std::vector<float> logits(B * V);
  forward(chunks, logits);
  std::vector<std::pair<float, TokenId>> scratch;
  for (size_t b = 0; b < B; ++b) {
    tokens_out[b] = sampling_draw(std::span<const float>(logits.data() + b * V, V), sampling, prompt_index[b],
                                  step[b], scratch);
  }
}

// ---- the loop ------------------------------------------------------------------------

namespace {

struct Row {
  size_t index = 0;                // the prompt's
  int64_t slot = 0;
  std::vector<TokenId> chunk;      // what the next forward call appends
  bool prefill = true;
  std::optional<StopStreamer> streamer;
};

}  // namespace

std::vector<GenerationResult> generate_tokens(InferenceEngine& engine, const Tokenizer& tokenizer,
                                              std::span<const std::vector<TokenId>> prompts,
                                              const GenerateConfig& config, const StreamCallback& on_text,
                                              GenerateStats* stats) {
  sampling_validate(config.sampling);
  FLASHGPT_CHECK(config.max_new_tokens >= 1, "generate: max_new_tokens must be at least 1, got {}",
                 config.max_new_tokens);
  for (const auto& s : config.stop) FLASHGPT_CHECK(!s.empty(), "generate: a stop string is empty");
  const int64_t V = engine.config().vocab_size;
  const int64_t t_max = engine.max_context();
  const TokenId eot = tokenizer.end_of_text();
  // A model may know fewer ids than its tokenizer (the tests' tiny vocabularies), never more.
  FLASHGPT_CHECK(V <= static_cast<int64_t>(tokenizer.vocab_size()),
                 "generate: the model's vocabulary of {} ids is larger than the tokenizer {}'s {}", V,
                 tokenizer.name(), tokenizer.vocab_size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t len = std::max<int64_t>(1, static_cast<int64_t>(prompts[i].size()));
    FLASHGPT_CHECK(len < t_max, "generate: prompt {} has {} tokens; the context of {} leaves no room to generate",
                   i, len, t_max);
  }

  std::vector<GenerationResult> results(prompts.size());
  std::deque<size_t> waiting;
  for (size_t i = 0; i < prompts.size(); ++i) waiting.push_back(i);
  std::vector<int64_t> free_slots;
  for (int64_t s = engine.max_slots() - 1; s >= 0; --s) free_slots.push_back(s);
  std::vector<Row> rows;
  std::vector<SlotChunk> chunks;
  std::vector<uint64_t> row_index, row_step;
  std::vector<TokenId> drawn;
  GenerateStats local;

  while (!waiting.empty() || !rows.empty()) {
    while (!waiting.empty() && !free_slots.empty()) {
      Row row;
      row.index = waiting.front();
      waiting.pop_front();
      row.slot = free_slots.back();
      free_slots.pop_back();
      row.chunk = prompts[row.index].empty() ? std::vector<TokenId>{eot} : prompts[row.index];
      row.streamer.emplace(tokenizer, config.stop);
      results[row.index].prompt_tokens = static_cast<int64_t>(row.chunk.size());
      local.prompt_tokens += static_cast<int64_t>(row.chunk.size());
      engine.reset(row.slot);
      rows.push_back(std::move(row));
    }
    chunks.clear();
    bool any_prefill = false;
    for (const Row& row : rows) {
      chunks.push_back({row.slot, row.chunk});
      any_prefill = any_prefill || row.prefill;
    }
    row_index.clear(), row_step.clear();
    for (const Row& row : rows) {
      row_index.push_back(row.index);
      row_step.push_back(results[row.index].tokens.size());
    }
    drawn.resize(chunks.size());
    const auto t0 = std::chrono::steady_clock::now();
    engine.forward_sample(chunks, config.sampling, row_index, row_step, drawn);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    (any_prefill ? local.seconds_prefill : local.seconds_decode) += seconds;
    local.decode_steps += any_prefill ? 0 : 1;

    std::vector<Row> still;
    for (size_t b = 0; b < rows.size(); ++b) {
      Row& row = rows[b];
      GenerationResult& result = results[row.index];
      const TokenId token = drawn[b];
      result.tokens.push_back(token);
      ++local.generated_tokens;
      std::optional<FinishReason> finish;
      std::string text;
      if (token == eot && config.stop_at_end_of_text) {
        finish = FinishReason::end_of_text;
      } else {
        text = row.streamer->push(token);
        if (row.streamer->stopped()) {
          finish = FinishReason::stop_string;
        } else if (static_cast<int64_t>(result.tokens.size()) >= config.max_new_tokens) {
          finish = FinishReason::max_new_tokens;
        } else if (engine.length(row.slot) >= t_max) {
          finish = FinishReason::context;  // the token has no position left to be fed at
        }
      }
      if (finish) text += row.streamer->finish();
      if (on_text && !text.empty()) on_text(row.index, text, false);
      if (finish) {
        result.finish = *finish;
        result.text = row.streamer->text();
        if (on_text) on_text(row.index, {}, true);
        free_slots.push_back(row.slot);
      } else {
        row.chunk.assign(1, token);
        row.prefill = false;
        still.push_back(std::move(row));
      }
    }
    rows = std::move(still);
  }
  if (stats) *stats = local;
  return results;
}

std::vector<GenerationResult> generate_texts(InferenceEngine& engine, const Tokenizer& tokenizer,
                                             std::span<const std::string> prompts, const GenerateConfig& config,
                                             const StreamCallback& on_text, GenerateStats* stats) {
  std::vector<std::vector<TokenId>> ids;
  ids.reserve(prompts.size());
  for (const auto& p : prompts) ids.push_back(tokenizer.encode_ordinary(p));
  return generate_tokens(engine, tokenizer, ids, config, on_text, stats);
}

}  // namespace flashgpt

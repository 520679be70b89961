// The real tokenizer as prepare's TextEncoder.
#include <flashgpt/data_prepare.h>

namespace flashgpt {

TextEncoder text_encoder_from(const Tokenizer& tokenizer) {
  TextEncoder encoder;
  encoder.name = tokenizer.name();
  encoder.vocab_size = static_cast<uint32_t>(tokenizer.vocab_size());
  encoder.end_of_text = tokenizer.end_of_text();
  encoder.encode_batch = [&tokenizer](std::span<const std::string_view> texts, int threads) {
    return tokenizer.encode_ordinary_batch(texts, threads);
  };
  return encoder;
}

}  // namespace flashgpt

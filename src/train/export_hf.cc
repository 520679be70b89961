// The Hugging Face export: our checkpoint as a GPT2LMHeadModel directory.
//
// Name and layout mapping (ours -> transformers' GPT-2):
//   wte (Vp, C)            -> transformer.wte.weight (V, C): the padding rows dropped
//   wpe (T, C)             -> transformer.wpe.weight
//   ln1_w/b[l]             -> transformer.h.{l}.ln_1.weight/bias
//   qkv_w[l] (3C, C)       -> transformer.h.{l}.attn.c_attn.weight (C, 3C): Conv1D is (in, out)
//   qkv_b[l]               -> transformer.h.{l}.attn.c_attn.bias
//   attn_proj_w[l] (C, C)  -> transformer.h.{l}.attn.c_proj.weight, transposed
//   ln2_w/b[l]             -> transformer.h.{l}.ln_2.weight/bias
//   fc_w[l] (F, C)         -> transformer.h.{l}.mlp.c_fc.weight (C, F)
//   fc_proj_w[l] (C, F)    -> transformer.h.{l}.mlp.c_proj.weight (F, C)
//   lnf_w/b                -> transformer.ln_f.weight/bias
// lm_head.weight is not stored: GPT2LMHeadModel ties it to wte (tie_word_embeddings).
// Both use the same q|k|v split and head order, GELU tanh ("gelu_new") and eps 1e-5.
#include <flashgpt/atomic_file.h>
#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include <nlohmann/json.hpp>

#include <deque>
#include <string>
#include <vector>

namespace flashgpt {

void export_hf(const std::filesystem::path& checkpoint, const std::filesystem::path& out_dir) {
  const SafetensorsFile file(checkpoint);
  const CheckpointMeta meta = checkpoint_read_meta(file);
  const ModelConfig& c = meta.model;
  const std::vector<float> params = checkpoint_read_params(file, c);
  const auto specs = model_param_specs(c);
  const auto tensor = [&](ParamKind kind) {
    const auto& s = specs[static_cast<size_t>(kind)];
    FLASHGPT_CHECK(s.kind == kind, "model_param_specs is out of enum order");
    return std::span<const float>(params).subspan(static_cast<size_t>(s.offset), static_cast<size_t>(s.numel));
  };
  const int64_t L = c.n_layer, C = c.d_model, F = c.d_ff, V = c.vocab_size;

  std::deque<std::vector<float>> owned;  // transposed copies; a deque keeps their addresses
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");  // transformers refuses safetensors files without it
  writer.add_f32("transformer.wte.weight", {V, C}, tensor(ParamKind::wte).first(static_cast<size_t>(V * C)));
  writer.add_f32("transformer.wpe.weight", {c.context, C}, tensor(ParamKind::wpe));
  // (L, rows, cols) stacked weights -> layer l's (cols, rows) transpose.
  const auto transposed = [&](ParamKind kind, int64_t l, int64_t rows, int64_t cols) {
    const auto all = tensor(kind);
    std::vector<float> t(static_cast<size_t>(rows * cols));
    const float* w = all.data() + l * rows * cols;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < cols; ++k) t[static_cast<size_t>(k * rows + r)] = w[r * cols + k];
    }
    owned.push_back(std::move(t));
    return std::span<const float>(owned.back());
  };
  const auto row = [&](ParamKind kind, int64_t l, int64_t n) {
    return tensor(kind).subspan(static_cast<size_t>(l * n), static_cast<size_t>(n));
  };
  for (int64_t l = 0; l < L; ++l) {
    const std::string h = fmt::format("transformer.h.{}.", l);
    writer.add_f32(h + "ln_1.weight", {C}, row(ParamKind::ln1_w, l, C));
    writer.add_f32(h + "ln_1.bias", {C}, row(ParamKind::ln1_b, l, C));
    writer.add_f32(h + "attn.c_attn.weight", {C, 3 * C}, transposed(ParamKind::qkv_w, l, 3 * C, C));
    writer.add_f32(h + "attn.c_attn.bias", {3 * C}, row(ParamKind::qkv_b, l, 3 * C));
    writer.add_f32(h + "attn.c_proj.weight", {C, C}, transposed(ParamKind::attn_proj_w, l, C, C));
    writer.add_f32(h + "attn.c_proj.bias", {C}, row(ParamKind::attn_proj_b, l, C));
    writer.add_f32(h + "ln_2.weight", {C}, row(ParamKind::ln2_w, l, C));
    writer.add_f32(h + "ln_2.bias", {C}, row(ParamKind::ln2_b, l, C));
    writer.add_f32(h + "mlp.c_fc.weight", {C, F}, transposed(ParamKind::fc_w, l, F, C));
    writer.add_f32(h + "mlp.c_fc.bias", {F}, row(ParamKind::fc_b, l, F));
    writer.add_f32(h + "mlp.c_proj.weight", {F, C}, transposed(ParamKind::fc_proj_w, l, C, F));
    writer.add_f32(h + "mlp.c_proj.bias", {C}, row(ParamKind::fc_proj_b, l, C));
  }
  writer.add_f32("transformer.ln_f.weight", {C}, tensor(ParamKind::lnf_w));
  writer.add_f32("transformer.ln_f.bias", {C}, tensor(ParamKind::lnf_b));

  nlohmann::ordered_json j;
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  j["vocab_size"] = V;
  j["n_positions"] = c.context;
  j["n_ctx"] = c.context;
  j["n_embd"] = C;
  j["n_layer"] = L;
  j["n_head"] = c.n_head;
  j["n_inner"] = F;
  j["activation_function"] = "gelu_new";
  j["layer_norm_epsilon"] = 1e-5;  // kLayerNormEps, written as the decimal it was given as
  const double dropout = std::stod(fmt::format("{}", c.dropout));  // 0.1, not 0.10000000149
  j["resid_pdrop"] = dropout;
  j["embd_pdrop"] = dropout;
  j["attn_pdrop"] = dropout;
  j["initializer_range"] = 0.02;
  j["scale_attn_weights"] = true;
  j["tie_word_embeddings"] = true;
  j["torch_dtype"] = "float32";
  j["flashgpt_encoding"] = meta.encoding;
  j["flashgpt_step"] = meta.state.step;

  std::filesystem::create_directories(out_dir);
  writer.write(out_dir / "model.safetensors");
  atomic_write_file(out_dir / "config.json", j.dump(2) + "\n");
}

}  // namespace flashgpt

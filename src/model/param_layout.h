// Where each parameter tensor (and layer l of a per-layer one) sits in the one flat
// parameter buffer of model_param_specs(); the gradient and AdamW buffers share it.
#pragma once

#include <flashgpt/model.h>

#include <cstdint>
#include <vector>

namespace flashgpt::model {

// wte, wpe and the final LayerNorm exist once; every other kind is stacked (L, ...).
inline bool param_kind_per_layer(ParamKind kind) {
  return kind != ParamKind::wte && kind != ParamKind::wpe && kind != ParamKind::lnf_w && kind != ParamKind::lnf_b;
}

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& config) : specs_(model_param_specs(config)), n_layer_(config.n_layer) {}

  // Offset in floats of `kind` (layer `layer` of a per-layer kind) in the buffer.
  int64_t offset(ParamKind kind, int64_t layer = 0) const {
    const ParamSpec& s = specs_[static_cast<size_t>(kind)];
    return s.offset + (param_kind_per_layer(kind) ? layer * (s.numel / n_layer_) : 0);
  }
  template <class S>
  S* at(S* base, ParamKind kind, int64_t layer = 0) const {
    return base + offset(kind, layer);
  }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t total() const { return specs_.back().offset + specs_.back().numel; }

 private:
  std::vector<ParamSpec> specs_;
  int64_t n_layer_;
};

}  // namespace flashgpt::model

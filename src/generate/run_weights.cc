// A run's weights for inference: the "model.*" tensors and the metadata of its checkpoint.
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/safetensors.h>
#include <flashgpt/train.h>

namespace flashgpt {

RunWeights run_load_weights(const std::filesystem::path& run) {
  const std::filesystem::path checkpoint =
      std::filesystem::is_directory(run) ? run / "checkpoint.safetensors" : run;
  FLASHGPT_CHECK(std::filesystem::is_regular_file(checkpoint),
                 "{}: no checkpoint (give a run directory holding checkpoint.safetensors, or the file itself)",
                 checkpoint.string());
  const SafetensorsFile file(checkpoint);
  const CheckpointMeta meta = checkpoint_read_meta(file);
  RunWeights w;
  w.checkpoint = checkpoint;
  w.config = meta.model;
  w.encoding = meta.encoding;
  w.step = meta.state.step;
  w.params = checkpoint_read_params(file, meta.model);
  return w;
}

}  // namespace flashgpt

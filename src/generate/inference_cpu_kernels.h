// The inference engine's row loops on the CPU (fp32, OpenMP). Private to src/generate.
#pragma once

#include <cstdint>

namespace flashgpt::inference_cpu {

int threads_or_default(int threads);

// y (rows, C) = LayerNorm(x (rows, C)) * weight + bias, eps kLayerNormEps. y may be x.
void layernorm_forward(float* y, const float* x, const float* weight, const float* bias, int64_t rows, int64_t C,
                       int threads);

enum class LinearOutput { overwrite, add };
// y (N, O) = x (N, I) W^T + b, W (O, I) row-major, b (O) or null; LinearOutput::add adds
// the result to y (the residual stream).
void linear_forward(float* y, const float* x, const float* w, const float* b, int64_t N, int64_t I, int64_t O,
                    LinearOutput mode, int threads);

// x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise.
void gelu_tanh_inplace(float* x, int64_t count, int threads);

}  // namespace flashgpt::inference_cpu

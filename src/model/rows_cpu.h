// Row and elementwise loops of the CPU layers that run once per ISA (cpu_isa.h): each
// entry point reads cpu_isa() once per call and runs its AVX-512, AVX2 or baseline (SSE2)
// copy of one loop body. Results differ across ISAs in the last bits (FMA contracts, lane count
// of a reduction) but never across thread counts: each output is one thread's work.
#pragma once

#include <cstdint>

namespace flashgpt::model {

// exp(x) in fp32 for x <= 0 (the softmax's shifted logits): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, and a degree-7 polynomial for e^r; within 2 ulp of
// std::exp on [-87, 0], and flushed to 0 below -87 (e^-87 is 1.6e-38, beneath fp32's
// normal range).
float exp_neg_cpu(float x);

// The classifier's vocabulary slabs (layers_cpu.cc), picked once per call for the ISA:
// exp_slab sets x = exp(x - max) over n values and returns their fp32 sum with the max in
// *max_out; scale multiplies n values by s.
struct SlabKernels {
  float (*exp_slab)(float* x, int64_t n, float* max_out);
  void (*scale)(float* x, int64_t n, float s);
};
SlabKernels slab_kernels();

// GELU (tanh approximation) forward and backward over n elements (layers_cpu.h), tanh
// through exp_neg: tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|). OpenMP over n.
void gelu_forward_cpu(float* out, const float* inp, int64_t n);
void gelu_backward_cpu(float* dinp, const float* inp, const float* dout, int64_t n);

// AdamW over n elements (gpt_cpu.cc's adamw_step_range): g scaled by grad_scale; p decays by
// `decay` and steps by step_size m / (sqrt(v) inv_sqrt_bc2 + eps).
struct AdamWRow {
  float b1, b2, step_size, inv_sqrt_bc2, eps, decay, grad_scale;
};
void adamw_cpu(float* p, const float* g, float* m, float* v, int64_t n, const AdamWRow& a);

}  // namespace flashgpt::model

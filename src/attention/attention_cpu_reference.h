// The reference attention in double precision, for tests: the same params as the public
// fp32 reference, but q, k, v, o, d_o, dq, dk, dv point to double (lse stays float). Finite
// differences of the double forward check the double backward; the fp32 paths are then
// checked against it. Internal to the library and its tests.
#pragma once

#include <flashgpt/attention.h>

namespace flashgpt {

void attention_forward_reference_f64(const AttentionParams& params);
void attention_backward_reference_f64(const AttentionParams& params);

}  // namespace flashgpt

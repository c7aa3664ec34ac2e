// Reduced-precision convolutions on a CPU whose oneDNN has no kernels for them.
//
// Where oneDNN runs no bfloat16 (no AVX512 or AMX: torch.ops.mkldnn._is_mkldnn_bf16_supported()
// is false, e.g. an AMD EPYC Zen 3), ATen sends a bfloat16 convolution to its generic code
// (im2col and its portable matrix product), about 15x slower than float32 there; float16 alike
// without oneDNN's float16. Eager PyTorch under CPU autocast pays that on every convolution. The
// cpu backend's unit ops convolve such a dtype in float32 instead: x, the weight (and in
// backward dz) widened exactly, then the float32 convolution by float32's rules (gemm_conv.h's
// GEMM path where it applies, else ATen's), and each result (z, dx, dweight) rounded once to the
// dtype, as a bfloat16 convolution rounds its float32 sums.
// Inference folds and prepacks its weights in float32 the same way
// (fusedres/backends/extension.py). docs/design.md section 4 has the measurements.
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedres {
namespace cpu {

// Whether the unit ops convolve bfloat16 / float16 tensors in float32; both false until
// fusedres/_ext.py sets them at load from oneDNN's support (tests set both ways).
void set_conv_in_float32(bool bfloat16, bool float16);

// Whether a convolution of dtype runs in float32 (false for every other dtype).
bool conv_in_float32(at::ScalarType dtype);

}  // namespace cpu
}  // namespace fusedres

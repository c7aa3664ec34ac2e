// The CPU backend's convolution as one matrix product, for the geometries where that beats
// oneDNN's convolution in training (docs/design.md section 4, "Convolutions on the CPU").
//
// In channels_last a convolution is a GEMM over rows (n, ho, wo): z[M, Cout] = cols[M, K] @
// W[Cout, K]^T with M = N*Ho*Wo and K = kh*kw*Cin, where cols holds, per output position, the
// kh*kw input pixels it reads (im2col; x itself for a 1x1 stride-1 convolution) in the order of
// the weight's memory ((kh, kw, cin) for a channels_last weight, (cin, kh, kw) for a contiguous
// one), so W is a view of the weight. Backward:
// dW = dz^T @ cols, dcols = dz @ W, and dx sums each input pixel's dcols entries (col2im).
// Where much of cols would be zero padding (small maps), float32 goes tap by tap instead: each
// tap's products over only the output positions where it reads x (gemm_conv.cpp, splits_by_tap).
//
// Where it wins: oneDNN reorders the weight into a blocked layout on every call of the forward,
// the data gradient and the weight gradient, and a training step changes the weights each time,
// so none of it is cached. In ResNet's layer3/layer4 at small images (and in every 1x1 layer) the
// weights are as large as or larger than the activations, and those reorders dominate; the GEMM
// reads the weight in place. Where the activations dominate (a 3x3 at 28x28), im2col's kh*kw
// copies cost more than the reorders save, so those stay on ATen's convolution.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedres {
namespace cpu {

// Whether the unit ops take the GEMM path for this convolution: enabled (see
// set_gemm_conv_enabled), float32 or bfloat16, CPU, groups == 1, x in channels_last (the unit
// layout), and either a 1x1 without padding or a convolution with at most 2*Cout output rows
// (N*Ho*Wo), where the weight outweighs the activations; float32 on a CPU without AMX (see
// set_gemm_conv_float32_amx_rule) only with at most Cout/4 output rows, or for an unpadded 1x1
// with at most max(Cin, Cout)/2 of them; bfloat16 only where oneDNN runs it (see
// set_gemm_conv_bfloat16). The arguments have been checked.
bool gemm_conv_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// z [N, Cout, Ho, Wo] in channels_last, x's dtype.
at::Tensor gemm_conv_forward(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);

// (dx, dweight; each channels_last, as ATen's for a channels_last input, or undefined) from
// dz [N, Cout, Ho, Wo]. dx's col2im sums in float32 and rounds once.
std::tuple<at::Tensor, at::Tensor> gemm_conv_backward(const at::Tensor& dz, const at::Tensor& x,
                                                      const at::Tensor& weight,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool need_dx,
                                                      bool need_dweight);

// cols [N*Ho*Wo, kh*kw*Cin] of a dense channels_last x [N, Cin, H, W] (float32 or bfloat16),
// columns in (tap, channel) order: the rows the convolution with a [Cout, kh, kw, Cin] weight
// matrix multiplies (x itself, as a view, for a 1x1 stride-1 convolution without padding).
// Inference runs its GEMM convolutions over it (fusedres/backends/extension.py).
at::Tensor im2col_rows(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation);

// The switch for benchmarks and A/B checks: on unless FUSEDRES_CPU_GEMM_CONV=0 at load.
void set_gemm_conv_enabled(bool enabled);
bool gemm_conv_enabled();

// Which float32 rule gemm_conv_applies follows: the one measured on a Xeon with AMX (true) or
// the narrower one measured on an AMD EPYC without it (false). fusedres/_ext.py sets it at load
// from the CPU's flags; tests set both.
void set_gemm_conv_float32_amx_rule(bool amx_rule);
bool gemm_conv_float32_amx_rule();

// Whether bfloat16 takes the path: where this CPU's oneDNN runs bfloat16 (AVX512 or AMX), whose
// matmul at::mm calls; elsewhere at::mm's bfloat16 is ATen's generic loop, slower than ATen's
// convolution. fusedres/_ext.py sets it at load (torch.ops.mkldnn._is_mkldnn_bf16_supported);
// tests set both.
void set_gemm_conv_bfloat16(bool enabled);
bool gemm_conv_bfloat16();

}  // namespace cpu
}  // namespace fusedres

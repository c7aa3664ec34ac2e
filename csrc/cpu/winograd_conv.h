// The CPU backend's float32 inference 3x3 convolution (stride 1, padding 1) as Winograd's
// F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//
// Each 2x2 block of outputs ("tile", T = N*ceil(H/2)*ceil(W/2) of them) reads a 4x4 input patch
// d; with the weight transformed once, U = G g G^T (4x4 per output/input channel pair), the tile
// is Y = A^T [sum over input channels of U . (B^T d B)] A. The channel sum, at each of the 16
// positions p of the 4x4 transform, is a matrix product V[p] [T, Cin] @ U[p]^T [Cin, Cout]: 16
// multiplies per 4 outputs where the direct convolution has 36, 2.25x fewer, plus the two
// transforms, passes over memory. The 16 products run as one oneDNN convolution, 1x1 with 16
// groups, over V laid out [T][16][Cin] (a [1, 16*Cin, T, 1] channels_last tensor) with U
// prepacked once (the runner: fusedres/backends/extension.py): oneDNN ran them 1.16-1.5x
// faster so than as 16 matrix products. The output transform applies the folded BatchNorm's
// bias, the residual and the ReLU as it writes y.
// Rounding: the transforms' coefficients are 0, +-1 and +-1/2, exact in float32; the relative
// error against float64 was 1.2-1.7x the direct float32 convolution's on ResNet's layer1-3 shapes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fusedres {
namespace cpu {

// Where inference takes it: float32 CPU, x channels_last, a 3x3 with stride 1, padding 1, no
// dilation or groups, both channel counts at least kWinogradMinChannels, at least
// kWinogradMinWork tiles * Cin * Cout (on small work its three calls cost more than its 2.25x
// fewer multiplies save: per eval unit against the direct convolution, AMD EPYC Zen 3,
// exploratory medians of 15 rounds, 0.70-0.98x with 0.26M or less (64-256 channels at 2x2 to
// 16x16, batch 1), 1.04x and 1.19x at 0.8M, 0.98-1.42x from 1M up), one image's larger
// transformed tensor (16 values per 2x2 block and channel: x's input channels, the products'
// output channels; winograd_image_bytes) within kWinogradMaxImageBytes, and the switch on
// (FUSEDRES_CPU_WINOGRAD=0 at load turns it off). The runner transforms and multiplies the batch
// in chunks of images whose transform stays within kWinogradChunkBytes, so that the transformed
// tensors stay in the cache between the three steps. On a 2-core AMD EPYC (Zen 4), batch 8,
// against oneDNN's prepacked fused convolution (exploratory medians of 30 calls): 64 channels at
// 28x28 0.99x with the whole batch at once, 1.27x in chunks of 2 images (a 1.6 MiB transform);
// 64 at 56x56 0.86x whole, 1.26x one image at a time; 128 at 28x28 1.20x whole, 1.50x in chunks
// of 1-2; 128 at 14x14 1.55x whole, 1.52x in chunks of 4; 256 at 7x7 1.28x, 512 at 4x4 1.42x,
// 64-512 channels at 2x2-14x14 1.12-1.55x whole. kWinogradMaxImageBytes bounds what was
// measured (one image of 64 channels at 56x56 is 3 MiB), it is not a measured limit.
// Training keeps the direct convolution: run there too (z by Winograd, dx as the Winograd
// convolution of dz with the weight rotated and transposed, dweight by ATen), the whole resnet18
// / resnet50 float32 training step was 0.89x / 0.93x as fast (AMD EPYC, 14-20 alternating steps),
// and eager's resnet18 step 0.94-0.97x as fast with this file's chunked, vectorised transforms
// (docs/design.md section 4, which also has why F(4x4, 3x3) and bfloat16 are not used).
constexpr int64_t kWinogradMinChannels = 64;
constexpr int64_t kWinogradMinWork = int64_t{1} << 19;
constexpr int64_t kWinogradMaxImageBytes = int64_t{16} << 20;
constexpr int64_t kWinogradChunkBytes = int64_t{2} << 20;
int64_t winograd_image_bytes(int64_t h, int64_t w, int64_t channels);
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
void set_winograd_enabled(bool enabled);
bool winograd_enabled();

// [16*Cout, Cin, 1, 1] float32, the grouped convolution's weight: group p holds U[p] [Cout, Cin]
// = (G g G^T)[i][j], p = 4*i + j, for weight g [Cout, Cin, 3, 3] (any layout, float32).
at::Tensor winograd_weight(const at::Tensor& weight);

// V [1, 16*C, T, 1] channels_last (memory [T][16][C]) of x [N, C, H, W] float32, any layout.
at::Tensor winograd_input(const at::Tensor& x);

// out [N, Cout, H, W] (dense channels_last float32, written) = act(A^T m A + bias (+ residual))
// from the products m [1, 16*Cout, T, 1] channels_last; bias [Cout] float32; residual like out
// (any layout) or none; act ReLU when relu.
void winograd_output(const at::Tensor& m, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out);

}  // namespace cpu
}  // namespace fusedres

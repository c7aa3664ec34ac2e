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
//
// A dilated 3x3 (dilation d, padding d, stride 1: the segmentation backbones' layer3 and layer4,
// replace_stride_with_dilation) is d*d plain 3x3s, one per phase of the map (the pixels
// (a + d*i, b + d*j)), whose outputs interleave: the transforms read and write each phase's tiles
// with a step of d, so the same products and the same rounding serve it, with no copy of x or y.
// A phase of ceil(h / d) rows is tiled in 2x2 blocks, so part of the last tiles falls outside
// the map; where much does, and where the direct convolution skips much (oneDNN leaves out the
// taps that read only padding: a 3x3 with dilation 4 on a 14x14 map reads padding in 35% of
// them), the saving is gone: winograd_dilated_gain estimates it (winograd_applies below).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedres {
namespace cpu {

// Where inference takes it: float32 CPU, x channels_last, a 3x3 with stride 1, padding equal to
// the dilation (1: none), no groups, both channel counts at least kWinogradMinChannels, at least
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
// A dilated 3x3 (padding equal to the dilation) also needs winograd_dilated_gain at least
// kWinogradMinDilatedGain. Against oneDNN's prepacked dilated convolution (AMD EPYC Zen 3, batch
// 8 unless said, exploratory medians of 25 calls; the estimate in brackets): dilation 2 on 14x14,
// 256 and 512 channels, 1.64x and 1.96x [1.41]; on 28x28, 256 channels, 2.03x [2.04]; on 64x64,
// batch 2, 2.20x [2.16]; dilation 4 on 28x28, 512 channels, 1.30x [1.41]; left out: dilation 4
// on 14x14, 512 channels, 1.02x [1.13], and dilation 2 on 7x7, 256 channels, 1.44x [1.13] (the
// estimate counts multiplies only; the direct convolution is slower per multiply on small maps).
// Rounding as undilated: on five small dilated shapes (dilation 2 to 5, odd maps, a map smaller
// than the dilation) the relative L2 error against float64 was 1.0-1.7x the direct float32
// convolution's.
constexpr int64_t kWinogradMinChannels = 64;
constexpr int64_t kWinogradMinWork = int64_t{1} << 19;
constexpr int64_t kWinogradMaxImageBytes = int64_t{16} << 20;
constexpr int64_t kWinogradChunkBytes = int64_t{2} << 20;
constexpr double kWinogradMinDilatedGain = 1.3;
// Tile rows (columns) of one phase of a map of `size` rows (columns) at dilation d:
// ceil(ceil(size / d) / 2).
int64_t winograd_tiles(int64_t size, int64_t dilation);
// Tiles of one h x w image: dh * dw phases of winograd_tiles(h, dh) * winograd_tiles(w, dw).
int64_t winograd_image_tiles(int64_t h, int64_t w, at::IntArrayRef dilation);
int64_t winograd_image_bytes(int64_t h, int64_t w, int64_t channels, at::IntArrayRef dilation);
// The direct convolution's multiplies over Winograd's on an h x w map at this dilation, each
// counting what it computes: the direct one the taps that read inside the map, Winograd 4 of
// the direct one's 9 per output of its tiles, those outside the map included.
double winograd_dilated_gain(int64_t h, int64_t w, at::IntArrayRef dilation);
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
void set_winograd_enabled(bool enabled);
bool winograd_enabled();

// [16*Cout, Cin, 1, 1] float32, the grouped convolution's weight: group p holds U[p] [Cout, Cin]
// = (G g G^T)[i][j], p = 4*i + j, for weight g [Cout, Cin, 3, 3] (any layout, float32).
at::Tensor winograd_weight(const at::Tensor& weight);

// V [1, 16*C, T, 1] channels_last (memory [T][16][C]) of x [N, C, H, W] float32, any layout, for
// a 3x3 with this dilation (and padding): T = N * winograd_image_tiles(H, W, dilation).
at::Tensor winograd_input(const at::Tensor& x, at::IntArrayRef dilation);

// out [N, Cout, H, W] (dense channels_last float32, written) = act(A^T m A + bias (+ residual))
// from the products m [1, 16*Cout, T, 1] channels_last of winograd_input's tiles at this
// dilation; bias [Cout] float32; residual like out (any layout) or none; act ReLU when relu.
void winograd_output(const at::Tensor& m, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                     at::IntArrayRef dilation);

}  // namespace cpu
}  // namespace fusedres

// CPU backend of the BatchNorm unit ops (docs/design.md section 2).
//
// Two levels:
//  * ATen-level launchers (bn_stats, bn_act_fwd, bn_act_bwd; csrc/cpu/bn_act_cpu.cpp): pick the
//    memory layout, make inputs dense in it, allocate outputs, call a kernel. The argument checks
//    live in csrc/common/checks.h and are run by the binding before these are called.
//  * Raw-pointer kernels (csrc/cpu/bn_act_kernels.h), compiled once per CPU capability
//    (bn_act_kernels_default.cpp, bn_act_kernels_x86_avx2.cpp, bn_act_kernels_x86_avx512.cpp) and
//    chosen at run time, the way ATen's DispatchStub does it, so one binary runs everywhere and
//    uses AVX2 or AVX512 where the CPU has it.
#pragma once

// at::Tensor alone, not <ATen/ATen.h>: the kernel builds include this file, and ATen.h's
// operator declarations were a fifth of each one's compile time (AVX2: 74 -> 58 s, AMD EPYC).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace fusedres {
namespace cpu {

// ---- ATen-level launchers --------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& z);

at::Tensor bn_act_fwd(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& residual, bool relu);

// bn_act_fwd with ReLU that also returns the packed ReLU mask of y (fusedres.cpp describes it).
std::tuple<at::Tensor, at::Tensor> bn_act_fwd_mask(const at::Tensor& z, const at::Tensor& scale,
                                                   const at::Tensor& shift,
                                                   const c10::optional<at::Tensor>& residual);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool relu, bool has_residual,
    bool training);

// bn_act_bwd with ReLU whose gate comes from bn_act_fwd_mask's mask instead of y.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_mask(
    const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool has_residual, bool training);

// The BatchNorm part of a training forward (TrainFwdParams): z [N, C, H, W] (dense in
// checks::unit_memory_format(z)), gamma/beta [C] in the statistics dtype or undefined.
// Returns (y like z, batch mean [C], biased batch variance [C], invstd [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train_fwd(
    const at::Tensor& z, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& residual, bool relu,
    double eps);

// Values of aten::max_pool2d (no indices) for x [N, C, H, W] of any layout, through the
// channels_last kernel; y [N, C, Ho, Wo] channels_last. Arguments checked here.
at::Tensor max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);

// The name of the kernel variant in use ("AVX512", "AVX2" or "DEFAULT"), and the variants compiled
// in.
std::string kernel_variant();
std::string compiled_variants();

// ---- raw-pointer kernels ---------------------------------------------------------------------

// Dense activations of logical shape [N, C, H, W] with HW = H*W, either NCHW (index
// (n*C + c)*HW + hw) or NHWC (index (n*HW + hw)*C + c). Every activation of one call shares it.
struct Geometry {
  int64_t N, C, HW;
  bool channels_last;
};

// Element types: `act` pointers hold the activation dtype (float, double, BFloat16, Half); `stat`
// pointers hold [C] vectors in the statistics dtype (double for double activations, else float).
struct StatsParams {
  Geometry g;
  const void* z;  // act, read
  void* mean;     // stat [C], written
  void* var;      // stat [C], written: biased variance (NaN, like mean, when N*H*W == 0)
};

struct FwdParams {
  Geometry g;
  const void* z;         // act, read
  const void* scale;     // stat [C]
  const void* shift;     // stat [C]
  const void* residual;  // act, read; nullptr when the unit has no residual
  void* y;               // act, written: act(z*scale + shift + residual)
  bool relu;
  // Written when not nullptr (then relu is true): the packed ReLU mask of y, bit e%8 of byte e/8
  // for element e in the memory order of g, ceil(N*C*H*W / 8) bytes, padding bits 0.
  uint8_t* mask = nullptr;
};

struct BwdParams {
  Geometry g;
  const void* dy;      // act, read
  const void* y;       // act, read: the saved forward output (ReLU gate); unused with `mask`
  const void* z;       // act, read
  const void* mean;    // stat [C]
  const void* invstd;  // stat [C]
  const void* weight;  // stat [C]: gamma
  void* dz;            // act, written
  void* dweight;       // stat [C], written: invstd * sum g*(z - mean)
  void* dbias;         // stat [C], written: sum g
  void* dresidual;     // act, written (= g); nullptr when the unit has no residual
  bool relu;
  bool training;       // batch statistics: dz carries the mean/variance terms
  // When not nullptr (then relu is true): the ReLU gate comes from this packed mask of
  // bn_act_fwd_mask (FwdParams::mask's layout) instead of from y.
  const uint8_t* mask = nullptr;
};

// The BatchNorm part of a unit's training forward in one kernel: batch statistics of z, the
// per-channel coefficients, and y = act(z*scale + shift + residual). NCHW walks channel by
// channel, so a channel's z is read from memory once for its statistics and again from L2 for y
// whenever N*H*W elements fit there (every ResNet unit at batch 8); NHWC needs every row's
// statistics before the first y, so it runs the statistics and the apply as two sweeps.
struct TrainFwdParams {
  Geometry g;
  const void* z;         // act, read
  const void* residual;  // act, read; nullptr when the unit has no residual
  const void* gamma;     // stat [C]; nullptr: 1 (affine=False)
  const void* beta;      // stat [C]; nullptr: 0
  double eps;            // > 0
  bool relu;
  void* y;               // act, written
  void* mean;            // stat [C], written: batch mean
  void* var;             // stat [C], written: biased batch variance
  void* invstd;          // stat [C], written: 1 / sqrt(var + eps)
};

// The max pool of inference (cpu/pool_kernels.h): x [N, H, W, C] dense -> y [N, Ho, Wo, C] dense,
// every window holding at least one input element (ATen's padding and ceil_mode rules).
struct MaxPoolParams {
  int64_t N, C, H, W, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  const void* x;  // act, read
  void* y;        // act, written
};

// The Winograd F(2x2, 3x3) transforms (csrc/cpu/winograd_conv.h), float32: x and y dense NHWC
// [n, h, w, channels]; v and m [tiles][16][channels]. With dilation (dh, dw) the map splits into
// dh * dw phases, the pixels (a + dh * i, b + dw * j), each a plain 3x3 convolution of its own
// pixels: tiles = n * dh * dw * th * tw in (image, phase row a, phase column b, tile row, tile
// column) order, th = ceil(ceil(h / dh) / 2), tw = ceil(ceil(w / dw) / 2) per phase; a tile's
// output rows are a + dh * (2 * ty + {0, 1}) (winograd_tiles in winograd_conv.h).
struct WinogradInputParams {
  int64_t n, h, w, dh, dw, th, tw, channels;
  const float* x;  // read
  float* v;        // written: B^T d B of each tile's 4x4 patch d (zeros outside the map)
};
struct WinogradOutputParams {
  int64_t n, h, w, dh, dw, th, tw, channels;
  const float* m;         // read: the products
  const float* bias;      // [channels], read; nullptr for none
  const float* residual;  // like y, read; nullptr for none (may be y itself)
  float* y;               // written: act(A^T m A + bias + residual), act ReLU when relu
  bool relu;
};

struct KernelTable {
  const char* name;
  void (*bn_stats)(const StatsParams&, c10::ScalarType act_dtype);
  void (*bn_act_fwd)(const FwdParams&, c10::ScalarType act_dtype);
  void (*bn_act_bwd)(const BwdParams&, c10::ScalarType act_dtype);
  void (*bn_train_fwd)(const TrainFwdParams&, c10::ScalarType act_dtype);
  void (*max_pool)(const MaxPoolParams&, c10::ScalarType act_dtype);
  void (*winograd_input)(const WinogradInputParams&);
  void (*winograd_output)(const WinogradOutputParams&);
};

// Defined by the per-capability translation units; the AVX2 and AVX512 ones return nullptr where
// they could not be compiled (not x86-64 / not GCC-compatible).
const KernelTable* kernel_table_default();
const KernelTable* kernel_table_avx2();
const KernelTable* kernel_table_avx512();

// The build in use: ATen's instruction set, capped by FUSEDRES_CPU_KERNELS (bn_act_cpu.cpp).
const KernelTable& active_kernels();

}  // namespace cpu
}  // namespace fusedres

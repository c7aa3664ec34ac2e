// The unit-level ops (docs/design.md section 4): one op per phase of a unit
// y = act(bn(conv(x)) + residual), the same contract on every device.
//
//   unit_train     convolution, batch statistics, the running-statistics update (in place),
//                  BN-apply + residual + ReLU                      -> (y, z, mean, invstd)
//   unit_eval      convolution and the apply with scale/shift from the running statistics -> y
//   unit_backward  BN backward (ReLU mask, dgamma/dbeta, dz, dresidual) and the convolution's
//                  dgrad and wgrad                                  -> (dx, dw, dgamma, dbeta, dres)
//
// The composites here are device-generic: a DeviceOps table supplies the BatchNorm part of each
// phase (csrc/cpu kernels on CPU tensors, csrc/cuda kernels on CUDA tensors) and ATen runs the
// convolutions, except where the table's own convolution applies (the CPU's GEMM path).
// Autograd is registered on the ops themselves (unit_ops.cpp), so a unit costs one dispatcher
// call forward and one backward, with no Python in between.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

namespace fusedres {
namespace unit {

using OptTensor = c10::optional<at::Tensor>;

// The convolution of a unit (every array a pair, as in nn.Conv2d).
struct ConvGeometry {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

// The BatchNorm of a unit. Per-channel tensors may be undefined: gamma/beta without affine,
// running_mean/running_var/num_batches_tracked without tracked statistics (training only).
struct BnState {
  OptTensor gamma, beta;
  OptTensor running_mean, running_var, num_batches_tracked;
  c10::optional<double> momentum;  // nullopt: cumulative moving average (nn's momentum=None)
  double eps;
};

// The BatchNorm part of each phase on one device. Arguments have been checked.
struct DeviceOps {
  // Batch statistics of z, the running-statistics update in place (no host synchronisation),
  // y = act(z*scale + shift + residual). Returns (y like z, mean [C], invstd [C]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*train_bn)(const at::Tensor& z,
                                                             const BnState& bn,
                                                             const OptTensor& residual, bool relu);
  // y = act(z*scale + shift + residual), scale/shift from the running statistics.
  at::Tensor (*eval_bn)(const at::Tensor& z, const BnState& bn, const OptTensor& residual,
                        bool relu);
  // fusedres::bn_act_bwd's contract: (dz, dweight, dbias, dresidual or [0]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*bn_backward)(
      const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mean,
      const at::Tensor& invstd, const at::Tensor& weight, bool relu, bool has_residual,
      bool training);
  // The device type whose tensors these kernels take (a redispatched call with others fails
  // before any kernel runs).
  c10::DeviceType device_type;
  const char* device_name;
  // CUDA convolves in channels_last (cuDNN's tensor-core kernels and the NHWC BN kernels both
  // want it) and hands y back in the caller's layout; the CPU follows the caller's layout.
  bool channels_last_conv;
  // A convolution of the device's own for the geometries where conv_applies says it beats
  // ATen's (the CPU's GEMM path, csrc/cpu/gemm_conv.h); nullptr: ATen's convolution always.
  // conv_backward returns (dx, dweight), each undefined where not asked for.
  bool (*conv_applies)(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
  at::Tensor (*conv_forward)(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);
  std::tuple<at::Tensor, at::Tensor> (*conv_backward)(
      const at::Tensor& dz, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, bool need_dx, bool need_dweight);
  // Whether ATen's convolution of this dtype runs in float32, the results rounded back once
  // (the CPU's reduced-precision convolutions without oneDNN kernels, csrc/cpu/conv_precision.h);
  // nullptr: in the dtype itself always.
  bool (*conv_in_float32)(at::ScalarType dtype);
};

// Checks every argument of a unit op before anything runs or mutates, with messages naming the
// argument; returns the convolution's output size [N, Cout, Ho, Wo].
std::array<int64_t, 4> check_unit_args(const char* op, const at::Tensor& x,
                                       const at::Tensor& weight, const BnState& bn,
                                       const OptTensor& residual, const ConvGeometry& geo,
                                       bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward(
    const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight, const BnState& bn,
    const OptTensor& residual, const ConvGeometry& geo, bool relu);

at::Tensor eval_forward(const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight,
                        const BnState& bn, const OptTensor& residual, const ConvGeometry& geo,
                        bool relu);

// output_mask: (dx, dweight, dgamma, dbeta, dresidual). Outputs not asked for come back as [0]
// tensors. z may be undefined unless training; the eval backward recomputes it when dgamma is
// wanted, and without dgamma needs none.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const DeviceOps& dev, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& y, const OptTensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const OptTensor& gamma, const ConvGeometry& geo, bool relu, bool training,
    std::array<bool, 5> output_mask);

// fusedres::block_backward: the backward of the block-level op (fusedres/ops/block.py, whose
// Python loop over the unit ops this is, for the backends whose unit ops are these) in one call,
// so that a block's backward costs one dispatcher call instead of a Python loop of ~10 per block.
// weights, gammas, betas, zs, means and invstds hold the main chain's units in order, then the
// downsample unit's where downsample; zs[0] may be absent (recompute="conv1": convolved again
// from x); geometry has 7 values per unit (stride, padding, dilation pairs, groups); needs is
// (x, then weight, gamma, beta per unit). Returns dx (a [0] placeholder unless needs[0]) and
// (dweight, dgamma, dbeta) per unit, each in its tensor's dtype or a [0] placeholder.
std::tuple<at::Tensor, std::vector<at::Tensor>> block_backward(
    const DeviceOps& dev, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
    at::TensorList weights, const c10::List<OptTensor>& gammas,
    const c10::List<OptTensor>& betas, const c10::List<OptTensor>& zs, at::TensorList means,
    at::TensorList invstds, at::IntArrayRef geometry, const c10::List<bool>& relus,
    bool downsample, const c10::List<bool>& needs);

// The Autograd kernels of fusedres::unit_train and fusedres::unit_eval (unit_ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_train_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& gamma, const OptTensor& beta,
    const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, c10::optional<double> momentum,
    double eps);

at::Tensor unit_eval_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const OptTensor& gamma, const OptTensor& beta,
                              const OptTensor& residual, const at::Tensor& running_mean,
                              const at::Tensor& running_var, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool relu, double eps);

// A [0] placeholder for an output a call did not compute (ops may not return undefined tensors
// to Python).
inline at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Marks an in-place write that a kernel made through a raw pointer, as an ATen in-place op would:
// autograd's saved-tensor checks and fusedres's folded-weight cache read the version counter.
void bump_version(const at::Tensor& t);

}  // namespace unit
}  // namespace fusedres

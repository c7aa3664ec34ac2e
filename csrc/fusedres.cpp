// The one binding file of fusedres._C (docs/design.md section 4): the torch.library schemas of the
// BatchNorm unit ops, their CPU implementations, the CUDA implementations (when built) and two
// plain Python functions describing the build.
//
// Unit-level ops, one per phase of a unit y = act(bn(conv(x)) + residual) (unit_ops.h; autograd
// registered on the ops, so a unit is one dispatcher call forward and one backward):
//   unit_train(x, weight, gamma?, beta?, residual?, running_mean!?, running_var!?,
//              num_batches_tracked!?, stride, padding, dilation, groups, relu, momentum?, eps)
//       -> (y, z, mean, invstd)           running statistics updated in place, as nn.BatchNorm2d
//   unit_eval(x, weight, gamma?, beta?, residual?, running_mean, running_var, stride, padding,
//             dilation, groups, relu, eps) -> y
//   unit_backward(dy, x, weight, y?, z?, mean, invstd, gamma?, stride, padding, dilation, groups,
//                 relu, training, output_mask[5]) -> (dx, dweight, dgamma, dbeta, dresidual)
// The block-level op's backward (fusedres/ops/block.py) over those ops, one call per block:
//   block_backward(dy, x, y, weights[], gammas?[], betas?[], zs?[], means[], invstds[],
//                  geometry[7 per unit], relus[], downsample, needs[1 + 3 per unit])
//       -> (dx, grads[3 per unit])        unit_ops.h has the arguments
// BatchNorm primitives (fusedres.reference holds the exact math; fusedres/ops/library.py the fake
// kernels of every op):
//   bn_stats(z) -> (mean, var)                per-channel mean and biased variance over N, H, W
//   bn_act_fwd(z, scale, shift, residual?, relu) -> y = act(z*scale + shift + residual)
//   bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training)
//       -> (dz, dweight, dbias, dresidual)    dresidual is empty (shape [0]) without a residual
//   bn_act_fwd_mask(z, scale, shift, residual?) -> (y, mask)
//       y = relu(z*scale + shift + residual) and its packed ReLU mask: uint8 [ceil(numel / 8)],
//       bit k (least significant first) of byte j set when element 8j + k of y, in y's memory
//       order, passes the gradient (not y <= 0, threshold_backward's rule); padding bits 0
//   bn_act_bwd_mask(dy, mask, z, mean, invstd, weight, has_residual, training)
//       -> bn_act_bwd(dy, y, z, ..., relu=true, ...) with the gate read from the mask instead of y
//   max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode) -> y
//       aten::max_pool2d's values without its indices (CPU only, y channels_last): the stem's max
//       pool in inference (fusedres/models/resnet.py); no autograd
// When the mask pays: the backward reads 1/8 byte per element for the gate instead of y's 2-4
// bytes. It saves no memory in a ResNet unit, whose y is saved anyway as the next convolution's
// input (fusedres/ops/unit.py keeps y); only where nothing else keeps y alive.
// Per-channel vectors are in the statistics dtype (float64 for float64 activations, else float32);
// activation outputs take z's dtype and memory format. Every device's implementation runs the
// argument checks of common/checks.h first.
// Per-operator ATen headers, torch.library and pybind's tensor casters instead of
// <torch/extension.h>, which parses the whole C++ frontend: this file compiled in 54 s with it,
// 28 s without (g++ 12, one core of an AMD EPYC; every CI leg and user build compiles it).
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/checks.h"
#include "cpu/conv_precision.h"
#include "cpu/gemm_conv.h"
#include "cpu/kernels.h"
#include "cpu/winograd_conv.h"
#include "state_watch.h"
#include "unit_ops.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& z) {
  checks::check_bn_stats_args(z);
  return cpu::bn_stats(z);
}

at::Tensor bn_act_fwd_cpu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          const c10::optional<at::Tensor>& residual, bool relu) {
  checks::check_bn_act_fwd_args(z, scale, shift, residual);
  return cpu::bn_act_fwd(z, scale, shift, residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool relu, bool has_residual,
    bool training) {
  checks::check_bn_act_bwd_args(dy, y, z, mean, invstd, weight);
  return cpu::bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training);
}

std::tuple<at::Tensor, at::Tensor> bn_act_fwd_mask_cpu(const at::Tensor& z, const at::Tensor& scale,
                                                       const at::Tensor& shift,
                                                       const c10::optional<at::Tensor>& residual) {
  checks::check_bn_act_fwd_args(z, scale, shift, residual, "fusedres::bn_act_fwd_mask");
  return cpu::bn_act_fwd_mask(z, scale, shift, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_mask_cpu(
    const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool has_residual, bool training) {
  checks::check_bn_act_bwd_mask_args(dy, mask, z, mean, invstd, weight);
  return cpu::bn_act_bwd_mask(dy, mask, z, mean, invstd, weight, has_residual, training);
}

// ---- the unit ops on CPU tensors ----------------------------------------------------------

// A [C] per-channel tensor of any floating dtype and stride, read into double; `fallback` where
// it is absent (gamma = 1, beta = 0 without affine).
std::vector<double> channel_values(const unit::OptTensor& t, int64_t channels, double fallback) {
  std::vector<double> v(channels, fallback);
  if (!unit::present(t)) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values", [&] {
    const auto a = t->accessor<scalar_t, 1>();
    for (int64_t c = 0; c < channels; ++c) v[c] = static_cast<double>(a[c]);
  });
  return v;
}

// new = (1 - factor) * old + factor * stat, written into `running` in its own dtype.
void blend_into(const at::Tensor& running, const std::vector<double>& stat, double factor) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "blend_into", [&] {
    auto a = running.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < static_cast<int64_t>(stat.size()); ++c) {
      a[c] = static_cast<scalar_t>((1.0 - factor) * static_cast<double>(a[c]) + factor * stat[c]);
    }
  });
  unit::bump_version(running);
}

// nn.BatchNorm2d's update of the tracked statistics from a batch's mean and biased variance.
void update_running_stats_cpu(const at::Tensor& mean, const at::Tensor& var, int64_t count,
                              const unit::BnState& bn) {
  double factor = bn.momentum.value_or(0.0);
  if (unit::present(bn.num_batches_tracked)) {
    const at::Tensor& n = *bn.num_batches_tracked;
    int64_t* tracked = n.data_ptr<int64_t>();
    *tracked += 1;
    unit::bump_version(n);
    if (!bn.momentum.has_value()) factor = 1.0 / static_cast<double>(*tracked);
  }
  if (!unit::present(bn.running_mean)) return;
  const int64_t channels = mean.size(0);
  std::vector<double> m = channel_values(mean, channels, 0.0);
  std::vector<double> v = channel_values(var, channels, 0.0);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (double& x : v) x *= unbias;
  blend_into(*bn.running_mean, m, factor);
  blend_into(*bn.running_var, v, factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_bn_cpu(const at::Tensor& z,
                                                            const unit::BnState& bn,
                                                            const unit::OptTensor& residual,
                                                            bool relu) {
  const auto sdt = checks::stats_dtype(z.scalar_type());
  const unit::OptTensor gamma = unit::present(bn.gamma) ? unit::OptTensor(bn.gamma->to(sdt)) : c10::nullopt;
  const unit::OptTensor beta = unit::present(bn.beta) ? unit::OptTensor(bn.beta->to(sdt)) : c10::nullopt;
  auto [y, mean, var, invstd] = cpu::bn_train_fwd(z, gamma, beta, residual, relu, bn.eps);
  update_running_stats_cpu(mean, var, z.numel() / z.size(1), bn);
  return {y, mean, invstd};
}

// scale = gamma / sqrt(running_var + eps), shift = beta - running_mean*scale, [C] in sdt.
std::tuple<at::Tensor, at::Tensor> eval_coefficients_cpu(const unit::BnState& bn, int64_t channels,
                                                         const at::TensorOptions& options) {
  const std::vector<double> gamma = channel_values(bn.gamma, channels, 1.0);
  const std::vector<double> beta = channel_values(bn.beta, channels, 0.0);
  const std::vector<double> mean = channel_values(bn.running_mean, channels, 0.0);
  const std::vector<double> var = channel_values(bn.running_var, channels, 1.0);
  at::Tensor scale = at::empty({channels}, options), shift = at::empty({channels}, options);
  AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "eval_coefficients", [&] {
    scalar_t* s = scale.data_ptr<scalar_t>();
    scalar_t* t = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      const double k = gamma[c] / std::sqrt(var[c] + bn.eps);
      s[c] = static_cast<scalar_t>(k);
      t[c] = static_cast<scalar_t>(beta[c] - mean[c] * k);
    }
  });
  return {scale, shift};
}

at::Tensor eval_bn_cpu(const at::Tensor& z, const unit::BnState& bn,
                       const unit::OptTensor& residual, bool relu) {
  auto [scale, shift] = eval_coefficients_cpu(
      bn, z.size(1), z.options().dtype(checks::stats_dtype(z.scalar_type())));
  return cpu::bn_act_fwd(z, scale, shift, residual, relu);
}

const unit::DeviceOps kCpuUnitOps{&train_bn_cpu, &eval_bn_cpu, &cpu::bn_act_bwd,
                                  c10::DeviceType::CPU, "CPU", /*channels_last_conv=*/false,
                                  &cpu::gemm_conv_applies, &cpu::gemm_conv_forward,
                                  &cpu::gemm_conv_backward, &cpu::conv_in_float32};

unit::ConvGeometry geometry(at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  return {stride, padding, dilation, groups};
}

// The device-specific entry points of the three ops, one set per DeviceOps table.
template <const unit::DeviceOps& Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_train_impl(
    const at::Tensor& x, const at::Tensor& weight, const unit::OptTensor& gamma,
    const unit::OptTensor& beta, const unit::OptTensor& residual,
    const unit::OptTensor& running_mean, const unit::OptTensor& running_var,
    const unit::OptTensor& num_batches_tracked, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, c10::optional<double> momentum,
    double eps) {
  const unit::BnState bn{gamma, beta, running_mean, running_var, num_batches_tracked, momentum, eps};
  return unit::train_forward(Dev, x, weight, bn, residual, geometry(stride, padding, dilation, groups),
                             relu);
}

template <const unit::DeviceOps& Dev>
at::Tensor unit_eval_impl(const at::Tensor& x, const at::Tensor& weight,
                          const unit::OptTensor& gamma, const unit::OptTensor& beta,
                          const unit::OptTensor& residual, const at::Tensor& running_mean,
                          const at::Tensor& running_var, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, double eps) {
  const unit::BnState bn{gamma, beta, running_mean, running_var, c10::nullopt, c10::nullopt, eps};
  return unit::eval_forward(Dev, x, weight, bn, residual, geometry(stride, padding, dilation, groups),
                            relu);
}

template <const unit::DeviceOps& Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_backward_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const unit::OptTensor& y, const unit::OptTensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const unit::OptTensor& gamma, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu, bool training,
    std::array<bool, 5> output_mask) {
  return unit::backward(Dev, dy, x, weight, y, z, mean, invstd, gamma,
                        geometry(stride, padding, dilation, groups), relu, training, output_mask);
}

template <const unit::DeviceOps& Dev>
std::tuple<at::Tensor, std::vector<at::Tensor>> block_backward_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
    const c10::List<unit::OptTensor>& gammas, const c10::List<unit::OptTensor>& betas,
    const c10::List<unit::OptTensor>& zs, at::TensorList means, at::TensorList invstds,
    at::IntArrayRef geometry, const c10::List<bool>& relus, bool downsample,
    const c10::List<bool>& needs) {
  return unit::block_backward(Dev, dy, x, y, weights, gammas, betas, zs, means, invstds, geometry,
                              relus, downsample, needs);
}

bool cuda_kernels_built() {
#ifdef FUSEDRES_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Compiler, OpenMP and vectorisation details, for `python -m fusedres.info` and bug reports.
std::string build_info() {
  std::ostringstream s;
#if defined(__clang__)
  s << "compiler: clang " << __clang_version__;
#elif defined(__GNUC__)
  s << "compiler: gcc " << __VERSION__;
#else
  s << "compiler: unknown";
#endif
#ifdef _OPENMP
  s << "; openmp: " << _OPENMP;
#else
  s << "; openmp: no";
#endif
  s << "; at::parallel_for backend: " << (AT_PARALLEL_OPENMP ? "OpenMP" : "native") << ", "
    << at::get_num_threads() << " threads";
  s << "; cpu kernels compiled: " << cpu::compiled_variants()
    << "; cpu kernels in use: " << cpu::kernel_variant()
    << " (ATen CPU capability " << at::get_cpu_capability() << ")";
  s << "; cuda kernels: " << (cuda_kernels_built() ? "yes" : "no");
  return s.str();
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY(fusedres, m) {
  m.def(
      "unit_train(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, float? momentum, "
      "float eps) -> (Tensor y, Tensor z, Tensor mean, Tensor invstd)");
  m.def(
      "unit_eval(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, "
      "Tensor running_mean, Tensor running_var, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool relu, float eps) -> Tensor y");
  m.def(
      "unit_backward(Tensor dy, Tensor x, Tensor weight, Tensor? y, Tensor? z, Tensor mean, "
      "Tensor invstd, Tensor? gamma, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool relu, bool training, bool[5] output_mask) "
      "-> (Tensor dx, Tensor dweight, Tensor dgamma, Tensor dbeta, Tensor dresidual)");
  m.def(
      "block_backward(Tensor dy, Tensor x, Tensor y, Tensor[] weights, Tensor?[] gammas, "
      "Tensor?[] betas, Tensor?[] zs, Tensor[] means, Tensor[] invstds, int[] geometry, "
      "bool[] relus, bool downsample, bool[] needs) -> (Tensor dx, Tensor[] grads)");
  m.def("bn_stats(Tensor z) -> (Tensor mean, Tensor var)");
  m.def("bn_act_fwd(Tensor z, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  m.def(
      "bn_act_bwd(Tensor dy, Tensor y, Tensor z, Tensor mean, Tensor invstd, Tensor weight, "
      "bool relu, bool has_residual, bool training) "
      "-> (Tensor dz, Tensor dweight, Tensor dbias, Tensor dresidual)");
  m.def(
      "bn_act_fwd_mask(Tensor z, Tensor scale, Tensor shift, Tensor? residual) "
      "-> (Tensor y, Tensor mask)");
  m.def(
      "bn_act_bwd_mask(Tensor dy, Tensor mask, Tensor z, Tensor mean, Tensor invstd, "
      "Tensor weight, bool has_residual, bool training) "
      "-> (Tensor dz, Tensor dweight, Tensor dbias, Tensor dresidual)");
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("unit_train", &fusedres::unit_train_impl<fusedres::kCpuUnitOps>);
  m.impl("unit_eval", &fusedres::unit_eval_impl<fusedres::kCpuUnitOps>);
  m.impl("unit_backward", &fusedres::unit_backward_impl<fusedres::kCpuUnitOps>);
  m.impl("block_backward", &fusedres::block_backward_impl<fusedres::kCpuUnitOps>);
  m.impl("bn_stats", &fusedres::bn_stats_cpu);
  m.impl("bn_act_fwd", &fusedres::bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &fusedres::bn_act_bwd_cpu);
  m.impl("bn_act_fwd_mask", &fusedres::bn_act_fwd_mask_cpu);
  m.impl("bn_act_bwd_mask", &fusedres::bn_act_bwd_mask_cpu);
  m.impl("max_pool2d", &fusedres::cpu::max_pool2d);
}

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) {
  m.impl("unit_train", &fusedres::unit::unit_train_autograd);
  m.impl("unit_eval", &fusedres::unit::unit_eval_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedres C++ extension: registers the torch.ops.fusedres.* kernels";
  m.def("cuda_kernels_built", &fusedres::cuda_kernels_built,
        "Whether the CUDA kernels (csrc/cuda) were compiled into this extension.");
  m.def("build_info", &fusedres::build_info,
        "Compiler, OpenMP and CPU vectorisation details of this build.");
#ifdef _GLIBCXX_USE_CXX11_ABI
  // An int, not a string: fusedres/_ext.py compares it with torch's before anything passes a
  // std::string between this library and libtorch.
  m.attr("glibcxx_use_cxx11_abi") = static_cast<int>(_GLIBCXX_USE_CXX11_ABI);
#endif
  m.def("set_cpu_gemm_conv", &fusedres::cpu::set_gemm_conv_enabled, pybind11::arg("enabled"),
        "Whether the cpu backend's unit ops may run convolutions as one GEMM (csrc/cpu/gemm_conv.h); "
        "on unless FUSEDRES_CPU_GEMM_CONV=0 at load.");
  m.def("cpu_gemm_conv", &fusedres::cpu::gemm_conv_enabled,
        "Whether the cpu backend's GEMM convolution path is on.");
  m.def("set_cpu_gemm_conv_float32_amx_rule", &fusedres::cpu::set_gemm_conv_float32_amx_rule,
        pybind11::arg("amx_rule"),
        "Whether float32 convolutions take the GEMM path by the rule measured with AMX (true) or "
        "by the narrower one measured without (false; csrc/cpu/gemm_conv.h); set at load.");
  m.def("cpu_gemm_conv_float32_amx_rule", &fusedres::cpu::gemm_conv_float32_amx_rule,
        "Which float32 rule the cpu backend's GEMM path follows (true: the AMX one).");
  m.def("set_cpu_gemm_conv_bfloat16", &fusedres::cpu::set_gemm_conv_bfloat16,
        pybind11::arg("enabled"),
        "Whether bfloat16 convolutions may take the GEMM path: where oneDNN runs bfloat16 "
        "(csrc/cpu/gemm_conv.h); set at load.");
  m.def("cpu_gemm_conv_bfloat16", &fusedres::cpu::gemm_conv_bfloat16,
        "Whether bfloat16 convolutions may take the cpu backend's GEMM path.");
  m.def("set_cpu_conv_in_float32", &fusedres::cpu::set_conv_in_float32,
        pybind11::arg("bfloat16"), pybind11::arg("float16"),
        "Whether the cpu backend's unit ops convolve bfloat16 / float16 in float32, each result "
        "rounded once (csrc/cpu/conv_precision.h); set at load: where oneDNN runs no such kernels.");
  m.def("cpu_conv_in_float32",
        [](bool bfloat16) {
          return fusedres::cpu::conv_in_float32(bfloat16 ? at::kBFloat16 : at::kHalf);
        },
        pybind11::arg("bfloat16"),
        "Whether the cpu backend convolves bfloat16 (true) or float16 (false) in float32.");
  m.def("cpu_gemm_conv_applies", &fusedres::cpu::gemm_conv_applies, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"), pybind11::arg("groups"),
        "Whether a cpu unit op convolves x with weight through the GEMM path.");
  m.def("cpu_gemm_conv_forward", &fusedres::cpu::gemm_conv_forward, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"),
        "The GEMM path's convolution (channels_last z) where cpu_gemm_conv_applies says it "
        "applies: what a cpu unit op computes.");
  m.def("cpu_im2col_rows", &fusedres::cpu::im2col_rows, pybind11::arg("x"),
        pybind11::arg("kernel_size"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"),
        "[N*Ho*Wo, kh*kw*C] columns of a channels_last x, (tap, channel) order (csrc/cpu/gemm_conv.h).");
  m.def("set_cpu_winograd", &fusedres::cpu::set_winograd_enabled, pybind11::arg("enabled"),
        "Whether the cpu backend's float32 3x3s may run as Winograd F(2x2, 3x3) "
        "in inference (csrc/cpu/winograd_conv.h); on unless FUSEDRES_CPU_WINOGRAD=0 at load. "
        "Read when an inference plan is built.");
  m.def("cpu_winograd", &fusedres::cpu::winograd_enabled,
        "Whether the cpu backend's Winograd convolutions are on.");
  m.def("cpu_winograd_applies", &fusedres::cpu::winograd_applies, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"), pybind11::arg("groups"),
        "Whether the cpu backend convolves x with weight as Winograd F(2x2, 3x3).");
  m.def("cpu_winograd_weight", &fusedres::cpu::winograd_weight, pybind11::arg("weight"),
        "[16*Cout, Cin, 1, 1] Winograd F(2x2, 3x3) transform of a float32 [Cout, Cin, 3, 3] "
        "weight, a 16-group 1x1 convolution's weight (csrc/cpu/winograd_conv.h).");
  // Dilation defaults to none, (1, 1): a std::vector argument, which pybind11 can default.
  using Pair = std::vector<int64_t>;
  m.def(
      "cpu_winograd_input",
      [](const at::Tensor& x, const Pair& dilation) {
        return fusedres::cpu::winograd_input(x, dilation);
      },
      pybind11::arg("x"), pybind11::arg("dilation") = Pair{1, 1},
      "[1, 16*C, T, 1] channels_last Winograd F(2x2, 3x3) input transform of float32 x for a "
      "3x3 with this dilation (and padding).");
  m.def(
      "cpu_winograd_output",
      [](const at::Tensor& m, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
         bool relu, const at::Tensor& out, const Pair& dilation) {
        fusedres::cpu::winograd_output(m, bias, residual, relu, out, dilation);
      },
      pybind11::arg("m"), pybind11::arg("bias"), pybind11::arg("residual"),
      pybind11::arg("relu"), pybind11::arg("out"), pybind11::arg("dilation") = Pair{1, 1},
      "Writes act(output transform of the products m + bias (+ residual)) into out "
      "[N, Cout, H, W], dense channels_last float32.");
  m.attr("CPU_WINOGRAD_CHUNK_BYTES") = fusedres::cpu::kWinogradChunkBytes;
  m.attr("CPU_WINOGRAD_MIN_DILATED_GAIN") = fusedres::cpu::kWinogradMinDilatedGain;
  m.def(
      "cpu_winograd_image_bytes",
      [](int64_t h, int64_t w, int64_t channels, const Pair& dilation) {
        return fusedres::cpu::winograd_image_bytes(h, w, channels, dilation);
      },
      pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("channels"),
      pybind11::arg("dilation") = Pair{1, 1},
      "Bytes of one image's Winograd transform of an h x w map with this many channels.");
  m.def(
      "cpu_winograd_image_tiles",
      [](int64_t h, int64_t w, const Pair& dilation) {
        return fusedres::cpu::winograd_image_tiles(h, w, dilation);
      },
      pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("dilation") = Pair{1, 1},
      "Winograd tiles (2x2 output blocks, each phase of a dilated map tiled apart) of one h x w "
      "image.");
  m.def(
      "cpu_winograd_dilated_gain",
      [](int64_t h, int64_t w, const Pair& dilation) {
        return fusedres::cpu::winograd_dilated_gain(h, w, dilation);
      },
      pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("dilation"),
      "The direct convolution's multiplies over Winograd's for a 3x3 at this dilation on an "
      "h x w map (csrc/cpu/winograd_conv.h).");
  fusedres::register_state_watch(m);
}

// ============================================================================================
// CUDA implementations (owned by the csrc/cuda engineer): add below, under
// `#ifdef FUSEDRES_WITH_CUDA`, a TORCH_LIBRARY_IMPL(fusedres, CUDA, m) block whose functions call
// fusedres::checks::check_bn_stats_args / check_bn_act_fwd_args / check_bn_act_bwd_args (and
// checks::stats_dtype, checks::unit_memory_format) before launching the csrc/cuda kernels.
// ============================================================================================

#ifdef FUSEDRES_WITH_CUDA
// Only CPU torch headers plus the CUDA runtime API: the kernels (csrc/cuda) take raw pointers, the
// device guard and the current stream come through c10's device-generic interfaces, so this
// section builds and links against a CPU-only torch as well (FUSEDRES_FORCE_CUDA=1 in CI).
//
// Layout: the kernels walk channels_last (NHWC) buffers as a [N*H*W, C] matrix. Inputs in another
// layout are copied to channels_last here, and outputs are returned in the memory format of
// checks::unit_memory_format(z). The cuda backend convolves in channels_last, so z arrives here
// without a copy; only NCHW dy and residual tensors are transposed.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <limits>

#include "common/cuda_launch.h"
#include "cuda/bn_kernels.h"

namespace fusedres {
namespace {

cuda::ScalarKind cuda_scalar_kind(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ScalarKind::kFloat32;
    case at::kHalf: return cuda::ScalarKind::kFloat16;
    case at::kBFloat16: return cuda::ScalarKind::kBFloat16;
    case at::kDouble: return cuda::ScalarKind::kFloat64;
    default: TORCH_CHECK(false, "fusedres: no CUDA kernels for dtype ", t);
  }
}

// Device and stream state of one CUDA op call: sets the current device to z's for the call's
// lifetime (allocations land there) and reads torch's current stream on it.
struct CudaCall {
  c10::DeviceGuard guard;
  cudaStream_t stream;
  int num_sms;

  CudaCall(const at::Tensor& z, const char* op)
      : guard(z.device()),
        stream(static_cast<cudaStream_t>(
            c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(z.device()).native_handle())),
        num_sms(0) {
    const cudaError_t err =
        cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, z.device().index());
    TORCH_CHECK(err == cudaSuccess, op, ": cannot query the multiprocessor count of ", z.device(),
                ": ", cudaGetErrorString(err));
  }
};

void check_cuda_input(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.is_cuda(), op, ": the CUDA implementation got z on ", z.device());
}

// An uninitialised NHWC tensor shaped like z.
at::Tensor empty_nhwc(const at::Tensor& z) {
  return at::empty(z.sizes(), z.options().memory_format(c10::MemoryFormat::ChannelsLast));
}

// `t` (NHWC) in the memory format the op promises for z.
at::Tensor to_output_format(const at::Tensor& t, c10::MemoryFormat fmt) {
  return fmt == c10::MemoryFormat::ChannelsLast ? t : t.contiguous(fmt);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& z) {
  constexpr const char* op = "fusedres::bn_stats";
  checks::check_bn_stats_args(z);
  check_cuda_input(z, op);
  const auto sdt = checks::stats_dtype(z.scalar_type());
  const int64_t C = z.size(1);
  if (z.numel() == 0) {
    // torch.var_mean over no elements: NaN for both (the CPU implementation's rule).
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({C}, nan, z.options().dtype(sdt)), at::full({C}, nan, z.options().dtype(sdt))};
  }
  CudaCall call(z, op);
  const at::Tensor zc = z.contiguous(c10::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({C}, z.options().dtype(sdt));
  at::Tensor var = at::empty({C}, z.options().dtype(sdt));
  cuda::StatsParams p;
  p.z = zc.const_data_ptr();
  p.mean = mean.mutable_data_ptr();
  p.var = var.mutable_data_ptr();
  p.rows = z.numel() / C;
  p.channels = C;
  p.num_sms = call.num_sms;
  p.kind = cuda_scalar_kind(z.scalar_type());
  const at::Tensor ws = workspace(cuda::bn_stats_workspace_bytes(p), z);
  p.workspace = ws.mutable_data_ptr();
  check_launch(cuda::bn_stats(p, call.stream), op);
  return {mean, var};
}

at::Tensor bn_act_fwd_cuda(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                           const c10::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "fusedres::bn_act_fwd";
  checks::check_bn_act_fwd_args(z, scale, shift, residual);
  check_cuda_input(z, op);
  const auto fmt = checks::unit_memory_format(z);
  at::Tensor y = empty_nhwc(z);
  if (z.numel() == 0) return to_output_format(y, fmt);
  CudaCall call(z, op);
  const at::Tensor zc = z.contiguous(c10::MemoryFormat::ChannelsLast);
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor res = has_res ? residual->contiguous(c10::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  cuda::FwdParams p;
  p.z = zc.const_data_ptr();
  p.residual = has_res ? res.const_data_ptr() : nullptr;
  p.scale = sc.const_data_ptr();
  p.shift = sh.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.rows = z.numel() / z.size(1);
  p.channels = z.size(1);
  p.num_sms = call.num_sms;
  p.kind = cuda_scalar_kind(z.scalar_type());
  p.relu = relu;
  check_launch(cuda::bn_act_fwd(p, call.stream), op);
  return to_output_format(y, fmt);
}

// bn_act_bwd on checked arguments, the ReLU gate from y or (NHWC only, y undefined) from the mask.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda_gated(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, bool relu,
    bool has_residual, bool training, const char* op) {
  const auto fmt = checks::unit_memory_format(z);
  const int64_t C = z.size(1);
  const auto sdt = checks::stats_dtype(z.scalar_type());
  at::Tensor dz = empty_nhwc(z);
  at::Tensor dres = has_residual ? empty_nhwc(z) : at::empty({0}, dy.options());
  if (z.numel() == 0) {
    return {to_output_format(dz, fmt), at::zeros({C}, z.options().dtype(sdt)),
            at::zeros({C}, z.options().dtype(sdt)), has_residual ? to_output_format(dres, fmt) : dres};
  }
  CudaCall call(z, op);
  // dy often arrives in another layout than the saved tensors; one conversion here lets every
  // stream share the NHWC index.
  const at::Tensor dyc = dy.contiguous(c10::MemoryFormat::ChannelsLast);
  const at::Tensor yc = y.defined() ? y.contiguous(c10::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor maskc = mask.defined() ? mask.contiguous() : at::Tensor();
  const at::Tensor zc = z.contiguous(c10::MemoryFormat::ChannelsLast);
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous(), w = weight.contiguous();
  at::Tensor dweight = at::empty({C}, z.options().dtype(sdt));
  at::Tensor dbias = at::empty({C}, z.options().dtype(sdt));
  cuda::BwdParams p;
  p.dy = dyc.const_data_ptr();
  p.y = yc.defined() ? yc.const_data_ptr() : nullptr;
  p.mask = maskc.defined() ? maskc.const_data_ptr<uint8_t>() : nullptr;
  p.z = zc.const_data_ptr();
  p.mean = m.const_data_ptr();
  p.invstd = is.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.dz = dz.mutable_data_ptr();
  p.dresidual = has_residual ? dres.mutable_data_ptr() : nullptr;
  p.dweight = dweight.mutable_data_ptr();
  p.dbias = dbias.mutable_data_ptr();
  p.rows = z.numel() / C;
  p.channels = C;
  p.num_sms = call.num_sms;
  p.kind = cuda_scalar_kind(z.scalar_type());
  p.relu = relu;
  p.training = training;
  const at::Tensor ws = workspace(cuda::bn_act_bwd_workspace_bytes(p), z);
  p.workspace = ws.mutable_data_ptr();
  check_launch(cuda::bn_act_bwd(p, call.stream), op);
  return {to_output_format(dz, fmt), dweight, dbias,
          has_residual ? to_output_format(dres, fmt) : dres};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool relu, bool has_residual,
    bool training) {
  constexpr const char* op = "fusedres::bn_act_bwd";
  checks::check_bn_act_bwd_args(dy, y, z, mean, invstd, weight);
  check_cuda_input(z, op);
  return bn_act_bwd_cuda_gated(dy, y, at::Tensor(), z, mean, invstd, weight, relu, has_residual,
                               training, op);
}

std::tuple<at::Tensor, at::Tensor> bn_act_fwd_mask_cuda(const at::Tensor& z, const at::Tensor& scale,
                                                        const at::Tensor& shift,
                                                        const c10::optional<at::Tensor>& residual) {
  constexpr const char* op = "fusedres::bn_act_fwd_mask";
  checks::check_bn_act_fwd_args(z, scale, shift, residual, op);
  check_cuda_input(z, op);
  // The mask's bits follow y's memory order, so NCHW stays NCHW here (the flat mask kernel walks
  // either layout) instead of taking the NHWC round trip of the other ops.
  const auto fmt = checks::unit_memory_format(z);
  at::Tensor y = at::empty(z.sizes(), z.options().memory_format(fmt));
  at::Tensor mask = at::empty({(z.numel() + 7) / 8}, z.options().dtype(at::kByte));
  if (z.numel() == 0) return {y, mask};
  CudaCall call(z, op);
  const at::Tensor zc = z.contiguous(fmt);
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  cuda::FwdMaskParams p;
  p.z = zc.const_data_ptr();
  p.residual = has_res ? res.const_data_ptr() : nullptr;
  p.scale = sc.const_data_ptr();
  p.shift = sh.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.mask = mask.mutable_data_ptr<uint8_t>();
  p.numel = z.numel();
  p.channels = z.size(1);
  p.channel_run = fmt == c10::MemoryFormat::ChannelsLast ? 1 : z.size(2) * z.size(3);
  p.num_sms = call.num_sms;
  p.kind = cuda_scalar_kind(z.scalar_type());
  check_launch(cuda::bn_act_fwd_mask(p, call.stream), op);
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_mask_cuda(
    const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool has_residual, bool training) {
  constexpr const char* op = "fusedres::bn_act_bwd_mask";
  checks::check_bn_act_bwd_mask_args(dy, mask, z, mean, invstd, weight);
  check_cuda_input(z, op);
  if (checks::unit_memory_format(z) == c10::MemoryFormat::ChannelsLast) {
    return bn_act_bwd_cuda_gated(dy, at::Tensor(), mask, z, mean, invstd, weight, true,
                                 has_residual, training, op);
  }
  // NCHW: the bits are in NCHW order while the kernels walk NHWC, so expand them into a 0/1 gate
  // tensor shaped like z and take the y path (NCHW inputs on CUDA pay layout copies anyway).
  const at::Tensor gate = mask.unsqueeze(1)
                              .bitwise_right_shift(at::arange(8, mask.options()))
                              .bitwise_and(1)
                              .reshape({-1})
                              .narrow(0, 0, z.numel())
                              .view(z.sizes())
                              .to(z.scalar_type());
  return bn_act_bwd_cuda_gated(dy, gate, at::Tensor(), z, mean, invstd, weight, true, has_residual,
                               training, op);
}

// ---- the unit ops on CUDA tensors ---------------------------------------------------------

// Launches the coefficient kernel: (invstd, scale, shift) [C] in the statistics dtype, and in
// training the running statistics updated on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_coefficients(const at::Tensor& z,
                                                                 const unit::BnState& bn,
                                                                 const at::Tensor& mean,
                                                                 const at::Tensor& var,
                                                                 bool training) {
  const char* op = training ? "fusedres::unit_train" : "fusedres::unit_eval";
  CudaCall call(z, op);
  const auto sdt = checks::stats_dtype(z.scalar_type());
  const int64_t C = z.size(1);
  const auto opts = z.options().dtype(sdt);
  at::Tensor invstd = at::empty({C}, opts), scale = at::empty({C}, opts), shift = at::empty({C}, opts);
  const at::Tensor gamma = unit::present(bn.gamma) ? bn.gamma->to(sdt).contiguous() : at::Tensor();
  const at::Tensor beta = unit::present(bn.beta) ? bn.beta->to(sdt).contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  // The running statistics are written in place, so they must be dense; nn's buffers always are.
  const bool update = training && unit::present(bn.running_mean);
  if (update) {
    TORCH_CHECK(bn.running_mean->is_contiguous() && bn.running_var->is_contiguous(), op,
                ": running_mean and running_var must be contiguous to be updated in place");
  }
  cuda::CoefParams p;
  p.mean = m.const_data_ptr();
  p.var = v.const_data_ptr();
  p.stat_kind = cuda_scalar_kind(m.scalar_type());
  p.gamma = gamma.defined() ? gamma.const_data_ptr() : nullptr;
  p.beta = beta.defined() ? beta.const_data_ptr() : nullptr;
  p.invstd = invstd.mutable_data_ptr();
  p.scale = scale.mutable_data_ptr();
  p.shift = shift.mutable_data_ptr();
  if (update) {
    p.running_mean = bn.running_mean->mutable_data_ptr();
    p.running_var = bn.running_var->mutable_data_ptr();
    p.running_kind = cuda_scalar_kind(bn.running_mean->scalar_type());
    TORCH_CHECK(bn.running_var->scalar_type() == bn.running_mean->scalar_type(), op,
                ": running_mean and running_var must have one dtype");
  }
  if (training && unit::present(bn.num_batches_tracked)) {
    p.num_batches_tracked = bn.num_batches_tracked->mutable_data_ptr<int64_t>();
  }
  p.momentum = bn.momentum.value_or(0.0);
  p.cumulative = !bn.momentum.has_value();
  p.eps = bn.eps;
  p.count = static_cast<double>(z.numel() / C);
  p.channels = C;
  p.kind = cuda_scalar_kind(z.scalar_type());
  p.training = training;
  check_launch(cuda::bn_coefficients(p, call.stream), op);
  if (update) {
    unit::bump_version(*bn.running_mean);
    unit::bump_version(*bn.running_var);
  }
  if (p.num_batches_tracked != nullptr) unit::bump_version(*bn.num_batches_tracked);
  return {invstd, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_bn_cuda(const at::Tensor& z,
                                                             const unit::BnState& bn,
                                                             const unit::OptTensor& residual,
                                                             bool relu) {
  auto [mean, var] = bn_stats_cuda(z);
  auto [invstd, scale, shift] = cuda_coefficients(z, bn, mean, var, /*training=*/true);
  return {bn_act_fwd_cuda(z, scale, shift, residual, relu), mean, invstd};
}

at::Tensor eval_bn_cuda(const at::Tensor& z, const unit::BnState& bn,
                        const unit::OptTensor& residual, bool relu) {
  auto coefficients =
      cuda_coefficients(z, bn, *bn.running_mean, *bn.running_var, /*training=*/false);
  return bn_act_fwd_cuda(z, std::get<1>(coefficients), std::get<2>(coefficients), residual, relu);
}

const unit::DeviceOps kCudaUnitOps{&train_bn_cuda, &eval_bn_cuda, &bn_act_bwd_cuda,
                                   c10::DeviceType::CUDA, "CUDA", /*channels_last_conv=*/true,
                                   nullptr, nullptr, nullptr, nullptr};

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("unit_train", &fusedres::unit_train_impl<fusedres::kCudaUnitOps>);
  m.impl("unit_eval", &fusedres::unit_eval_impl<fusedres::kCudaUnitOps>);
  m.impl("unit_backward", &fusedres::unit_backward_impl<fusedres::kCudaUnitOps>);
  m.impl("block_backward", &fusedres::block_backward_impl<fusedres::kCudaUnitOps>);
  m.impl("bn_stats", &fusedres::bn_stats_cuda);
  m.impl("bn_act_fwd", &fusedres::bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &fusedres::bn_act_bwd_cuda);
  m.impl("bn_act_fwd_mask", &fusedres::bn_act_fwd_mask_cuda);
  m.impl("bn_act_bwd_mask", &fusedres::bn_act_bwd_mask_cuda);
}
#endif  // FUSEDRES_WITH_CUDA

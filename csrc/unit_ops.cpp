// Device-generic composites of the unit ops and their autograd (see unit_ops.h).
#include "unit_ops.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"

namespace fusedres {
namespace unit {

void bump_version(const at::Tensor& t) {
  // Inference tensors carry no version counter; nothing can have saved them for backward.
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

namespace {

void check_vector(const char* op, const char* name, const OptTensor& t, const at::Tensor& x,
                  int64_t channels) {
  if (!present(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": ", name,
              " must be a [C] vector with C = ", channels, " (the convolution's out_channels), got shape ",
              t->sizes());
  TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
              " but the input is on ", x.device());
}

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 values (height, width), got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " must be >= ", min, ", got ", v);
}

void check_device(const DeviceOps& dev, const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().type() == dev.device_type, op, ": the ", dev.device_name,
              " implementation got ", name, " on ", t.device());
}

at::Tensor conv_input(const DeviceOps& dev, const at::Tensor& x) {
  // float64 has no NHWC cuDNN kernels: the CUDA BN kernels then copy z instead.
  if (dev.channels_last_conv && x.scalar_type() != at::kDouble) {
    return x.contiguous(c10::MemoryFormat::ChannelsLast);
  }
  return x;
}

bool device_conv_applies(const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight,
                         const ConvGeometry& geo) {
  return dev.conv_applies != nullptr &&
         dev.conv_applies(x, weight, geo.stride, geo.padding, geo.dilation, geo.groups);
}

bool widens(const DeviceOps& dev, const at::Tensor& x) {
  return dev.conv_in_float32 != nullptr && dev.conv_in_float32(x.scalar_type());
}

at::Tensor convolution(const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight,
                       const ConvGeometry& geo) {
  if (widens(dev, x)) {  // the float32 convolution of the same values, by float32's rules
    return convolution(dev, x.to(at::kFloat), weight.to(at::kFloat), geo).to(x.scalar_type());
  }
  if (device_conv_applies(dev, x, weight, geo)) {
    return dev.conv_forward(x, weight, geo.stride, geo.padding, geo.dilation);
  }
  return at::convolution(conv_input(dev, x), weight, c10::nullopt, geo.stride, geo.padding,
                         geo.dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, geo.groups);
}

// y in x's memory format, as ATen's convolution of x would give it (the CUDA path computed it in
// channels_last).
at::Tensor in_layout_of(const at::Tensor& y, const at::Tensor& x) {
  return y.contiguous(checks::unit_memory_format(x));
}

}  // namespace

std::array<int64_t, 4> check_unit_args(const char* op, const at::Tensor& x,
                                       const at::Tensor& weight, const BnState& bn,
                                       const OptTensor& residual, const ConvGeometry& geo,
                                       bool training) {
  TORCH_CHECK(x.defined() && weight.defined(), op, ": x and weight must be defined");
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [N, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK(checks::is_supported_dtype(x.scalar_type()), op,
              ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be a 4-D [Cout, Cin/groups, kh, kw] tensor, got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match x's ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  check_pair(op, "stride", geo.stride, 1);
  check_pair(op, "padding", geo.padding, 0);
  check_pair(op, "dilation", geo.dilation, 1);
  TORCH_CHECK(geo.groups >= 1, op, ": groups must be >= 1, got ", geo.groups);
  const int64_t cout = weight.size(0);
  TORCH_CHECK(x.size(1) == weight.size(1) * geo.groups, op, ": x has ", x.size(1),
              " channels but weight expects ", weight.size(1) * geo.groups, " (", weight.size(1),
              " per group x ", geo.groups, " groups)");
  TORCH_CHECK(cout % geo.groups == 0, op, ": out_channels ", cout, " is not divisible by groups ",
              geo.groups);
  std::array<int64_t, 4> out{x.size(0), cout, 0, 0};
  for (int d = 0; d < 2; ++d) {
    out[2 + d] = (x.size(2 + d) + 2 * geo.padding[d] - geo.dilation[d] * (weight.size(2 + d) - 1) - 1) /
                     geo.stride[d] + 1;
  }
  TORCH_CHECK(out[2] > 0 && out[3] > 0, op, ": input spatial size ", x.sizes().slice(2),
              " is too small for the ", weight.sizes().slice(2), " convolution (output would be ",
              at::IntArrayRef(out), ")");
  // nn.BatchNorm2d's rule: batch statistics need eps > 0; running ones take eps = 0.
  if (training) {
    TORCH_CHECK_VALUE(std::isfinite(bn.eps) && bn.eps > 0, op,
                      ": batch_norm eps must be positive during training, got ", bn.eps);
  } else {
    TORCH_CHECK_VALUE(std::isfinite(bn.eps) && bn.eps >= 0, op,
                      ": batch_norm eps must be non-negative, got ", bn.eps);
  }
  check_vector(op, "gamma (BatchNorm weight)", bn.gamma, x, cout);
  check_vector(op, "beta (BatchNorm bias)", bn.beta, x, cout);
  check_vector(op, "running_mean", bn.running_mean, x, cout);
  check_vector(op, "running_var", bn.running_var, x, cout);
  TORCH_CHECK(present(bn.running_mean) == present(bn.running_var), op,
              ": running_mean and running_var must both be given or both be None");
  if (present(bn.num_batches_tracked)) {
    const at::Tensor& n = *bn.num_batches_tracked;
    TORCH_CHECK(n.numel() == 1 && n.scalar_type() == at::kLong, op,
                ": num_batches_tracked must be a one-element int64 tensor, got ", n.scalar_type(),
                " of shape ", n.sizes());
    TORCH_CHECK(n.device() == x.device(), op, ": num_batches_tracked is on ", n.device(),
                " but x is on ", x.device());
  }
  if (bn.momentum.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*bn.momentum), op, ": momentum must be finite or None, got ",
                      *bn.momentum);
  }
  if (present(residual)) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == at::IntArrayRef(out), op, ": residual has shape ", r.sizes(),
                " but the unit's output has shape ", at::IntArrayRef(out));
    TORCH_CHECK(r.scalar_type() == x.scalar_type() && r.device() == x.device(), op,
                ": residual is ", r.scalar_type(), " on ", r.device(), " but x is ", x.scalar_type(),
                " on ", x.device(), "; they must match");
  }
  if (training) {
    TORCH_CHECK_VALUE(out[0] * out[2] * out[3] > 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      at::IntArrayRef(out));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward(
    const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight, const BnState& bn,
    const OptTensor& residual, const ConvGeometry& geo, bool relu) {
  check_device(dev, "fusedres::unit_train", "x", x);
  check_unit_args("fusedres::unit_train", x, weight, bn, residual, geo, /*training=*/true);
  const at::Tensor z = convolution(dev, x, weight, geo);
  auto [y, mean, invstd] = dev.train_bn(z, bn, residual, relu);
  return {dev.channels_last_conv ? in_layout_of(y, x) : y, z, mean, invstd};
}

at::Tensor eval_forward(const DeviceOps& dev, const at::Tensor& x, const at::Tensor& weight,
                        const BnState& bn, const OptTensor& residual, const ConvGeometry& geo,
                        bool relu) {
  TORCH_CHECK(present(bn.running_mean), "fusedres::unit_eval: running_mean and running_var are required");
  check_device(dev, "fusedres::unit_eval", "x", x);
  check_unit_args("fusedres::unit_eval", x, weight, bn, residual, geo, /*training=*/false);
  const at::Tensor z = convolution(dev, x, weight, geo);
  const at::Tensor y = dev.eval_bn(z, bn, residual, relu);
  return dev.channels_last_conv ? in_layout_of(y, x) : y;
}

namespace {

// dw in weight's strides (size-1 dimensions aside), as a copy only where they differ. ATen's
// weight gradient is channels_last for a channels_last input; a FusedResNet built NCHW trains
// channels_last activations with NCHW weights, and AccumulateGrad would copy every such
// gradient into its parameter's layout (in float32, after autocast's backward cast) each step.
at::Tensor strided_like(const at::Tensor& dw, const at::Tensor& weight) {
  bool same = dw.dim() == weight.dim();
  for (int64_t d = 0; same && d < dw.dim(); ++d) {
    same = weight.size(d) == 1 || dw.stride(d) == weight.stride(d);
  }
  if (same) return dw;
  at::Tensor out = at::empty_like(weight, dw.options());
  out.copy_(dw);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const DeviceOps& dev, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& y, const OptTensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const OptTensor& gamma, const ConvGeometry& geo, bool relu, bool training,
    std::array<bool, 5> output_mask) {
  constexpr const char* op = "fusedres::unit_backward";
  check_device(dev, op, "dy", dy);
  TORCH_CHECK(!relu || present(y), op, ": y is required with relu (the ReLU mask comes from it)");
  TORCH_CHECK(!training || present(z), op, ": z is required in training");
  const auto sdt = checks::stats_dtype(dy.scalar_type());
  const int64_t channels = weight.size(0);
  // The eval backward needs z only for dgamma (frozen statistics, trainable gamma): recomputing
  // it costs one convolution in that rare case instead of keeping z in the common one.
  at::Tensor zz = present(z) ? *z : (output_mask[2] ? convolution(dev, x, weight, geo) : at::Tensor());
  // Without z, dy stands in for it: the kernels' dgamma reduction then reads the cache lines dy
  // already brought in, and that dgamma (not asked for) is discarded.
  const at::Tensor& z_or_dy = zz.defined() ? zz : dy;
  const at::Tensor gate = relu ? *y : z_or_dy;  // not read without ReLU
  const at::Tensor gamma_s = present(gamma) ? gamma->to(sdt) : at::ones({channels}, mean.options().dtype(sdt));
  auto [dz, dgamma, dbeta, dres] =
      dev.bn_backward(dy, gate, z_or_dy, mean.to(sdt), invstd.to(sdt), gamma_s, relu,
                      output_mask[4], training);
  at::Tensor dx, dw;
  if (output_mask[0] || output_mask[1]) {
    // Widened, the float32 convolution's gradients of the same values, by float32's rules.
    const bool wide = widens(dev, x);
    auto in_float32 = [&](const at::Tensor& t) { return wide ? t.to(at::kFloat) : t; };
    const at::Tensor dz_c = in_float32(dz), x_c = in_float32(x), weight_c = in_float32(weight);
    if (device_conv_applies(dev, x_c, weight_c, geo)) {
      std::tie(dx, dw) = dev.conv_backward(dz_c, x_c, weight_c, geo.stride, geo.padding,
                                           geo.dilation, output_mask[0], output_mask[1]);
    } else {
      std::tie(dx, dw, std::ignore) = at::convolution_backward(
          dz_c, conv_input(dev, x_c), weight_c, c10::nullopt, geo.stride, geo.padding,
          geo.dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, geo.groups,
          {output_mask[0], output_mask[1], false});
    }
    if (wide && dx.defined()) dx = dx.to(x.scalar_type());
    if (wide && dw.defined()) dw = dw.to(weight.scalar_type());
  }
  return {output_mask[0] ? dx : absent(dy), output_mask[1] ? strided_like(dw, weight) : absent(dy),
          output_mask[2] ? dgamma : absent(dy), output_mask[3] ? dbeta : absent(dy),
          output_mask[4] ? dres : absent(dy)};
}

// ============================================================================================
// Block backward
// ============================================================================================

namespace {

// The training forward's y = act(z*scale + shift) of an inner unit, from what the block op kept,
// computed as fusedres/ops/block.py's bn_act_coefficients and its backend's bn_act_fwd do.
at::Tensor rebuild_activation(const at::Tensor& z, const OptTensor& gamma, const OptTensor& beta,
                              const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  static const auto apply =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedres::bn_act_fwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, bool)>();
  const at::Tensor scale = present(gamma) ? gamma->to(invstd.scalar_type()) * invstd : invstd;
  const at::Tensor shift =
      present(beta) ? beta->to(mean.scalar_type()) - mean * scale : -mean * scale;
  return apply.call(z, scale, shift, c10::nullopt, relu);
}

// A parameter's gradient in the parameter's dtype (dgamma and dbeta come in the statistics
// dtype), or undefined where it was not asked for.
at::Tensor in_dtype_of(const at::Tensor& grad, const OptTensor& param, bool wanted) {
  if (!wanted) return at::Tensor();
  return grad.scalar_type() == param->scalar_type() ? grad : grad.to(param->scalar_type());
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> block_backward(
    const DeviceOps& dev, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
    at::TensorList weights, const c10::List<OptTensor>& gammas,
    const c10::List<OptTensor>& betas, const c10::List<OptTensor>& zs, at::TensorList means,
    at::TensorList invstds, at::IntArrayRef geometry, const c10::List<bool>& relus,
    bool downsample, const c10::List<bool>& needs) {
  constexpr const char* op = "fusedres::block_backward";
  check_device(dev, op, "dy", dy);
  const int64_t m = static_cast<int64_t>(weights.size());
  const int64_t n = m - (downsample ? 1 : 0);  // units of the main chain
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(gammas.size()) == m &&
                  static_cast<int64_t>(betas.size()) == m && static_cast<int64_t>(zs.size()) == m &&
                  static_cast<int64_t>(means.size()) == m &&
                  static_cast<int64_t>(invstds.size()) == m &&
                  static_cast<int64_t>(geometry.size()) == 7 * m &&
                  static_cast<int64_t>(relus.size()) == m &&
                  static_cast<int64_t>(needs.size()) == 1 + 3 * m,
              op, ": expected one weight, gamma, beta, z, mean, invstd, relu, 7 geometry values "
              "and 3 needs per unit (and needs[0] for x), got ", m, " weights");
  auto geo = [&](int64_t k) {
    return ConvGeometry{geometry.slice(7 * k, 2), geometry.slice(7 * k + 2, 2),
                        geometry.slice(7 * k + 4, 2), geometry[7 * k + 6]};
  };
  auto need = [&](int64_t k, int64_t i) { return static_cast<bool>(needs.get(1 + 3 * k + i)); };
  const bool need_x = needs.get(0);
  // before[k]: whether x or any unit before k takes a gradient, so unit k's dx is needed.
  std::vector<bool> before{need_x};
  for (int64_t k = 0; k < n; ++k) {
    before.push_back(before.back() || need(k, 0) || need(k, 1) || need(k, 2));
  }
  const bool need_ds = downsample && (need(n, 0) || need(n, 1) || need(n, 2));
  const bool need_residual = need_x || need_ds;

  std::vector<at::Tensor> grads(3 * m);  // undefined until computed, placeholders at the end
  auto keep_grads = [&](int64_t k, const std::array<bool, 5>& mask, const at::Tensor& dw,
                        const at::Tensor& dgamma, const at::Tensor& dbeta) {
    grads[3 * k] = in_dtype_of(dw, weights[k], mask[1]);
    grads[3 * k + 1] = in_dtype_of(dgamma, gammas.get(k), mask[2]);
    grads[3 * k + 2] = in_dtype_of(dbeta, betas.get(k), mask[3]);
  };
  OptTensor z_first = zs.get(0);
  at::Tensor grad = dy, y_k = y, dresidual;
  for (int64_t k = n - 1; k >= 0; --k) {
    at::Tensor x_k = x;
    if (k > 0) {
      if (k == 1 && !present(z_first)) z_first = convolution(dev, x, weights[0], geo(0));
      const OptTensor z_prev = k == 1 ? z_first : zs.get(k - 1);
      x_k = rebuild_activation(*z_prev, gammas.get(k - 1), betas.get(k - 1), means[k - 1],
                               invstds[k - 1], relus.get(k - 1));
    }
    const bool relu = relus.get(k);
    const std::array<bool, 5> mask{before[k], need(k, 0),
                                   need(k, 1) && present(gammas.get(k)),
                                   need(k, 2) && present(betas.get(k)),
                                   k == n - 1 && need_residual};
    auto [dx, dw, dgamma, dbeta, dres] =
        backward(dev, grad, x_k, weights[k], relu ? OptTensor(y_k) : OptTensor(),
                 k == 0 ? z_first : zs.get(k), means[k], invstds[k], gammas.get(k), geo(k), relu,
                 /*training=*/true, mask);
    keep_grads(k, mask, dw, dgamma, dbeta);
    if (k == n - 1) dresidual = dres;
    if (!before[k]) break;  // nothing before this unit takes a gradient
    // The rebuilt x_k is y_{k-1}: unit k-1's ReLU mask; the one before is dropped here.
    grad = dx;
    y_k = x_k;
  }
  // grad is unit 0's dx wherever x takes a gradient (the loop then ran to k = 0).
  if (downsample && need_residual) {
    const std::array<bool, 5> mask{need_x, need(n, 0), need(n, 1) && present(gammas.get(n)),
                                   need(n, 2) && present(betas.get(n)), false};
    auto [dx_ds, dw, dgamma, dbeta, unused] =
        backward(dev, dresidual, x, weights[n], OptTensor(), zs.get(n), means[n], invstds[n],
                 gammas.get(n), geo(n), /*relu=*/false, /*training=*/true, mask);
    keep_grads(n, mask, dw, dgamma, dbeta);
    if (need_x) grad.add_(dx_ds);  // conv1's fresh input gradient: no new block-sized tensor
  } else if (need_x) {
    grad.add_(dresidual);
  }
  // Placeholders, each its own tensor (op outputs may not alias), for the gradients not computed.
  for (at::Tensor& g : grads) {
    if (!g.defined()) g = absent(dy);
  }
  return {need_x ? grad : absent(dy), std::move(grads)};
}

// ============================================================================================
// Autograd
// ============================================================================================

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> to_vec(at::IntArrayRef a) { return a.vec(); }

bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }

// The forward arguments of both autograd Functions, in op-schema order up to the geometry:
// x, weight, gamma, beta, residual. Autograd numbers a node's edges by its defined tensor
// inputs only, so an undefined gamma shifts beta's edge; this maps argument -> edge.
struct GradEdges {
  std::array<int64_t, 5> edge{};

  GradEdges(const OptTensor& gamma, const OptTensor& beta) {
    edge[0] = 0;
    edge[1] = 1;
    int64_t next = 2;
    edge[2] = present(gamma) ? next++ : -1;
    edge[3] = present(beta) ? next++ : -1;
    edge[4] = next;  // residual: read only when present
  }
};

std::array<bool, 5> output_mask(AutogradContext* ctx, bool has_residual) {
  const auto& e = ctx->saved_data;
  std::array<bool, 5> mask{};
  const std::array<const char*, 5> keys{"edge_x", "edge_w", "edge_gamma", "edge_beta", "edge_res"};
  for (size_t i = 0; i < 5; ++i) {
    const int64_t edge = e.at(keys[i]).toInt();
    mask[i] = edge >= 0 && (i != 4 || has_residual) && ctx->needs_input_grad(edge);
  }
  return mask;
}

void save_edges(AutogradContext* ctx, const GradEdges& edges, bool has_residual) {
  ctx->saved_data["edge_x"] = edges.edge[0];
  ctx->saved_data["edge_w"] = edges.edge[1];
  ctx->saved_data["edge_gamma"] = edges.edge[2];
  ctx->saved_data["edge_beta"] = edges.edge[3];
  ctx->saved_data["edge_res"] = has_residual ? edges.edge[4] : int64_t(-1);
}

void save_geometry(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, bool relu, double eps) {
  ctx->saved_data["stride"] = to_vec(stride);
  ctx->saved_data["padding"] = to_vec(padding);
  ctx->saved_data["dilation"] = to_vec(dilation);
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["eps"] = eps;
}

// Double backward (create_graph=True, e.g. gradient penalties): the first-order gradients are
// rebuilt from differentiable ATen ops so that autograd can differentiate them again. The ReLU
// mask is fixed by the saved y (ReLU's second derivative is zero), so the residual's value is not
// needed: v = bn(conv(x, w)) is recomputed and g = dy*mask is pulled back through it.
variable_list differentiable_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& weight, const at::Tensor& y,
                                      const at::Tensor& gamma, const at::Tensor& beta,
                                      const at::Tensor& running_mean, const at::Tensor& running_var,
                                      bool training, AutogradContext* ctx, bool has_residual) {
  const auto& d = ctx->saved_data;
  const auto stride = d.at("stride").toIntVector(), padding = d.at("padding").toIntVector(),
             dilation = d.at("dilation").toIntVector();
  const bool relu = d.at("relu").toBool();
  const auto mask = output_mask(ctx, has_residual);
  const at::Tensor g = relu ? at::threshold_backward(dy, y, 0) : dy;
  const at::Tensor z = at::convolution(x, weight, c10::nullopt, stride, padding, dilation, false,
                                       {0, 0}, d.at("groups").toInt());
  const at::Tensor v = at::batch_norm(z, gamma, beta, running_mean, running_var, training, 0.0,
                                      d.at("eps").toDouble(), /*cudnn_enabled=*/true);
  std::vector<at::Tensor> inputs;
  const std::array<at::Tensor, 4> candidates{x, weight, gamma, beta};
  for (size_t i = 0; i < 4; ++i) {
    if (mask[i]) inputs.push_back(candidates[i]);
  }
  std::vector<at::Tensor> grads;
  if (!inputs.empty()) {
    grads = torch::autograd::grad({v}, inputs, {g.to(v.scalar_type())}, /*retain_graph=*/true,
                                  /*create_graph=*/true, /*allow_unused=*/true);
  }
  variable_list out(4);
  size_t k = 0;
  for (size_t i = 0; i < 4; ++i) {
    if (mask[i]) out[i] = grads[k++];
  }
  out.push_back(mask[4] ? g : at::Tensor());
  return out;
}

const c10::TypedOperatorHandle<decltype(unit_train_autograd)>& train_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedres::unit_train", "")
                             .typed<decltype(unit_train_autograd)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(unit_eval_autograd)>& eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedres::unit_eval", "")
                             .typed<decltype(unit_eval_autograd)>();
  return op;
}

using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, bool, bool, std::array<bool, 5>);

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedres::unit_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

// Runs fusedres::unit_backward and maps its [0] placeholders back to undefined gradients.
variable_list first_order_backward(AutogradContext* ctx, const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& weight, const at::Tensor& y,
                                   const at::Tensor& z, const at::Tensor& mean,
                                   const at::Tensor& invstd, const at::Tensor& gamma,
                                   bool training, bool has_residual) {
  const auto& d = ctx->saved_data;
  const auto mask = output_mask(ctx, has_residual);
  const auto stride = d.at("stride").toIntVector(), padding = d.at("padding").toIntVector(),
             dilation = d.at("dilation").toIntVector();
  auto grads = backward_op().call(dy, x, weight, y.defined() ? OptTensor(y) : c10::nullopt,
                                  z.defined() ? OptTensor(z) : c10::nullopt, mean, invstd,
                                  gamma.defined() ? OptTensor(gamma) : c10::nullopt, stride,
                                  padding, dilation, d.at("groups").toInt(),
                                  d.at("relu").toBool(), training, mask);
  variable_list out{std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                    std::get<3>(grads), std::get<4>(grads)};
  for (size_t i = 0; i < 5; ++i) {
    if (!mask[i]) out[i] = at::Tensor();
  }
  return out;
}

// Gradients come back in the parameters' own dtypes (gamma may be float16 in a half model
// while the kernels reduce in float32).
void cast_affine_grads(variable_list& g, const at::Tensor& gamma, const at::Tensor& beta) {
  if (g[2].defined() && gamma.defined()) g[2] = g[2].to(gamma.scalar_type());
  if (g[3].defined() && beta.defined()) g[3] = g[3].to(beta.scalar_type());
}

class UnitTrainFunction : public torch::autograd::Function<UnitTrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& gamma, const OptTensor& beta,
                               const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu,
                               c10::optional<double> momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, z, mean, invstd] =
        train_op().call(x, weight, gamma, beta, residual, running_mean, running_var,
                        num_batches_tracked, stride, padding, dilation, groups, relu, momentum, eps);
    // y is the next convolution's input, kept by it anyway; without ReLU there is no mask to
    // read, so it is not kept (a downsample unit's y is the block's identity branch).
    ctx->save_for_backward({x, weight, relu ? y : at::Tensor(), z, mean, invstd,
                            present(gamma) ? *gamma : at::Tensor(),
                            present(beta) ? *beta : at::Tensor()});
    save_geometry(ctx, stride, padding, dilation, groups, relu, eps);
    save_edges(ctx, GradEdges(gamma, beta), present(residual));
    ctx->mark_non_differentiable({z, mean, invstd});
    // Their gradients are never used: without this, autograd would allocate a zero tensor the
    // size of z for every unit's backward.
    ctx->set_materialize_grads(false);
    return {y, z, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];
    variable_list out(15);
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const bool has_residual = ctx->saved_data.at("edge_res").toInt() >= 0;
    variable_list g =
        at::GradMode::is_enabled()
            ? differentiable_backward(dy, saved[0], saved[1], saved[2], saved[6], saved[7],
                                      at::Tensor(), at::Tensor(), /*training=*/true, ctx,
                                      has_residual)
            : first_order_backward(ctx, dy, saved[0], saved[1], saved[2], saved[3], saved[4],
                                   saved[5], saved[6], /*training=*/true, has_residual);
    cast_affine_grads(g, saved[6], saved[7]);
    for (size_t i = 0; i < 5; ++i) out[i] = g[i];
    return out;
  }
};

class UnitEvalFunction : public torch::autograd::Function<UnitEvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& gamma, const OptTensor& beta,
                               const OptTensor& residual, const at::Tensor& running_mean,
                               const at::Tensor& running_var, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               bool relu, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = eval_op().call(x, weight, gamma, beta, residual, running_mean, running_var,
                                  stride, padding, dilation, groups, relu, eps);
    // The running statistics are saved as they are (no copy): should they change before this
    // backward runs, autograd's version check says so instead of a silently wrong gradient.
    ctx->save_for_backward({x, weight, relu ? y : at::Tensor(),
                            present(gamma) ? *gamma : at::Tensor(),
                            present(beta) ? *beta : at::Tensor(), running_mean, running_var});
    save_geometry(ctx, stride, padding, dilation, groups, relu, eps);
    save_edges(ctx, GradEdges(gamma, beta), present(residual));
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];
    variable_list out(13);
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const bool has_residual = ctx->saved_data.at("edge_res").toInt() >= 0;
    variable_list g;
    if (at::GradMode::is_enabled()) {
      g = differentiable_backward(dy, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                  saved[6], /*training=*/false, ctx, has_residual);
    } else {
      const auto sdt = checks::stats_dtype(dy.scalar_type());
      const at::Tensor mean = saved[5].to(sdt);
      const at::Tensor invstd = (saved[6].to(sdt) + ctx->saved_data.at("eps").toDouble()).rsqrt();
      g = first_order_backward(ctx, dy, saved[0], saved[1], saved[2], at::Tensor(), mean, invstd,
                               saved[3], /*training=*/false, has_residual);
    }
    cast_affine_grads(g, saved[3], saved[4]);
    for (size_t i = 0; i < 5; ++i) out[i] = g[i];
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_train_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& gamma, const OptTensor& beta,
    const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, c10::optional<double> momentum,
    double eps) {
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (x.requires_grad() || weight.requires_grad() || requires_grad(gamma) ||
                            requires_grad(beta) || requires_grad(residual));
  if (!needs_graph) {
    // Nothing to differentiate: skip the Function's bookkeeping and saved tensors.
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op().call(x, weight, gamma, beta, residual, running_mean, running_var,
                           num_batches_tracked, stride, padding, dilation, groups, relu, momentum,
                           eps);
  }
  auto out = UnitTrainFunction::apply(x, weight, gamma, beta, residual, running_mean, running_var,
                                      num_batches_tracked, stride, padding, dilation, groups, relu,
                                      momentum, eps);
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor unit_eval_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const OptTensor& gamma, const OptTensor& beta,
                              const OptTensor& residual, const at::Tensor& running_mean,
                              const at::Tensor& running_var, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool relu, double eps) {
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (x.requires_grad() || weight.requires_grad() || requires_grad(gamma) ||
                            requires_grad(beta) || requires_grad(residual));
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_op().call(x, weight, gamma, beta, residual, running_mean, running_var, stride,
                          padding, dilation, groups, relu, eps);
  }
  return UnitEvalFunction::apply(x, weight, gamma, beta, residual, running_mean, running_var,
                                 stride, padding, dilation, groups, relu, eps)[0];
}

}  // namespace unit
}  // namespace fusedres

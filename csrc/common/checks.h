// Argument checks of the torch.library ops, shared by the CPU and CUDA implementations so that both
// reject the same inputs with the same messages. Header-only; needs torch (ATen) headers, so it is
// included by the binding (csrc/fusedres.cpp) and the ATen-level CPU code, never by a .cu file.
#pragma once

// at::Tensor alone, not <ATen/ATen.h> (about 10 s of parsing in each file that includes it);
// the files that call at:: functions include their per-operator headers (ATen/ops/*.h).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fusedres {
namespace checks {

// The dtype of per-channel statistics (mean, var, scale, shift, weight, ...) for activations of
// `dtype`: float64 stays float64, every other floating type uses float32 (fusedres.reference).
inline c10::ScalarType stats_dtype(c10::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The memory format an op's outputs take for input `t` (the rule of fusedres.reference and of the
// fake kernels in fusedres/ops/library.py): channels_last only when `t` is channels_last-dense and
// not also NCHW-contiguous (C == 1 or H == W == 1 make both true); any other strided input, e.g. a
// slice, is treated as NCHW and copied.
inline c10::MemoryFormat unit_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
    return c10::MemoryFormat::ChannelsLast;
  }
  return c10::MemoryFormat::Contiguous;
}

inline bool is_supported_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// A [N, C, H, W] activation (z, y, dy, residual).
inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a rank-4 [N, C, H, W] tensor, got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// `t` must match the reference activation `ref` in shape, dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name, const char* op) {
  check_activation(t, op, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// A per-channel [C] vector (scale, shift, mean, invstd, weight) for the activation `z`.
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& z,
                                 const char* op) {
  TORCH_CHECK(v.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == z.size(1), op, ": ", name,
              " must be a [C] vector with C = z.size(1) = ", z.size(1), ", got shape ", v.sizes());
  const auto sdt = stats_dtype(z.scalar_type());
  TORCH_CHECK(v.scalar_type() == sdt, op, ": ", name, " must be in the statistics dtype ", sdt,
              " (float64 for float64 z, else float32), got ", v.scalar_type());
  TORCH_CHECK(v.device() == z.device(), op, ": ", name, " must be on the device of z (", z.device(),
              "), got ", v.device());
}

inline void check_bn_stats_args(const at::Tensor& z) {
  check_activation(z, "fusedres::bn_stats", "z");
}

inline void check_bn_act_fwd_args(const at::Tensor& z, const at::Tensor& scale,
                                  const at::Tensor& shift,
                                  const c10::optional<at::Tensor>& residual,
                                  const char* op = "fusedres::bn_act_fwd") {
  check_activation(z, op, "z");
  check_channel_vector(scale, "scale", z, op);
  check_channel_vector(shift, "shift", z, op);
  if (residual.has_value() && residual->defined()) {
    check_like(*residual, "residual", z, "z", op);
  }
}

inline void check_bn_act_bwd_args(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const at::Tensor& weight) {
  constexpr const char* op = "fusedres::bn_act_bwd";
  check_activation(z, op, "z");
  check_like(dy, "dy", z, "z", op);
  check_like(y, "y", z, "z", op);
  check_channel_vector(mean, "mean", z, op);
  check_channel_vector(invstd, "invstd", z, op);
  check_channel_vector(weight, "weight", z, op);
}

// The packed ReLU mask of bn_act_fwd_mask for the activation z: uint8 [ceil(numel(z) / 8)].
inline void check_relu_mask(const at::Tensor& mask, const at::Tensor& z, const char* op) {
  TORCH_CHECK(mask.defined(), op, ": mask is an undefined tensor");
  const int64_t bytes = (z.numel() + 7) / 8;
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == bytes, op,
              ": mask must be a [ceil(numel(z) / 8)] = [", bytes, "] tensor, got shape ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be uint8, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.device() == z.device(), op, ": mask must be on the device of z (", z.device(),
              "), got ", mask.device());
}

inline void check_bn_act_bwd_mask_args(const at::Tensor& dy, const at::Tensor& mask,
                                       const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& invstd, const at::Tensor& weight) {
  constexpr const char* op = "fusedres::bn_act_bwd_mask";
  check_activation(z, op, "z");
  check_like(dy, "dy", z, "z", op);
  check_relu_mask(mask, z, op);
  check_channel_vector(mean, "mean", z, op);
  check_channel_vector(invstd, "invstd", z, op);
  check_channel_vector(weight, "weight", z, op);
}

}  // namespace checks
}  // namespace fusedres

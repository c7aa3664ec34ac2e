// ATen-level launchers of the CPU kernels: layout, allocation, kernel-variant choice. Arguments have
// been checked by the binding (common/checks.h) before these run.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>

#include "common/checks.h"
#include "cpu/kernels.h"

namespace fusedres {
namespace cpu {
namespace {

// The kernel builds from the most portable up, by the names ATen gives its CPU capabilities.
constexpr const char* kBuildNames[] = {"DEFAULT", "AVX2", "AVX512"};

// Index in kBuildNames of a capability name (any case), or -1.
int build_index(std::string name) {
  for (char& ch : name) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  for (int i = 0; i < 3; ++i) {
    if (name == kBuildNames[i]) return i;
  }
  return -1;
}

}  // namespace

// ATen's own choice of instruction set (honours ATEN_CPU_CAPABILITY=default|avx2|avx512), so the
// CPU kernels follow the same switch as PyTorch's: the AVX512 build where ATen runs AVX512, the
// AVX2 build where it runs AVX2. FUSEDRES_CPU_KERNELS=default|avx2 caps this build alone below
// that (an A/B of the kernel builds under the same ATen, or a way around a build that misbehaves
// on some CPU or compiler); it never raises the choice above ATen's.
const KernelTable& active_kernels() {
  static const KernelTable* table = [] {
    int level = std::max(build_index(at::get_cpu_capability()), 0);
    if (const char* env = std::getenv("FUSEDRES_CPU_KERNELS")) {
      const int cap = build_index(env);
      if (cap < 0) {
        TORCH_WARN("FUSEDRES_CPU_KERNELS=", env, " is not one of default, avx2, avx512: ignored");
      } else {
        level = std::min(level, cap);
      }
    }
    const KernelTable* builds[] = {kernel_table_default(), kernel_table_avx2(),
                                   kernel_table_avx512()};
    while (builds[level] == nullptr) --level;  // the default build is always there
    return builds[level];
  }();
  return *table;
}

namespace {

Geometry geometry(const at::Tensor& t, c10::MemoryFormat fmt) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), fmt == c10::MemoryFormat::ChannelsLast};
}

}  // namespace

std::string kernel_variant() { return active_kernels().name; }

std::string compiled_variants() {
  std::string variants = "DEFAULT";
  if (kernel_table_avx2() != nullptr) variants += ", AVX2";
  if (kernel_table_avx512() != nullptr) variants += ", AVX512";
  return variants;
}

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& z) {
  const auto sdt = checks::stats_dtype(z.scalar_type());
  const int64_t C = z.size(1);
  if (z.numel() == 0) {
    // torch.var_mean over no elements: NaN for both.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({C}, nan, z.options().dtype(sdt)), at::full({C}, nan, z.options().dtype(sdt))};
  }
  const auto fmt = checks::unit_memory_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  at::Tensor mean = at::empty({C}, z.options().dtype(sdt));
  at::Tensor var = at::empty({C}, z.options().dtype(sdt));
  StatsParams p{geometry(zc, fmt), zc.const_data_ptr(), mean.mutable_data_ptr(),
                var.mutable_data_ptr()};
  active_kernels().bn_stats(p, z.scalar_type());
  return {mean, var};
}

at::Tensor bn_act_fwd(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& residual, bool relu) {
  const auto fmt = checks::unit_memory_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  at::Tensor y = at::empty_like(zc, fmt);
  if (z.numel() == 0) return y;
  const bool has_res = residual.has_value() && residual->defined();
  // The residual may come in another layout (e.g. an NCHW identity added to a channels_last
  // unit): bring it to z's, the kernel walks both with one index.
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  FwdParams p{geometry(zc, fmt), zc.const_data_ptr(), sc.const_data_ptr(), sh.const_data_ptr(),
              has_res ? res.const_data_ptr() : nullptr, y.mutable_data_ptr(), relu};
  active_kernels().bn_act_fwd(p, z.scalar_type());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train_fwd(
    const at::Tensor& z, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& residual, bool relu,
    double eps) {
  const auto fmt = checks::unit_memory_format(z);
  const auto sdt = checks::stats_dtype(z.scalar_type());
  const int64_t C = z.size(1);
  const at::Tensor zc = z.contiguous(fmt);
  at::Tensor y = at::empty_like(zc, fmt);
  at::Tensor mean = at::empty({C}, z.options().dtype(sdt));
  at::Tensor var = at::empty({C}, z.options().dtype(sdt));
  at::Tensor invstd = at::empty({C}, z.options().dtype(sdt));
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const bool has_gamma = gamma.has_value() && gamma->defined();
  const bool has_beta = beta.has_value() && beta->defined();
  const at::Tensor g = has_gamma ? gamma->contiguous() : at::Tensor();
  const at::Tensor b = has_beta ? beta->contiguous() : at::Tensor();
  TrainFwdParams p{geometry(zc, fmt),
                   zc.const_data_ptr(),
                   has_res ? res.const_data_ptr() : nullptr,
                   has_gamma ? g.const_data_ptr() : nullptr,
                   has_beta ? b.const_data_ptr() : nullptr,
                   eps,
                   relu,
                   y.mutable_data_ptr(),
                   mean.mutable_data_ptr(),
                   var.mutable_data_ptr(),
                   invstd.mutable_data_ptr()};
  active_kernels().bn_train_fwd(p, z.scalar_type());
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor> bn_act_fwd_mask(const at::Tensor& z, const at::Tensor& scale,
                                                   const at::Tensor& shift,
                                                   const c10::optional<at::Tensor>& residual) {
  const auto fmt = checks::unit_memory_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  at::Tensor y = at::empty_like(zc, fmt);
  at::Tensor mask = at::empty({(z.numel() + 7) / 8}, z.options().dtype(at::kByte));
  if (z.numel() == 0) return {y, mask};
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  FwdParams p{geometry(zc, fmt), zc.const_data_ptr(), sc.const_data_ptr(), sh.const_data_ptr(),
              has_res ? res.const_data_ptr() : nullptr, y.mutable_data_ptr(), true,
              mask.mutable_data_ptr<uint8_t>()};
  active_kernels().bn_act_fwd(p, z.scalar_type());
  return {y, mask};
}

namespace {

// bn_act_bwd with the ReLU gate from y (mask undefined) or from the packed mask (y undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_gated(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, bool relu,
    bool has_residual, bool training) {
  const auto fmt = checks::unit_memory_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  // dy often arrives in another layout than the forward tensors (autograd hands over whatever the
  // next op produced): convert once so every stream shares z's index.
  const at::Tensor dyc = dy.contiguous(fmt);
  const at::Tensor yc = y.defined() ? y.contiguous(fmt) : at::Tensor();
  const at::Tensor maskc = mask.defined() ? mask.contiguous() : at::Tensor();
  const int64_t C = z.size(1);
  const auto sdt = checks::stats_dtype(z.scalar_type());
  at::Tensor dz = at::empty_like(zc, fmt);
  at::Tensor dres = has_residual ? at::empty_like(zc, fmt) : at::empty({0}, dy.options());
  if (z.numel() == 0) {
    return {dz, at::zeros({C}, z.options().dtype(sdt)), at::zeros({C}, z.options().dtype(sdt)),
            dres};
  }
  at::Tensor dweight = at::empty({C}, z.options().dtype(sdt));
  at::Tensor dbias = at::empty({C}, z.options().dtype(sdt));
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous(), w = weight.contiguous();
  BwdParams p{geometry(zc, fmt),
              dyc.const_data_ptr(),
              yc.defined() ? yc.const_data_ptr() : nullptr,
              zc.const_data_ptr(),
              m.const_data_ptr(),
              is.const_data_ptr(),
              w.const_data_ptr(),
              dz.mutable_data_ptr(),
              dweight.mutable_data_ptr(),
              dbias.mutable_data_ptr(),
              has_residual ? dres.mutable_data_ptr() : nullptr,
              relu,
              training,
              maskc.defined() ? maskc.const_data_ptr<uint8_t>() : nullptr};
  active_kernels().bn_act_bwd(p, z.scalar_type());
  return {dz, dweight, dbias, dres};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool relu, bool has_residual,
    bool training) {
  return bn_act_bwd_gated(dy, y, at::Tensor(), z, mean, invstd, weight, relu, has_residual,
                          training);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_mask(
    const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool has_residual, bool training) {
  return bn_act_bwd_gated(dy, at::Tensor(), mask, z, mean, invstd, weight, true, has_residual,
                          training);
}

namespace {

// nn.MaxPool2d's output size along one dimension (ATen's pooling_output_shape): with ceil_mode the
// last window must still start inside the input or its left padding.
int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                    bool ceil_mode) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (span < 0 ? span - stride + 1 : span) / stride + 1;  // floor division
  if (ceil_mode && (out - 1) * stride >= size + pad) --out;
  return out;
}

}  // namespace

at::Tensor max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "fusedres::max_pool2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": x must be float32, float64, bfloat16 or float16, got ", dtype);
  const bool pairs = kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                     dilation.size() == 2;
  TORCH_CHECK(pairs, op, ": kernel_size, stride, padding and dilation must hold two ints each");
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(kernel_size[d] > 0 && stride[d] > 0 && dilation[d] > 0, op,
                      ": kernel_size, stride and dilation must be positive, got kernel_size=",
                      kernel_size, ", stride=", stride, ", dilation=", dilation);
    TORCH_CHECK_VALUE(padding[d] >= 0 && padding[d] <= kernel_size[d] / 2, op,
                      ": padding must be between 0 and half the kernel size, got padding=",
                      padding, " for kernel_size=", kernel_size);
    out[d] = pooled_size(x.size(2 + d), kernel_size[d], stride[d], padding[d], dilation[d],
                         ceil_mode);
    TORCH_CHECK_VALUE(out[d] > 0, op, ": input of ", x.size(2), "x", x.size(3),
                      " pixels is too small for kernel_size=", kernel_size, ", padding=", padding,
                      ", dilation=", dilation, " (output ", out[0], "x", out[1], ")");
  }
  const auto fmt = c10::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = at::empty({x.size(0), x.size(1), out[0], out[1]}, x.options(), fmt);
  if (y.numel() == 0) return y;
  MaxPoolParams p{x.size(0), x.size(1), x.size(2), x.size(3), out[0], out[1],
                  kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
                  dilation[0], dilation[1], xc.const_data_ptr(), y.mutable_data_ptr()};
  active_kernels().max_pool(p, dtype);
  return y;
}

}  // namespace cpu
}  // namespace fusedres

// Winograd F(2x2, 3x3) inference convolution (winograd_conv.h says what and why).
#include "cpu/winograd_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "common/checks.h"
#include "cpu/kernels.h"

namespace fusedres {
namespace cpu {
namespace {

constexpr int64_t kTaps = 16;  // 4x4 transform positions

void check_float32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "winograd: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("FUSEDRES_CPU_WINOGRAD");
    return env == nullptr || std::string(env) != "0";
  }()};
  return flag;
}

}  // namespace

at::Tensor winograd_weight(const at::Tensor& weight) {
  check_float32_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_weight: weight must be [Cout, Cin, 3, 3], got ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t cout = w.size(0), cin = w.size(1);
  at::Tensor u = at::empty({kTaps * cout, cin, 1, 1}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = u.data_ptr<float>();
  // G g G^T in float64, rounded once: G's 1/2s are exact, its sums of three taps are not.
  at::parallel_for(0, cout, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t i = 0; i < cin; ++i) {
        const float* g = src + (o * cin + i) * 9;
        double tap[3][3];
        for (int r = 0; r < 3; ++r) {
          for (int c = 0; c < 3; ++c) tap[r][c] = g[3 * r + c];
        }
        double gg[4][3];  // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2
        for (int j = 0; j < 3; ++j) {
          gg[0][j] = tap[0][j];
          gg[1][j] = 0.5 * (tap[0][j] + tap[1][j] + tap[2][j]);
          gg[2][j] = 0.5 * (tap[0][j] - tap[1][j] + tap[2][j]);
          gg[3][j] = tap[2][j];
        }
        for (int r = 0; r < 4; ++r) {  // (G g) G^T, the same along each row
          const double row[4] = {gg[r][0], 0.5 * (gg[r][0] + gg[r][1] + gg[r][2]),
                                 0.5 * (gg[r][0] - gg[r][1] + gg[r][2]), gg[r][2]};
          for (int c = 0; c < 4; ++c) {
            dst[((4 * r + c) * cout + o) * cin + i] = static_cast<float>(row[c]);
          }
        }
      }
    }
  });
  return u;
}

at::Tensor winograd_input(const at::Tensor& x) {
  check_float32_cpu(x, "x");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0,
              "winograd_input: x must be a non-empty [N, C, H, W], got ", x.sizes());
  const int64_t th = (x.size(2) + 1) / 2, tw = (x.size(3) + 1) / 2;
  const int64_t channels = x.size(1);
  const at::Tensor x_cl = x.contiguous(c10::MemoryFormat::ChannelsLast);
  at::Tensor v = at::empty({1, kTaps * channels, x.size(0) * th * tw, 1},
                           x.options().memory_format(c10::MemoryFormat::ChannelsLast));
  active_kernels().winograd_input({x.size(0), x.size(2), x.size(3), th, tw, channels,
                                   x_cl.data_ptr<float>(), v.data_ptr<float>()});
  return v;
}

void winograd_output(const at::Tensor& m, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out) {
  check_float32_cpu(m, "m");
  check_float32_cpu(bias, "bias");
  check_float32_cpu(out, "out");
  TORCH_CHECK(out.dim() == 4 && out.numel() > 0 &&
                  out.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "winograd_output: out must be a non-empty dense channels_last [N, Cout, H, W], got ",
              out.sizes(), " with strides ", out.strides());
  const int64_t n = out.size(0), cout = out.size(1), h = out.size(2), w = out.size(3);
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2;
  TORCH_CHECK(m.dim() == 4 && m.size(0) == 1 && m.size(1) == kTaps * cout &&
                  m.size(2) == n * th * tw && m.size(3) == 1 &&
                  m.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "winograd_output: m must be the products [1, ", kTaps * cout, ", ", n * th * tw,
              ", 1] in channels_last for out of size ", out.sizes(), ", got ", m.sizes(),
              " with strides ", m.strides());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == cout, "winograd_output: bias must be [", cout,
              "], got ", bias.sizes());
  at::Tensor residual_cl;
  if (residual.has_value()) {
    check_float32_cpu(*residual, "residual");
    TORCH_CHECK(residual->sizes() == out.sizes(), "winograd_output: residual must be ",
                out.sizes(), ", got ", residual->sizes());
    residual_cl = residual->contiguous(c10::MemoryFormat::ChannelsLast);
  }
  const at::Tensor b = bias.contiguous();
  active_kernels().winograd_output(
      {n, h, w, th, tw, cout, m.data_ptr<float>(), b.data_ptr<float>(),
       residual_cl.defined() ? residual_cl.data_ptr<float>() : nullptr, out.data_ptr<float>(),
       relu});
}

int64_t winograd_image_bytes(int64_t h, int64_t w, int64_t channels) {
  return kTaps * ((h + 1) / 2) * ((w + 1) / 2) * channels * int64_t{sizeof(float)};
}

void set_winograd_enabled(bool enabled) { enabled_flag().store(enabled); }

bool winograd_enabled() { return enabled_flag().load(); }

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!winograd_enabled() || groups != 1 || !x.device().is_cpu() ||
      x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) {
    return false;
  }
  if (weight.size(2) != 3 || weight.size(3) != 3 || stride != at::IntArrayRef({1, 1}) ||
      padding != at::IntArrayRef({1, 1}) || dilation != at::IntArrayRef({1, 1})) {
    return false;
  }
  if (checks::unit_memory_format(x) != c10::MemoryFormat::ChannelsLast) return false;
  const int64_t cin = weight.size(1), cout = weight.size(0);
  const int64_t tiles = x.size(0) * ((x.size(2) + 1) / 2) * ((x.size(3) + 1) / 2);
  return x.size(1) == cin && std::min(cin, cout) >= kWinogradMinChannels &&
         tiles * cin * cout >= kWinogradMinWork &&
         winograd_image_bytes(x.size(2), x.size(3), std::max(cin, cout)) <=
             kWinogradMaxImageBytes;
}

}  // namespace cpu
}  // namespace fusedres

// Winograd F(2x2, 3x3) inference convolution (winograd_conv.h says what and why).
#include "cpu/winograd_conv.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

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

void check_dilation(at::IntArrayRef dilation, const char* where) {
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, where,
              ": dilation must be two positive ints, got ", dilation);
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

at::Tensor winograd_input(const at::Tensor& x, at::IntArrayRef dilation) {
  check_float32_cpu(x, "x");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0,
              "winograd_input: x must be a non-empty [N, C, H, W], got ", x.sizes());
  check_dilation(dilation, "winograd_input");
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t th = winograd_tiles(x.size(2), dh), tw = winograd_tiles(x.size(3), dw);
  const int64_t channels = x.size(1);
  const at::Tensor x_cl = x.contiguous(c10::MemoryFormat::ChannelsLast);
  at::Tensor v = at::empty({1, kTaps * channels, x.size(0) * dh * dw * th * tw, 1},
                           x.options().memory_format(c10::MemoryFormat::ChannelsLast));
  active_kernels().winograd_input({x.size(0), x.size(2), x.size(3), dh, dw, th, tw, channels,
                                   x_cl.data_ptr<float>(), v.data_ptr<float>()});
  return v;
}

void winograd_output(const at::Tensor& m, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                     at::IntArrayRef dilation) {
  check_float32_cpu(m, "m");
  check_float32_cpu(bias, "bias");
  check_float32_cpu(out, "out");
  TORCH_CHECK(out.dim() == 4 && out.numel() > 0 &&
                  out.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "winograd_output: out must be a non-empty dense channels_last [N, Cout, H, W], got ",
              out.sizes(), " with strides ", out.strides());
  check_dilation(dilation, "winograd_output");
  const int64_t n = out.size(0), cout = out.size(1), h = out.size(2), w = out.size(3);
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t th = winograd_tiles(h, dh), tw = winograd_tiles(w, dw);
  TORCH_CHECK(m.dim() == 4 && m.size(0) == 1 && m.size(1) == kTaps * cout &&
                  m.size(2) == n * dh * dw * th * tw && m.size(3) == 1 &&
                  m.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "winograd_output: m must be the products [1, ", kTaps * cout, ", ",
              n * dh * dw * th * tw, ", 1] in channels_last for out of size ", out.sizes(),
              " at dilation ", dilation, ", got ", m.sizes(),
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
      {n, h, w, dh, dw, th, tw, cout, m.data_ptr<float>(), b.data_ptr<float>(),
       residual_cl.defined() ? residual_cl.data_ptr<float>() : nullptr, out.data_ptr<float>(),
       relu});
}

int64_t winograd_tiles(int64_t size, int64_t dilation) {
  return ((size + dilation - 1) / dilation + 1) / 2;
}

int64_t winograd_image_tiles(int64_t h, int64_t w, at::IntArrayRef dilation) {
  check_dilation(dilation, "winograd_image_tiles");
  return dilation[0] * dilation[1] * winograd_tiles(h, dilation[0]) *
         winograd_tiles(w, dilation[1]);
}

int64_t winograd_image_bytes(int64_t h, int64_t w, int64_t channels, at::IntArrayRef dilation) {
  return kTaps * winograd_image_tiles(h, w, dilation) * channels * int64_t{sizeof(float)};
}

double winograd_dilated_gain(int64_t h, int64_t w, at::IntArrayRef dilation) {
  check_dilation(dilation, "winograd_dilated_gain");
  TORCH_CHECK(h > 0 && w > 0, "winograd_dilated_gain: the map must be non-empty, got ", h, "x", w);
  // Along one dimension of `size` outputs: the direct convolution's taps that read inside the
  // map (the centre tap always; each outer one for all but d outputs), per output; Winograd's
  // 2x2 tiles cover 2 * d * winograd_tiles(size, d) outputs with 4 / 9 = (2 / 3)^2 of the
  // multiplies each, 2 / 3 per dimension.
  const auto direct = [](int64_t size, int64_t d) {
    return static_cast<double>(size + 2 * std::max<int64_t>(size - d, 0)) / (3.0 * size);
  };
  const auto winograd = [](int64_t size, int64_t d) {
    return 2.0 / 3.0 * static_cast<double>(2 * d * winograd_tiles(size, d)) / size;
  };
  return direct(h, dilation[0]) * direct(w, dilation[1]) /
         (winograd(h, dilation[0]) * winograd(w, dilation[1]));
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
      dilation.size() != 2 || dilation[0] < 1 || dilation[1] < 1 || padding != dilation) {
    return false;
  }
  if (checks::unit_memory_format(x) != c10::MemoryFormat::ChannelsLast) return false;
  const int64_t cin = weight.size(1), cout = weight.size(0), h = x.size(2), w = x.size(3);
  if (h == 0 || w == 0) return false;
  if ((dilation[0] > 1 || dilation[1] > 1) &&
      winograd_dilated_gain(h, w, dilation) < kWinogradMinDilatedGain) {
    return false;
  }
  const int64_t tiles = x.size(0) * winograd_image_tiles(h, w, dilation);
  return x.size(1) == cin && std::min(cin, cout) >= kWinogradMinChannels &&
         tiles * cin * cout >= kWinogradMinWork &&
         winograd_image_bytes(h, w, std::max(cin, cout), dilation) <= kWinogradMaxImageBytes;
}

}  // namespace cpu
}  // namespace fusedres

// Winograd F(2x2, 3x3) inference convolution (winograd_conv.h says what and why).
#include "cpu/winograd_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/checks.h"

namespace fusedres {
namespace cpu {
namespace {

constexpr int64_t kTaps = 16;        // 4x4 transform positions
constexpr int64_t kChannelBlock = 16;  // channels a tile transforms at once: one cache line

struct Tiles {
  int64_t n, h, w, th, tw;
  int64_t count() const { return n * th * tw; }
};

// V[t][p][c] = (B^T d B)[p] of tile t's 4x4 patch d of x (NHWC, zero outside the map).
void input_transform(const float* x, float* v, const Tiles& tiles, int64_t channels) {
  const int64_t count = tiles.count();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    std::array<float, kTaps * kChannelBlock> d;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tiles.th * tiles.tw);
      const int64_t ty = t / tiles.tw % tiles.th, tx = t % tiles.tw;
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, channels - c0);
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t row = 2 * ty - 1 + i;
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t col = 2 * tx - 1 + j;
            float* dst = d.data() + (4 * i + j) * kChannelBlock;
            if (row < 0 || row >= tiles.h || col < 0 || col >= tiles.w) {
              std::fill(dst, dst + cb, 0.0f);
            } else {
              std::memcpy(dst, x + ((n * tiles.h + row) * tiles.w + col) * channels + c0,
                          cb * sizeof(float));
            }
          }
        }
        // B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), then the same along columns.
        std::array<float, kTaps * kChannelBlock> r;
        for (int64_t j = 0; j < 4; ++j) {
          const float* d0 = d.data() + j * kChannelBlock;
          const float* d1 = d0 + 4 * kChannelBlock;
          const float* d2 = d0 + 8 * kChannelBlock;
          const float* d3 = d0 + 12 * kChannelBlock;
          float* r0 = r.data() + j * kChannelBlock;
          for (int64_t c = 0; c < cb; ++c) {
            r0[c] = d0[c] - d2[c];
            r0[c + 4 * kChannelBlock] = d1[c] + d2[c];
            r0[c + 8 * kChannelBlock] = d2[c] - d1[c];
            r0[c + 12 * kChannelBlock] = d1[c] - d3[c];
          }
        }
        for (int64_t i = 0; i < 4; ++i) {
          const float* r0 = r.data() + 4 * i * kChannelBlock;
          const float* r1 = r0 + kChannelBlock;
          const float* r2 = r0 + 2 * kChannelBlock;
          const float* r3 = r0 + 3 * kChannelBlock;
          float* v0 = v + (t * kTaps + 4 * i) * channels + c0;
          float* v1 = v0 + channels;
          float* v2 = v1 + channels;
          float* v3 = v2 + channels;
          for (int64_t c = 0; c < cb; ++c) {
            v0[c] = r0[c] - r2[c];
            v1[c] = r1[c] + r2[c];
            v2[c] = r2[c] - r1[c];
            v3[c] = r1[c] - r3[c];
          }
        }
      }
    }
  });
}

// y's 2x2 block of tile t = A^T m A from the products m[t][p][c], then + bias (+ residual),
// ReLU (bias and residual may be null); blocks past the map's edge (odd H or W) are not
// written.
void output_transform(const float* m, const float* bias,
                      const float* residual, float* y, const Tiles& tiles, int64_t channels,
                      bool relu) {
  at::parallel_for(0, tiles.count(), 16, [&](int64_t begin, int64_t end) {
    std::array<float, 8 * kChannelBlock> s;  // A^T m: 2 rows x 4 columns
    std::array<float, kChannelBlock> out;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tiles.th * tiles.tw);
      const int64_t ty = t / tiles.tw % tiles.th, tx = t % tiles.tw;
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, channels - c0);
        const float* tile = m + t * kTaps * channels + c0;
        // A^T rows: (m0 + m1 + m2, m1 - m2 - m3) down each column j.
        for (int64_t j = 0; j < 4; ++j) {
          const float* m0 = tile + j * channels;
          const float* m1 = m0 + 4 * channels;
          const float* m2 = m0 + 8 * channels;
          const float* m3 = m0 + 12 * channels;
          float* s0 = s.data() + j * kChannelBlock;
          float* s1 = s0 + 4 * kChannelBlock;
          for (int64_t c = 0; c < cb; ++c) {
            s0[c] = m0[c] + m1[c] + m2[c];
            s1[c] = m1[c] - m2[c] - m3[c];
          }
        }
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t row = 2 * ty + i;
          if (row >= tiles.h) break;
          const float* s0 = s.data() + 4 * i * kChannelBlock;
          const float* s1 = s0 + kChannelBlock;
          const float* s2 = s0 + 2 * kChannelBlock;
          const float* s3 = s0 + 3 * kChannelBlock;
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t col = 2 * tx + j;
            if (col >= tiles.w) break;
            for (int64_t c = 0; c < cb; ++c) {
              out[c] = (j == 0 ? s0[c] + s1[c] + s2[c] : s1[c] - s2[c] - s3[c]) +
                       (bias != nullptr ? bias[c0 + c] : 0.0f);
            }
            const int64_t pixel = ((n * tiles.h + row) * tiles.w + col) * channels + c0;
            if (residual != nullptr) {
              for (int64_t c = 0; c < cb; ++c) out[c] += residual[pixel + c];
            }
            if (relu) {
              for (int64_t c = 0; c < cb; ++c) out[c] = std::max(out[c], 0.0f);
            }
            std::memcpy(y + pixel, out.data(), cb * sizeof(float));
          }
        }
      }
    }
  });
}

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
  const Tiles tiles{x.size(0), x.size(2), x.size(3), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  const int64_t channels = x.size(1);
  const at::Tensor x_cl = x.contiguous(c10::MemoryFormat::ChannelsLast);
  at::Tensor v = at::empty({1, kTaps * channels, tiles.count(), 1},
                           x.options().memory_format(c10::MemoryFormat::ChannelsLast));
  input_transform(x_cl.data_ptr<float>(), v.data_ptr<float>(), tiles, channels);
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
  const Tiles tiles{n, h, w, (h + 1) / 2, (w + 1) / 2};
  TORCH_CHECK(m.dim() == 4 && m.size(0) == 1 && m.size(1) == kTaps * cout &&
                  m.size(2) == tiles.count() && m.size(3) == 1 &&
                  m.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "winograd_output: m must be the products [1, ", kTaps * cout, ", ", tiles.count(),
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
  output_transform(m.data_ptr<float>(), b.data_ptr<float>(),
                   residual_cl.defined() ? residual_cl.data_ptr<float>() : nullptr,
                   out.data_ptr<float>(), tiles, cout, relu);
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
  return x.size(1) == cin && std::min(cin, cout) >= kWinogradMinChannels &&
         winograd_image_bytes(x.size(2), x.size(3), std::max(cin, cout)) <=
             kWinogradMaxImageBytes;
}

}  // namespace cpu
}  // namespace fusedres

// Raw-pointer kernels of the Winograd F(2x2, 3x3) transforms (csrc/cpu/winograd_conv.h says what
// they compute and why), float32, vectorised over channels with at::vec::Vectorized<float>.
// Included after cpu/bn_act_kernels.h, once per CPU capability, so the AVX512 build moves a
// 16-channel block of a tap with one instruction where the portable loop needed a memcpy call.
// Every output element is the same sums in the same order as the formulas in winograd_conv.h, in
// every build.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including cpu/winograd_kernels.h"
#endif

#include "cpu/bn_act_kernels.h"

namespace fusedres {
namespace cpu {
inline namespace CPU_CAPABILITY {

using WinogradVec = at::vec::Vectorized<float>;

// One vector of channels [c, c + count) from p (zeros where p is null: outside the map).
inline WinogradVec winograd_load(const float* p, int64_t c, int64_t count) {
  if (p == nullptr) return WinogradVec(0.0f);
  return count == WinogradVec::size() ? WinogradVec::loadu(p + c)
                                      : WinogradVec::loadu(p + c, static_cast<int>(count));
}

inline void winograd_store(const WinogradVec& v, float* p, int64_t count) {
  if (count == WinogradVec::size()) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(count));
  }
}

// Tiles per at::parallel_for task: about 64 KiB of transformed values each.
inline int64_t winograd_grain(int64_t channels) {
  return std::max<int64_t>(1, (int64_t{64} << 10) / (16 * channels * int64_t{sizeof(float)}));
}

inline void winograd_input_kernel(const WinogradInputParams& p) {
  const int64_t C = p.channels, tiles = p.n * p.th * p.tw;
  at::parallel_for(0, tiles, winograd_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (p.th * p.tw), ty = t / p.tw % p.th, tx = t % p.tw;
      // The tile's 4x4 input pixels (row 2*ty - 1 + i, column 2*tx - 1 + j), null outside.
      const float* d[4][4];
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t row = 2 * ty - 1 + i;
        for (int64_t j = 0; j < 4; ++j) {
          const int64_t col = 2 * tx - 1 + j;
          const bool inside = row >= 0 && row < p.h && col >= 0 && col < p.w;
          d[i][j] = inside ? p.x + ((n * p.h + row) * p.w + col) * C : nullptr;
        }
      }
      float* v = p.v + t * 16 * C;
      for (int64_t c = 0; c < C; c += WinogradVec::size()) {
        const int64_t count = std::min<int64_t>(WinogradVec::size(), C - c);
        // B^T d down each column j: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
        WinogradVec r[4][4];
        for (int64_t j = 0; j < 4; ++j) {
          const WinogradVec d0 = winograd_load(d[0][j], c, count);
          const WinogradVec d1 = winograd_load(d[1][j], c, count);
          const WinogradVec d2 = winograd_load(d[2][j], c, count);
          const WinogradVec d3 = winograd_load(d[3][j], c, count);
          r[0][j] = d0 - d2;
          r[1][j] = d1 + d2;
          r[2][j] = d2 - d1;
          r[3][j] = d1 - d3;
        }
        // The same along each row i: V[4*i + j].
        for (int64_t i = 0; i < 4; ++i) {
          float* row = v + 4 * i * C + c;
          winograd_store(r[i][0] - r[i][2], row, count);
          winograd_store(r[i][1] + r[i][2], row + C, count);
          winograd_store(r[i][2] - r[i][1], row + 2 * C, count);
          winograd_store(r[i][1] - r[i][3], row + 3 * C, count);
        }
      }
    }
  });
}

inline void winograd_output_kernel(const WinogradOutputParams& p) {
  const int64_t C = p.channels, tiles = p.n * p.th * p.tw;
  const WinogradVec zero(0.0f);
  at::parallel_for(0, tiles, winograd_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (p.th * p.tw), ty = t / p.tw % p.th, tx = t % p.tw;
      const float* m = p.m + t * 16 * C;
      for (int64_t c = 0; c < C; c += WinogradVec::size()) {
        const int64_t count = std::min<int64_t>(WinogradVec::size(), C - c);
        // A^T m down each column j: (m0 + m1 + m2, m1 - m2 - m3).
        WinogradVec s[2][4];
        for (int64_t j = 0; j < 4; ++j) {
          const WinogradVec m0 = winograd_load(m + j * C, c, count);
          const WinogradVec m1 = winograd_load(m + (4 + j) * C, c, count);
          const WinogradVec m2 = winograd_load(m + (8 + j) * C, c, count);
          const WinogradVec m3 = winograd_load(m + (12 + j) * C, c, count);
          s[0][j] = m0 + m1 + m2;
          s[1][j] = m1 - m2 - m3;
        }
        const WinogradVec bias = winograd_load(p.bias, c, count);
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t row = 2 * ty + i;
          if (row >= p.h) break;  // past an odd map's edge
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t col = 2 * tx + j;
            if (col >= p.w) break;
            WinogradVec out = (j == 0 ? s[i][0] + s[i][1] + s[i][2]
                                      : s[i][1] - s[i][2] - s[i][3]) + bias;
            const int64_t pixel = ((n * p.h + row) * p.w + col) * C;
            if (p.residual != nullptr) out = out + winograd_load(p.residual + pixel, c, count);
            if (p.relu) out = at::vec::maximum(out, zero);
            winograd_store(out, p.y + pixel + c, count);
          }
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

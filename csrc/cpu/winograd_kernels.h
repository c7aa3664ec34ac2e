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

#include <vector>

#include "cpu/bn_act_kernels.h"

namespace fusedres {
namespace cpu {
inline namespace CPU_CAPABILITY {

using WinogradVec = at::vec::Vectorized<float>;

// One vector of channels [c, c + count) from p.
inline WinogradVec winograd_load(const float* p, int64_t c, int64_t count) {
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

// Both transforms copy the parameters they read into locals before their loops: the vector
// stores go through may_alias types, so the compiler reloaded every value read through the
// params (or a lambda's captures) after each store. The input transform also reads the zero
// padding from a row of zeros rather than testing each load, and works on one row of the 4x4
// transform at a time (4 vectors live, not 16, which spilled): its first form ran ~100 cycles per
// 16 stores (AMD EPYC Zen 3, profiled), its branches and spills in the way.

// Row kRow of one tile's transform, V[4*kRow + j] for j = 0..3, over channels [c, c + count),
// from the tile's input pixels d: B^T d's row kRow, (d0 - d2, d1 + d2, d2 - d1, d1 - d3) down
// each column, from the two input rows it reads, then the same along the row.
template <int64_t kRow>
inline void winograd_input_row(const float* const (&d)[4][4], float* v, int64_t C, int64_t c,
                               int64_t count) {
  constexpr int64_t upper = kRow == 0 ? 0 : 1, lower = kRow == 3 ? 3 : 2;
  WinogradVec r[4];
  for (int64_t j = 0; j < 4; ++j) {
    const WinogradVec a = winograd_load(d[upper][j], c, count);
    const WinogradVec b = winograd_load(d[lower][j], c, count);
    r[j] = kRow == 1 ? a + b : (kRow == 2 ? b - a : a - b);
  }
  float* row = v + 4 * kRow * C + c;
  winograd_store(r[0] - r[2], row, count);
  winograd_store(r[1] + r[2], row + C, count);
  winograd_store(r[2] - r[1], row + 2 * C, count);
  winograd_store(r[1] - r[3], row + 3 * C, count);
}

inline void winograd_input_channels(const float* const (&d)[4][4], float* v, int64_t C, int64_t c,
                                    int64_t count) {
  winograd_input_row<0>(d, v, C, c, count);
  winograd_input_row<1>(d, v, C, c, count);
  winograd_input_row<2>(d, v, C, c, count);
  winograd_input_row<3>(d, v, C, c, count);
}

// zeros: C floats of 0, read for the pixels outside the map.
inline void winograd_input_tiles(const WinogradInputParams& p, const float* zeros, int64_t begin,
                                 int64_t end) {
  const int64_t C = p.channels, h = p.h, w = p.w, dh = p.dh, dw = p.dw, th = p.th, tw = p.tw;
  const int64_t full = C - C % WinogradVec::size();  // channels in whole vectors
  const float* const x = p.x;
  float* const v_all = p.v;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (dh * dw * th * tw), a = t / (dw * th * tw) % dh,
                  b = t / (th * tw) % dw, ty = t / tw % th, tx = t % tw;
    // The tile's 4x4 input pixels, in its phase (a, b): row a + dh * (2*ty - 1 + i), column
    // b + dw * (2*tx - 1 + j).
    const float* d[4][4];
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t row = a + dh * (2 * ty - 1 + i);
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t col = b + dw * (2 * tx - 1 + j);
        const bool inside = row >= 0 && row < h && col >= 0 && col < w;
        d[i][j] = inside ? x + ((n * h + row) * w + col) * C : zeros;
      }
    }
    float* const v = v_all + t * 16 * C;
    for (int64_t c = 0; c < full; c += WinogradVec::size()) {
      winograd_input_channels(d, v, C, c, WinogradVec::size());
    }
    if (full < C) winograd_input_channels(d, v, C, full, C - full);
  }
}

inline void winograd_input_kernel(const WinogradInputParams& p) {
  const std::vector<float> zeros(p.channels, 0.0f);
  at::parallel_for(0, p.n * p.dh * p.dw * p.th * p.tw, winograd_grain(p.channels),
                   [&](int64_t begin, int64_t end) {
                     winograd_input_tiles(p, zeros.data(), begin, end);
                   });
}

inline void winograd_output_tiles(const WinogradOutputParams& p, int64_t begin, int64_t end) {
  const int64_t C = p.channels, h = p.h, w = p.w, dh = p.dh, dw = p.dw, th = p.th, tw = p.tw;
  const float* const m_all = p.m;
  const float* const bias_all = p.bias;
  const float* const residual = p.residual;
  float* const y = p.y;
  const bool relu = p.relu;
  const WinogradVec zero(0.0f);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / (dh * dw * th * tw), a = t / (dw * th * tw) % dh,
                  b = t / (th * tw) % dw, ty = t / tw % th, tx = t % tw;
    const float* const m = m_all + t * 16 * C;
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
      const WinogradVec bias = bias_all == nullptr ? zero : winograd_load(bias_all, c, count);
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t row = a + dh * (2 * ty + i);
        if (row >= h) break;  // past the map's edge (an odd map, a phase with fewer rows)
        for (int64_t j = 0; j < 2; ++j) {
          const int64_t col = b + dw * (2 * tx + j);
          if (col >= w) break;
          WinogradVec out = (j == 0 ? s[i][0] + s[i][1] + s[i][2]
                                    : s[i][1] - s[i][2] - s[i][3]) + bias;
          const int64_t pixel = ((n * h + row) * w + col) * C;
          if (residual != nullptr) out = out + winograd_load(residual + pixel, c, count);
          if (relu) out = at::vec::maximum(out, zero);
          winograd_store(out, y + pixel + c, count);
        }
      }
    }
  }
}

inline void winograd_output_kernel(const WinogradOutputParams& p) {
  at::parallel_for(0, p.n * p.dh * p.dw * p.th * p.tw, winograd_grain(p.channels),
                   [&p](int64_t begin, int64_t end) { winograd_output_tiles(p, begin, end); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

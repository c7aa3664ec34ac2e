// Raw-pointer CPU kernel of the stem's max pool in inference: channels_last, values only.
//
// ATen's CPU max_pool2d always runs max_pool2d_with_indices and drops the indices: an int64 per
// output element written (twice the bytes of a float output, four times a bf16 one) that no
// inference needs. This kernel writes the values only, one pass over the input, vectorised over
// channels. Included after cpu/bn_act_kernels.h, once per CPU capability (its Io and
// dispatch_dtype).
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including cpu/pool_kernels.h"
#endif

#include "cpu/bn_act_kernels.h"

namespace fusedres {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Channels [c, c + U * kStep) of one output pixel: the maximum over its `count` taps inside the
// input (offsets `inside`). U register pairs of accumulators, so the U independent dependency
// chains hide the latency of the NaN-propagating maximum.
template <typename T, int U>
inline void max_over_taps(const T* image, const int64_t* inside, int64_t count, int64_t c,
                          T* out) {
  using IO = Io<T>;
  using Vec = typename IO::Vec;
  Vec acc[2 * U];
  for (int u = 0; u < 2 * U; ++u) acc[u] = Vec(-std::numeric_limits<typename IO::acc_t>::infinity());
  for (int64_t t = 0; t < count; ++t) {
    const T* src = image + inside[t] + c;
    for (int u = 0; u < U; ++u) {
      Vec a, b;
      IO::load(src + u * IO::kStep, a, b);
      // at::vec::maximum propagates NaN, as ATen's max pool does.
      acc[2 * u] = at::vec::maximum(acc[2 * u], a);
      acc[2 * u + 1] = at::vec::maximum(acc[2 * u + 1], b);
    }
  }
  for (int u = 0; u < U; ++u) IO::store(out + c + u * IO::kStep, acc[2 * u], acc[2 * u + 1]);
}

template <typename T>
void max_pool_nhwc(const MaxPoolParams& p) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  constexpr int kUnroll = 4;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t C = p.C;
  const int64_t taps = p.kh * p.kw;
  const int64_t rows = p.N * p.Ho * p.Wo;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C * taps, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Offsets of the taps of one output pixel that fall inside the input.
    std::vector<int64_t> inside(taps);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ow = r % p.Wo, oh = (r / p.Wo) % p.Ho, n = r / (p.Wo * p.Ho);
      const T* image = x + n * p.H * p.W * C;
      int64_t count = 0;
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t ih = oh * p.sh - p.ph + i * p.dh;
        if (ih < 0 || ih >= p.H) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          const int64_t iw = ow * p.sw - p.pw + j * p.dw;
          if (iw >= 0 && iw < p.W) inside[count++] = (ih * p.W + iw) * C;
        }
      }
      T* out = y + r * C;
      int64_t c = 0;
      for (; c + kUnroll * IO::kStep <= C; c += kUnroll * IO::kStep) {
        max_over_taps<T, kUnroll>(image, inside.data(), count, c, out);
      }
      for (; c + IO::kStep <= C; c += IO::kStep) {
        max_over_taps<T, 1>(image, inside.data(), count, c, out);
      }
      for (; c < C; ++c) {
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t t = 0; t < count; ++t) {
          const acc_t v = IO::get(image + inside[t], c);
          if (v > m || std::isnan(v)) m = v;
        }
        out[c] = static_cast<T>(m);
      }
    }
  });
}

inline void max_pool_kernel(const MaxPoolParams& p, c10::ScalarType dtype) {
  dispatch_dtype(dtype, "fusedres::max_pool2d",
                 [&](auto tag) { max_pool_nhwc<decltype(tag)>(p); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

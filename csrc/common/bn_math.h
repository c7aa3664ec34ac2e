// Per-element and per-channel math of the fused BatchNorm unit, shared by csrc/cpu (compiled by the
// host compiler) and csrc/cuda (compiled by nvcc), so the CPU tests exercise the formulas the GPU runs.
// No torch headers here.
//
// The unit (docs/design.md section 2), per channel c with M = N*H*W elements:
//   forward   y  = act(z * scale + shift + residual),  scale = gamma*invstd, shift = beta - mean*scale
//   backward  g  = dy * (y > 0)                         (dresidual = g)
//             dbeta = sum g,  dgamma = invstd * sum g*(z - mean)
//             dz = a*g + b*z + c  with per-channel a, b, c from bwd_coefficients().
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FUSEDRES_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_HD inline
#endif

namespace fusedres {
namespace math {

// ReLU that lets NaN through, as torch.relu does (a NaN compares false, so it is kept).
template <typename T>
FUSEDRES_HD T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;
}

// y = act(z*scale + shift + residual); pass residual = 0 when the unit has none.
template <typename T>
FUSEDRES_HD T bn_act(T z, T scale, T shift, T residual, bool relu) {
  T v = z * scale + shift + residual;
  return relu ? relu_keep_nan(v) : v;
}

// Gradient through the ReLU, read off the saved output: torch's threshold_backward rule
// (y <= 0 -> 0, so a NaN output passes its gradient through).
template <typename T>
FUSEDRES_HD T relu_grad(T dy, T y, bool relu) {
  return (relu && y <= T(0)) ? T(0) : dy;
}

// Per-channel coefficients of dz = a*g + b*z + c.
//   sum_g    = sum over the channel of g            (= dbeta)
//   sum_g_zc = sum over the channel of g*(z - mean)  (dgamma = invstd * sum_g_zc)
// Training (batch statistics, which depend on z):
//   dz = gamma*invstd * (g - sum_g/M - (z-mean)*invstd^2 * sum_g_zc/M)
// Eval (running statistics are constants): dz = gamma*invstd * g.
template <typename T>
struct BwdCoefficients {
  T a, b, c;
};

template <typename T>
FUSEDRES_HD BwdCoefficients<T> bwd_coefficients(T gamma, T mean, T invstd, T sum_g, T sum_g_zc,
                                                T count, bool training) {
  BwdCoefficients<T> k;
  k.a = gamma * invstd;
  if (training) {
    const T inv_count = T(1) / count;
    k.b = -k.a * invstd * invstd * sum_g_zc * inv_count;
    k.c = -k.a * sum_g * inv_count - k.b * mean;
  } else {
    k.b = T(0);
    k.c = T(0);
  }
  return k;
}

// Chan et al.'s merge of two (count, mean, M2) partial statistics: numerically stable, so tiles can
// be reduced in any order. M2 is the sum of squared deviations from the mean.
template <typename T>
FUSEDRES_HD void welford_merge(T& count, T& mean, T& m2, T other_count, T other_mean, T other_m2) {
  const T total = count + other_count;
  if (total == T(0)) return;
  const T delta = other_mean - mean;
  const T w = other_count / total;
  mean += delta * w;
  m2 += other_m2 + delta * delta * count * w;
  count = total;
}

}  // namespace math
}  // namespace fusedres

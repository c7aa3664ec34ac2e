// Raw-pointer CPU kernels of the BatchNorm unit, vectorised with at::vec::Vectorized and
// parallelised with at::parallel_for. Compiled once per CPU capability: include this file only from
// a bn_act_kernels_*.cpp that defines CPU_CAPABILITY first, so every symbol lands in its
// own `inline namespace CPU_CAPABILITY` (as in ATen) and the variants never collide at link time.
//
// Precision: activations load in their storage dtype and compute in acc_t (float, or double for
// double); per-channel sums are accumulated in acc_t vectors over a tile of at most kTileBytes and
// flushed into double, so the error does not grow with N*H*W. Per-channel coefficients are computed
// in double with the formulas of common/bn_math.h, whose scalar versions also handle the tails.
//
// Memory passes (M = N*H*W per channel):
//   bn_stats    one read of z (each tile's two passes run in L1 or L2).
//   bn_act_fwd  read z (+ residual), write y (and, for the mask variant, 1/8 byte per element).
//   bn_act_bwd  pass 1 reads dy, y, z and writes dresidual (and dz in eval mode, which is then
//               done); pass 2 (training) reads g back (dresidual, or dy and y) and z, writes dz.
//               NCHW runs both passes channel by channel, so pass 2 re-reads a channel that pass 1
//               left in L2 whenever N*H*W elements of the three inputs fit there.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including cpu/bn_act_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/bn_math.h"
#include "cpu/kernels.h"

namespace fusedres {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Bytes of one activation stream per tile: a tile of z stays in L1 between the two passes of
// bn_stats, and float accumulators never sum more than a few thousand terms before a double flush.
constexpr int64_t kTileBytes = 16 * 1024;
// Elements per at::parallel_for task: large enough to amortise scheduling.
constexpr int64_t kGrainElems = 32 * 1024;

template <typename T>
struct AccType {
  using type = T;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <>
struct AccType<c10::Half> {
  using type = float;
};

// Loads and stores activations two accumulator vectors at a time: one Vectorized<BFloat16> holds
// exactly two Vectorized<float>, so reduced types convert without a scratch buffer.
template <typename T>
struct Io {
  using acc_t = typename AccType<T>::type;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static constexpr bool kReduced = !std::is_same_v<T, acc_t>;

  static inline void load(const T* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float<T>(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    }
  }
  static inline void store(T* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + Vec::size());
    }
  }
  static inline acc_t get(const T* p, int64_t i) { return static_cast<acc_t>(p[i]); }
};

template <typename V>
inline double hsum(const V& v) {
  typename V::value_type buf[V::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

// ReLU keeping NaN (math::relu_keep_nan): a NaN compares false, so it is not replaced.
template <typename V>
inline V relu_keep_nan(const V& v) {
  const V zero(0);
  return V::blendv(v, zero, v < zero);
}

// threshold_backward's rule (math::relu_grad): the gradient is dropped where y <= 0.
template <bool RELU, typename V>
inline V masked_grad(const V& dy, const V& y) {
  if constexpr (RELU) {
    const V zero(0);
    return V::blendv(dy, zero, y <= zero);
  } else {
    return dy;
  }
}

template <typename T>
int64_t tile_elems() {
  return std::max<int64_t>(Io<T>::kStep, kTileBytes / static_cast<int64_t>(sizeof(T)));
}

// Rows per NHWC tile. Each tile ends in a scalar per-channel flush into double, so an L1-sized
// tile (4 rows at C=1024) spent a quarter of its time there; an L2-sized tile keeps the flush
// rare while the tile's second pass in bn_stats still reads from cache. The row cap keeps float
// accumulators to at most kMaxTileRows terms.
constexpr int64_t kNhwcTileBytes = 128 * 1024;
// Rows bn_stats folds into its register accumulators before storing them back, so the
// per-channel accumulator arrays cost one load and store per kRowBlock rows, not per row. (The
// backward's pass 1 measured slower this way: it already does three loads and a store per
// accumulator update, and four rows at once make sixteen memory streams.)
constexpr int64_t kRowBlock = 4;
constexpr int64_t kMaxTileRows = 1024;

template <typename T>
int64_t nhwc_tile_rows(int64_t C) {
  const int64_t rows = kNhwcTileBytes / (std::max<int64_t>(C, 1) * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(rows, 1, kMaxTileRows);
}

// ============================================================================================
// bn_stats
// ============================================================================================

// Adds a pair of vectors, centred on (ma, mb), to the deviation sums (d0, d1) and the squared
// deviation sums (q0, q1): the second pass of the shifted two-pass variance.
template <typename Vec>
inline void add_centred(Vec a, Vec b, const Vec& ma, const Vec& mb, Vec& d0, Vec& d1, Vec& q0,
                        Vec& q1) {
  a = a - ma;
  b = b - mb;
  d0 = d0 + a;
  d1 = d1 + b;
  q0 = at::vec::fmadd(a, a, q0);
  q1 = at::vec::fmadd(b, b, q1);
}

// Mean and M2 (sum of squared deviations) of a dense run of n >= 1 elements. The run is small
// enough to stay in L1, so the second, centred pass costs no memory traffic; the deviations' own
// sum corrects for the rounding of the first-pass mean.
template <typename T>
inline void run_stats(const T* p, int64_t n, double& mean, double& m2) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec s0(0), s1(0);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a, b;
    IO::load(p + i, a, b);
    s0 = s0 + a;
    s1 = s1 + b;
  }
  double sum = hsum(s0 + s1);
  for (; i < n; ++i) sum += IO::get(p, i);
  const acc_t m = static_cast<acc_t>(sum / static_cast<double>(n));
  const Vec mv(m);
  Vec d0(0), d1(0), q0(0), q1(0);
  i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a, b;
    IO::load(p + i, a, b);
    add_centred(a, b, mv, mv, d0, d1, q0, q1);
  }
  double sd = hsum(d0 + d1), sq = hsum(q0 + q1);
  for (; i < n; ++i) {
    const double d = static_cast<double>(IO::get(p, i) - m);
    sd += d;
    sq += d * d;
  }
  mean = static_cast<double>(m) + sd / static_cast<double>(n);
  m2 = std::max(0.0, sq - sd * sd / static_cast<double>(n));
}

// Mean and biased variance of channel c of an NCHW tensor z [N, C, HW], in double: its N planes
// in L1-sized runs (run_stats), merged in a fixed order.
template <typename T>
void channel_stats_nchw(const T* z, int64_t N, int64_t C, int64_t HW, int64_t c, double& mean,
                        double& var) {
  const int64_t tile = tile_elems<T>();
  double count = 0, m2 = 0;
  mean = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* plane = z + (n * C + c) * HW;
    for (int64_t t0 = 0; t0 < HW; t0 += tile) {
      const int64_t len = std::min(tile, HW - t0);
      double tmean, tm2;
      run_stats(plane + t0, len, tmean, tm2);
      math::welford_merge<double>(count, mean, m2, static_cast<double>(len), tmean, tm2);
    }
  }
  var = m2 / count;
}

template <typename T>
void bn_stats_nchw(const StatsParams& p) {
  using acc_t = typename Io<T>::acc_t;
  const int64_t N = p.g.N, C = p.g.C, HW = p.g.HW;
  const T* z = static_cast<const T*>(p.z);
  acc_t* mean_out = static_cast<acc_t*>(p.mean);
  acc_t* var_out = static_cast<acc_t*>(p.var);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double mean, var;
      channel_stats_nchw(z, N, C, HW, c, mean, var);
      mean_out[c] = static_cast<acc_t>(mean);
      var_out[c] = static_cast<acc_t>(var);
    }
  });
}

// Splits [0, rows) into one contiguous chunk per thread; the partial results are merged in chunk
// order afterwards, so the result does not depend on thread scheduling.
inline int64_t num_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}

template <typename T>
void bn_stats_nhwc(const StatsParams& p) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = p.g.C, rows = p.g.N * p.g.HW;
  const T* z = static_cast<const T*>(p.z);
  const int64_t chunks = num_chunks(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const int64_t tile_rows = nhwc_tile_rows<T>(C);
  std::vector<double> part_count(chunks, 0.0), part_mean(chunks * C, 0.0), part_m2(chunks * C, 0.0);

  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> tsum(C), tdev(C), tsq(C);
    for (int64_t k = k0; k < k1; ++k) {
      double* mean = part_mean.data() + k * C;
      double* m2 = part_m2.data() + k * C;
      double count = 0;
      const int64_t r_end = std::min(rows, (k + 1) * rows_per_chunk);
      for (int64_t r0 = k * rows_per_chunk; r0 < r_end; r0 += tile_rows) {
        const int64_t nr = std::min(tile_rows, r_end - r0);
        std::fill(tsum.begin(), tsum.end(), acc_t(0));
        std::fill(tdev.begin(), tdev.end(), acc_t(0));
        std::fill(tsq.begin(), tsq.end(), acc_t(0));
        for (int64_t rb = r0; rb < r0 + nr; rb += kRowBlock) {
          const int64_t rb_end = std::min(rb + kRowBlock, r0 + nr);
          int64_t c = 0;
          for (; c + IO::kStep <= C; c += IO::kStep) {
            Vec s0 = Vec::loadu(tsum.data() + c), s1 = Vec::loadu(tsum.data() + c + Vec::size());
            for (int64_t r = rb; r < rb_end; ++r) {
              Vec a, b;
              IO::load(z + r * C + c, a, b);
              s0 = s0 + a;
              s1 = s1 + b;
            }
            s0.store(tsum.data() + c);
            s1.store(tsum.data() + c + Vec::size());
          }
          for (int64_t r = rb; r < rb_end; ++r) {
            for (int64_t ct = c; ct < C; ++ct) tsum[ct] += IO::get(z + r * C, ct);
          }
        }
        const acc_t inv_nr = acc_t(1) / static_cast<acc_t>(nr);
        for (int64_t c = 0; c < C; ++c) tsum[c] *= inv_nr;  // now the tile's first-pass mean
        for (int64_t rb = r0; rb < r0 + nr; rb += kRowBlock) {
          const int64_t rb_end = std::min(rb + kRowBlock, r0 + nr);
          int64_t c = 0;
          for (; c + IO::kStep <= C; c += IO::kStep) {
            const Vec m0 = Vec::loadu(tsum.data() + c), m1 = Vec::loadu(tsum.data() + c + Vec::size());
            Vec d0 = Vec::loadu(tdev.data() + c), d1 = Vec::loadu(tdev.data() + c + Vec::size());
            Vec q0 = Vec::loadu(tsq.data() + c), q1 = Vec::loadu(tsq.data() + c + Vec::size());
            for (int64_t r = rb; r < rb_end; ++r) {
              Vec a, b;
              IO::load(z + r * C + c, a, b);
              add_centred(a, b, m0, m1, d0, d1, q0, q1);
            }
            d0.store(tdev.data() + c);
            d1.store(tdev.data() + c + Vec::size());
            q0.store(tsq.data() + c);
            q1.store(tsq.data() + c + Vec::size());
          }
          for (int64_t r = rb; r < rb_end; ++r) {
            for (int64_t ct = c; ct < C; ++ct) {
              const acc_t d = IO::get(z + r * C, ct) - tsum[ct];
              tdev[ct] += d;
              tsq[ct] += d * d;
            }
          }
        }
        const double dnr = static_cast<double>(nr);
        for (int64_t c = 0; c < C; ++c) {
          const double sd = tdev[c];
          const double tmean = static_cast<double>(tsum[c]) + sd / dnr;
          const double tm2 = std::max(0.0, static_cast<double>(tsq[c]) - sd * sd / dnr);
          double cnt = count;  // every channel has the same count; merge() advances a copy
          math::welford_merge<double>(cnt, mean[c], m2[c], dnr, tmean, tm2);
        }
        count += dnr;
      }
      part_count[k] = count;
    }
  });

  acc_t* mean_out = static_cast<acc_t*>(p.mean);
  acc_t* var_out = static_cast<acc_t*>(p.var);
  for (int64_t c = 0; c < C; ++c) {
    double count = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      math::welford_merge<double>(count, mean, m2, part_count[k], part_mean[k * C + c],
                                  part_m2[k * C + c]);
    }
    mean_out[c] = static_cast<acc_t>(mean);
    var_out[c] = static_cast<acc_t>(m2 / count);
  }
}

// ============================================================================================
// bn_act_fwd
// ============================================================================================

// y = act(z*scale + shift + residual) over a dense run with one scale/shift per element lane:
// `s` and `t` return the vector (at c) and scalar (at c) coefficients, so the NCHW caller passes
// broadcast constants and the NHWC caller per-channel arrays.
template <typename T, bool HAS_RESIDUAL, bool RELU, typename VecCoef, typename ScalarCoef>
inline void fwd_run(const T* z, const T* res, T* y, int64_t n, VecCoef vcoef, ScalarCoef scoef) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a, b, sa, sb, ta, tb;
    IO::load(z + i, a, b);
    vcoef(i, sa, sb, ta, tb);
    a = at::vec::fmadd(a, sa, ta);
    b = at::vec::fmadd(b, sb, tb);
    if constexpr (HAS_RESIDUAL) {
      Vec ra, rb;
      IO::load(res + i, ra, rb);
      a = a + ra;
      b = b + rb;
    }
    if constexpr (RELU) {
      a = relu_keep_nan(a);
      b = relu_keep_nan(b);
    }
    IO::store(y + i, a, b);
  }
  for (; i < n; ++i) {
    acc_t s, t;
    scoef(i, s, t);
    const acc_t r = HAS_RESIDUAL ? IO::get(res, i) : acc_t(0);
    y[i] = static_cast<T>(math::bn_act<acc_t>(IO::get(z, i), s, t, r, RELU));
  }
}

template <typename T, bool HAS_RESIDUAL, bool RELU>
void bn_act_fwd_impl(const FwdParams& p) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t N = p.g.N, C = p.g.C, HW = p.g.HW;
  const T* z = static_cast<const T*>(p.z);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);
  if (!p.g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t nc = b0; nc < b1; ++nc) {
        const int64_t c = nc % C, off = nc * HW;
        const acc_t s = scale[c], t = shift[c];
        const Vec vs(s), vt(t);
        fwd_run<T, HAS_RESIDUAL, RELU>(
            z + off, HAS_RESIDUAL ? res + off : nullptr, y + off, HW,
            [&](int64_t, Vec& sa, Vec& sb, Vec& ta, Vec& tb) { sa = sb = vs; ta = tb = vt; },
            [&](int64_t, acc_t& so, acc_t& to) { so = s; to = t; });
      }
    });
  } else {
    const int64_t rows = N * HW;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * C;
        fwd_run<T, HAS_RESIDUAL, RELU>(
            z + off, HAS_RESIDUAL ? res + off : nullptr, y + off, C,
            [&](int64_t c, Vec& sa, Vec& sb, Vec& ta, Vec& tb) {
              sa = Vec::loadu(scale + c);
              sb = Vec::loadu(scale + c + Vec::size());
              ta = Vec::loadu(shift + c);
              tb = Vec::loadu(shift + c + Vec::size());
            },
            [&](int64_t c, acc_t& so, acc_t& to) { so = scale[c]; to = shift[c]; });
      }
    });
  }
}

// Appends gate bits, least significant first, to consecutive bytes of the packed ReLU mask. A
// writer that starts on a byte boundary and stops on one (or at the tensor's end) owns its bytes,
// so parallel chunks of whole bytes need no synchronisation.
class MaskWriter {
 public:
  explicit MaskWriter(uint8_t* out) : out_(out) {}

  // The gates of n stored outputs: 1 where the backward passes the gradient (not y <= 0).
  template <typename T>
  void put_gates(const T* y, int64_t n) {
    using acc_t = typename Io<T>::acc_t;
    for (int64_t i = 0; i < n; ++i) {
      bits_ |= static_cast<unsigned>(!(static_cast<acc_t>(y[i]) <= acc_t(0))) << count_;
      if (++count_ == 8) {
        *out_++ = static_cast<uint8_t>(bits_);
        bits_ = 0;
        count_ = 0;
      }
    }
  }

  // Writes a last partial byte (padding bits 0).
  void flush() {
    if (count_ != 0) *out_ = static_cast<uint8_t>(bits_);
  }

 private:
  uint8_t* out_;
  unsigned bits_ = 0;
  int count_ = 0;
};

// bn_act_fwd with ReLU plus the packed mask of y. Threads split the tensor into chunks of whole
// mask bytes in memory order; within a chunk, runs of constant layout (a channel's H*W plane in
// NCHW, a row's channels in NHWC) go through fwd_run, and the gates are read back from the y just
// stored (still in L1), so the mask is exactly y's, after rounding to the storage dtype.
template <typename T, bool HAS_RESIDUAL>
void bn_act_fwd_mask_impl(const FwdParams& p) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = p.g.C, HW = p.g.HW, numel = p.g.N * C * HW;
  const T* z = static_cast<const T*>(p.z);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);
  at::parallel_for(0, (numel + 7) / 8, kGrainElems / 8, [&](int64_t b0, int64_t b1) {
    MaskWriter bits(p.mask + b0);
    const int64_t e_end = std::min(numel, b1 * 8);
    for (int64_t e = b0 * 8; e < e_end;) {
      int64_t len;
      if (p.g.channels_last) {
        const int64_t c = e % C;
        len = std::min(C - c, e_end - e);
        fwd_run<T, HAS_RESIDUAL, true>(
            z + e, HAS_RESIDUAL ? res + e : nullptr, y + e, len,
            [&](int64_t i, Vec& sa, Vec& sb, Vec& ta, Vec& tb) {
              sa = Vec::loadu(scale + c + i);
              sb = Vec::loadu(scale + c + i + Vec::size());
              ta = Vec::loadu(shift + c + i);
              tb = Vec::loadu(shift + c + i + Vec::size());
            },
            [&](int64_t i, acc_t& so, acc_t& to) { so = scale[c + i]; to = shift[c + i]; });
      } else {
        const int64_t plane = e / HW, c = plane % C;
        len = std::min(HW - (e - plane * HW), e_end - e);
        const acc_t s = scale[c], t = shift[c];
        const Vec vs(s), vt(t);
        fwd_run<T, HAS_RESIDUAL, true>(
            z + e, HAS_RESIDUAL ? res + e : nullptr, y + e, len,
            [&](int64_t, Vec& sa, Vec& sb, Vec& ta, Vec& tb) { sa = sb = vs; ta = tb = vt; },
            [&](int64_t, acc_t& so, acc_t& to) { so = s; to = t; });
      }
      bits.put_gates(y + e, len);
      e += len;
    }
    bits.flush();
  });
}

template <typename T>
void bn_act_fwd_typed(const FwdParams& p) {
  const bool has_res = p.residual != nullptr;
  if (p.mask != nullptr) {
    return has_res ? bn_act_fwd_mask_impl<T, true>(p) : bn_act_fwd_mask_impl<T, false>(p);
  }
  if (has_res && p.relu) return bn_act_fwd_impl<T, true, true>(p);
  if (has_res) return bn_act_fwd_impl<T, true, false>(p);
  if (p.relu) return bn_act_fwd_impl<T, false, true>(p);
  return bn_act_fwd_impl<T, false, false>(p);
}

// ============================================================================================
// bn_train_fwd: statistics, coefficients and apply of a training forward
// ============================================================================================

// Writes channel c's mean, var and invstd and returns its scale and shift, all from the batch
// statistics in double (common/bn_math.h's forward: scale = gamma*invstd, shift = beta - mean*scale).
template <typename acc_t>
inline void train_channel_coefficients(const TrainFwdParams& p, int64_t c, double mean, double var,
                                       acc_t& scale, acc_t& shift) {
  const double invstd = 1.0 / std::sqrt(var + p.eps);
  const double gamma = p.gamma != nullptr ? static_cast<double>(static_cast<const acc_t*>(p.gamma)[c]) : 1.0;
  const double beta = p.beta != nullptr ? static_cast<double>(static_cast<const acc_t*>(p.beta)[c]) : 0.0;
  static_cast<acc_t*>(p.mean)[c] = static_cast<acc_t>(mean);
  static_cast<acc_t*>(p.var)[c] = static_cast<acc_t>(var);
  static_cast<acc_t*>(p.invstd)[c] = static_cast<acc_t>(invstd);
  const double s = gamma * invstd;
  scale = static_cast<acc_t>(s);
  shift = static_cast<acc_t>(beta - mean * s);
}

// NCHW: one task per channel does its statistics and then its apply, while the channel's planes
// are still in L2.
template <typename T, bool HAS_RESIDUAL, bool RELU>
void bn_train_fwd_nchw(const TrainFwdParams& p) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t N = p.g.N, C = p.g.C, HW = p.g.HW;
  const T* z = static_cast<const T*>(p.z);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double mean, var;
      channel_stats_nchw(z, N, C, HW, c, mean, var);
      acc_t s, t;
      train_channel_coefficients<acc_t>(p, c, mean, var, s, t);
      const Vec vs(s), vt(t);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * HW;
        fwd_run<T, HAS_RESIDUAL, RELU>(
            z + off, HAS_RESIDUAL ? res + off : nullptr, y + off, HW,
            [&](int64_t, Vec& sa, Vec& sb, Vec& ta, Vec& tb) { sa = sb = vs; ta = tb = vt; },
            [&](int64_t, acc_t& so, acc_t& to) { so = s; to = t; });
      }
    }
  });
}

// NHWC: the statistics sweep, the coefficients, then bn_act_fwd's sweep.
template <typename T>
void bn_train_fwd_nhwc(const TrainFwdParams& p) {
  using acc_t = typename Io<T>::acc_t;
  const int64_t C = p.g.C;
  bn_stats_nhwc<T>(StatsParams{p.g, p.z, p.mean, p.var});
  std::vector<acc_t> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    train_channel_coefficients<acc_t>(p, c, static_cast<const acc_t*>(p.mean)[c],
                                      static_cast<const acc_t*>(p.var)[c], scale[c], shift[c]);
  }
  FwdParams f{p.g, p.z, scale.data(), shift.data(), p.residual, p.y, p.relu};
  bn_act_fwd_typed<T>(f);
}

template <typename T>
void bn_train_fwd_typed(const TrainFwdParams& p) {
  if (p.g.channels_last) return bn_train_fwd_nhwc<T>(p);
  const bool has_res = p.residual != nullptr;
  if (has_res && p.relu) return bn_train_fwd_nchw<T, true, true>(p);
  if (has_res) return bn_train_fwd_nchw<T, true, false>(p);
  if (p.relu) return bn_train_fwd_nchw<T, false, true>(p);
  return bn_train_fwd_nchw<T, false, false>(p);
}

// ============================================================================================
// bn_act_bwd
// ============================================================================================

// Per-channel coefficients of dz = a*g + b*(z - mean) + c0. This is math::bwd_coefficients'
// a*g + b*z + c rewritten around the mean (c0 = c + b*mean, formed in double): with a large mean
// the uncentred form would lose the small b*(z - mean) term to cancellation in float.
struct DzCoef {
  double a, b, c0;
};

inline DzCoef dz_coefficients(double gamma, double mean, double invstd, double sum_g,
                              double sum_g_zc, double count, bool training) {
  const auto k = math::bwd_coefficients<double>(gamma, mean, invstd, sum_g, sum_g_zc, count,
                                                training);
  return {k.a, k.b, k.c + k.b * mean};
}

// The ReLU gate of the backward, g = gate <= 0 ? 0 : dy, for a run of elements: read off the saved
// output y (OutputGate) or off the packed mask of bn_act_fwd_mask (MaskGate, gates 0 or 1).
// at(off) is the gate of the run starting `off` elements further in memory order.
template <typename T>
struct OutputGate {
  using Vec = typename Io<T>::Vec;
  using acc_t = typename Io<T>::acc_t;
  const T* y;

  OutputGate at(int64_t off) const { return {y + off}; }
  void load(int64_t i, Vec& a, Vec& b) const { Io<T>::load(y + i, a, b); }
  acc_t get(int64_t i) const { return Io<T>::get(y, i); }
};

template <typename T>
struct MaskGate {
  using Vec = typename Io<T>::Vec;
  using acc_t = typename Io<T>::acc_t;
  const uint8_t* mask;
  int64_t first;  // bit index (memory-order element index) of the run's element 0

  MaskGate at(int64_t off) const { return {mask, first + off}; }
  acc_t get(int64_t i) const {
    const int64_t e = first + i;
    return ((mask[e >> 3] >> (e & 7)) & 1) ? acc_t(1) : acc_t(0);
  }
  void load(int64_t i, Vec& a, Vec& b) const {
    acc_t lanes[Io<T>::kStep];
    for (int64_t j = 0; j < Io<T>::kStep; ++j) lanes[j] = get(i + j);
    a = Vec::loadu(lanes);
    b = Vec::loadu(lanes + Vec::size());
  }
};

// Pass 1 over a dense run: accumulates sum g and sum g*(z - mean) into (sg, sgz) vectors (`mv`
// gives the mean lanes), stores g into dres when WRITE_DRES, and dz = a*g when EVAL_DZ.
template <typename T, bool RELU, bool WRITE_DRES, bool EVAL_DZ, typename Gate, typename Lanes>
inline void bwd_reduce_run(const T* dy, const Gate& gate, const T* z, T* dres, T* dz, int64_t n,
                           Lanes lanes, typename Io<T>::Vec& sg0, typename Io<T>::Vec& sg1,
                           typename Io<T>::Vec& sgz0, typename Io<T>::Vec& sgz1) {
  using IO = Io<T>;
  using Vec = typename IO::Vec;
  for (int64_t i = 0; i + IO::kStep <= n; i += IO::kStep) {
    Vec da, db, ya, yb, za, zb, ma, mb, aa, ab;
    IO::load(dy + i, da, db);
    if constexpr (RELU) gate.load(i, ya, yb);
    IO::load(z + i, za, zb);
    lanes(i, ma, mb, aa, ab);
    const Vec ga = masked_grad<RELU>(da, ya), gb = masked_grad<RELU>(db, yb);
    sg0 = sg0 + ga;
    sg1 = sg1 + gb;
    sgz0 = at::vec::fmadd(ga, za - ma, sgz0);
    sgz1 = at::vec::fmadd(gb, zb - mb, sgz1);
    if constexpr (WRITE_DRES) IO::store(dres + i, ga, gb);
    if constexpr (EVAL_DZ) IO::store(dz + i, aa * ga, ab * gb);
  }
}

// Pass 2 over a dense run: dz = a*g + b*(z - mean) + c0, with g read back from dres (FROM_DRES)
// or recomputed from dy and y.
template <typename T, bool RELU, bool FROM_DRES, typename Gate, typename Lanes, typename ScalarLanes>
inline void bwd_dz_run(const T* dy, const Gate& gate, const T* dres, const T* z, T* dz, int64_t n,
                       Lanes lanes, ScalarLanes slanes) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec ga, gb, za, zb, ma, mb, aa, ab, ba, bb, ca, cb;
    if constexpr (FROM_DRES) {
      IO::load(dres + i, ga, gb);
    } else {
      Vec da, db, ya, yb;
      IO::load(dy + i, da, db);
      if constexpr (RELU) gate.load(i, ya, yb);
      ga = masked_grad<RELU>(da, ya);
      gb = masked_grad<RELU>(db, yb);
    }
    IO::load(z + i, za, zb);
    lanes(i, ma, mb, aa, ab, ba, bb, ca, cb);
    IO::store(dz + i, at::vec::fmadd(aa, ga, at::vec::fmadd(ba, za - ma, ca)),
              at::vec::fmadd(ab, gb, at::vec::fmadd(bb, zb - mb, cb)));
  }
  for (; i < n; ++i) {
    acc_t m, a, b, c0;
    slanes(i, m, a, b, c0);
    const acc_t g = FROM_DRES ? IO::get(dres, i)
                              : math::relu_grad<acc_t>(IO::get(dy, i), RELU ? gate.get(i) : acc_t(1), RELU);
    dz[i] = static_cast<T>(a * g + b * (IO::get(z, i) - m) + c0);
  }
}

template <typename T, bool RELU, bool HAS_RES, bool TRAINING, typename Gate>
void bn_act_bwd_nchw(const BwdParams& p, const Gate& gate) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t N = p.g.N, C = p.g.C, HW = p.g.HW;
  const double count = static_cast<double>(N * HW);
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  T* dres = static_cast<T*>(p.dresidual);
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* invstd = static_cast<const acc_t*>(p.invstd);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t* dweight = static_cast<acc_t*>(p.dweight);
  acc_t* dbias = static_cast<acc_t*>(p.dbias);
  const int64_t tile = tile_elems<T>();

  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t m = mean[c];
      // Eval mode knows dz = a*g before the reduction, so pass 1 writes dz and is the only pass.
      const acc_t a_eval = static_cast<acc_t>(static_cast<double>(weight[c]) * invstd[c]);
      const Vec mv(m), av(a_eval);
      double sum_g = 0, sum_gz = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * C + c) * HW;
        for (int64_t t0 = 0; t0 < HW; t0 += tile) {
          const int64_t len = std::min(tile, HW - t0), off = base + t0;
          Vec sg0(0), sg1(0), sgz0(0), sgz1(0);
          bwd_reduce_run<T, RELU, HAS_RES, !TRAINING>(
              dy + off, gate.at(off), z + off, HAS_RES ? dres + off : nullptr, dz + off, len,
              [&](int64_t, Vec& ma, Vec& mb, Vec& aa, Vec& ab) {
                ma = mb = mv;
                aa = ab = av;
              },
              sg0, sg1, sgz0, sgz1);
          sum_g += hsum(sg0 + sg1);
          sum_gz += hsum(sgz0 + sgz1);
          for (int64_t i = len - len % IO::kStep; i < len; ++i) {
            const acc_t g =
                math::relu_grad<acc_t>(IO::get(dy, off + i), RELU ? gate.get(off + i) : acc_t(1), RELU);
            sum_g += g;
            sum_gz += static_cast<double>(g) * static_cast<double>(IO::get(z, off + i) - m);
            if constexpr (HAS_RES) dres[off + i] = static_cast<T>(g);
            if constexpr (!TRAINING) dz[off + i] = static_cast<T>(a_eval * g);
          }
        }
      }
      dbias[c] = static_cast<acc_t>(sum_g);
      dweight[c] = static_cast<acc_t>(sum_gz * static_cast<double>(invstd[c]));
      if constexpr (TRAINING) {
        const DzCoef k = dz_coefficients(weight[c], m, invstd[c], sum_g, sum_gz, count, true);
        const acc_t a = static_cast<acc_t>(k.a), b = static_cast<acc_t>(k.b),
                    cc = static_cast<acc_t>(k.c0);
        const Vec ak(a), bk(b), ck(cc);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * HW;
          bwd_dz_run<T, RELU, HAS_RES>(
              dy + off, gate.at(off), HAS_RES ? dres + off : nullptr, z + off, dz + off, HW,
              [&](int64_t, Vec& ma, Vec& mb, Vec& aa, Vec& ab, Vec& ba, Vec& bb, Vec& ca,
                  Vec& cb) {
                ma = mb = mv;
                aa = ab = ak;
                ba = bb = bk;
                ca = cb = ck;
              },
              [&](int64_t, acc_t& mo, acc_t& ao, acc_t& bo, acc_t& co) {
                mo = m;
                ao = a;
                bo = b;
                co = cc;
              });
        }
      }
    }
  });
}

template <typename T, bool RELU, bool HAS_RES, bool TRAINING, typename Gate>
void bn_act_bwd_nhwc(const BwdParams& p, const Gate& gate) {
  using IO = Io<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t C = p.g.C, rows = p.g.N * p.g.HW;
  const double count = static_cast<double>(rows);
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  T* dres = static_cast<T*>(p.dresidual);
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* invstd = static_cast<const acc_t*>(p.invstd);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);

  // Per-channel lanes, padded to whole vectors so the vector loops may load them unguarded.
  const int64_t Cp = (C + IO::kStep - 1) / IO::kStep * IO::kStep;
  std::vector<acc_t> a_eval(Cp, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    a_eval[c] = static_cast<acc_t>(static_cast<double>(weight[c]) * invstd[c]);
  }

  const int64_t chunks = num_chunks(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const int64_t tile_rows = nhwc_tile_rows<T>(C);
  std::vector<double> part_g(chunks * C, 0.0), part_gz(chunks * C, 0.0);

  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> tg(Cp), tgz(Cp);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r_end = std::min(rows, (k + 1) * rows_per_chunk);
      for (int64_t r0 = k * rows_per_chunk; r0 < r_end; r0 += tile_rows) {
        const int64_t nr = std::min(tile_rows, r_end - r0);
        std::fill(tg.begin(), tg.end(), acc_t(0));
        std::fill(tgz.begin(), tgz.end(), acc_t(0));
        for (int64_t r = r0; r < r0 + nr; ++r) {
          const int64_t off = r * C;
          int64_t c = 0;
          for (; c + IO::kStep <= C; c += IO::kStep) {
            Vec sg0 = Vec::loadu(tg.data() + c), sg1 = Vec::loadu(tg.data() + c + Vec::size());
            Vec sgz0 = Vec::loadu(tgz.data() + c), sgz1 = Vec::loadu(tgz.data() + c + Vec::size());
            bwd_reduce_run<T, RELU, HAS_RES, !TRAINING>(
                dy + off + c, gate.at(off + c), z + off + c, HAS_RES ? dres + off + c : nullptr,
                dz + off + c, IO::kStep,
                [&](int64_t, Vec& ma, Vec& mb, Vec& aa, Vec& ab) {
                  ma = Vec::loadu(mean + c);
                  mb = Vec::loadu(mean + c + Vec::size());
                  aa = Vec::loadu(a_eval.data() + c);
                  ab = Vec::loadu(a_eval.data() + c + Vec::size());
                },
                sg0, sg1, sgz0, sgz1);
            sg0.store(tg.data() + c);
            sg1.store(tg.data() + c + Vec::size());
            sgz0.store(tgz.data() + c);
            sgz1.store(tgz.data() + c + Vec::size());
          }
          for (; c < C; ++c) {
            const acc_t g =
                math::relu_grad<acc_t>(IO::get(dy, off + c), RELU ? gate.get(off + c) : acc_t(1), RELU);
            tg[c] += g;
            tgz[c] += g * (IO::get(z, off + c) - mean[c]);
            if constexpr (HAS_RES) dres[off + c] = static_cast<T>(g);
            if constexpr (!TRAINING) dz[off + c] = static_cast<T>(a_eval[c] * g);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          part_g[k * C + c] += tg[c];
          part_gz[k * C + c] += tgz[c];
        }
      }
    }
  });

  acc_t* dweight = static_cast<acc_t*>(p.dweight);
  acc_t* dbias = static_cast<acc_t*>(p.dbias);
  std::vector<acc_t> ka(Cp, acc_t(0)), kb(Cp, acc_t(0)), kc(Cp, acc_t(0)), km(Cp, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    double sum_g = 0, sum_gz = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sum_g += part_g[k * C + c];
      sum_gz += part_gz[k * C + c];
    }
    dbias[c] = static_cast<acc_t>(sum_g);
    dweight[c] = static_cast<acc_t>(sum_gz * static_cast<double>(invstd[c]));
    const DzCoef k =
        dz_coefficients(weight[c], mean[c], invstd[c], sum_g, sum_gz, count, TRAINING);
    ka[c] = static_cast<acc_t>(k.a);
    kb[c] = static_cast<acc_t>(k.b);
    kc[c] = static_cast<acc_t>(k.c0);
    km[c] = mean[c];
  }
  if constexpr (TRAINING) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * C;
        bwd_dz_run<T, RELU, HAS_RES>(
            dy + off, gate.at(off), HAS_RES ? dres + off : nullptr, z + off, dz + off, C,
            [&](int64_t c, Vec& ma, Vec& mb, Vec& aa, Vec& ab, Vec& ba, Vec& bb, Vec& ca,
                Vec& cb) {
              constexpr int64_t w = Vec::size();
              ma = Vec::loadu(km.data() + c);
              mb = Vec::loadu(km.data() + c + w);
              aa = Vec::loadu(ka.data() + c);
              ab = Vec::loadu(ka.data() + c + w);
              ba = Vec::loadu(kb.data() + c);
              bb = Vec::loadu(kb.data() + c + w);
              ca = Vec::loadu(kc.data() + c);
              cb = Vec::loadu(kc.data() + c + w);
            },
            [&](int64_t c, acc_t& mo, acc_t& ao, acc_t& bo, acc_t& co) {
              mo = km[c];
              ao = ka[c];
              bo = kb[c];
              co = kc[c];
            });
      }
    });
  }
}

template <typename T, bool RELU, bool HAS_RES, bool TRAINING, typename Gate>
void bn_act_bwd_layout(const BwdParams& p, const Gate& gate) {
  if (p.g.channels_last) {
    bn_act_bwd_nhwc<T, RELU, HAS_RES, TRAINING>(p, gate);
  } else {
    bn_act_bwd_nchw<T, RELU, HAS_RES, TRAINING>(p, gate);
  }
}

template <typename T, bool RELU, typename Gate>
void bn_act_bwd_switches(const BwdParams& p, const Gate& gate) {
  // The switches are compile-time so the inner loops carry no branches.
  if (p.dresidual != nullptr) {
    return p.training ? bn_act_bwd_layout<T, RELU, true, true>(p, gate)
                      : bn_act_bwd_layout<T, RELU, true, false>(p, gate);
  }
  return p.training ? bn_act_bwd_layout<T, RELU, false, true>(p, gate)
                    : bn_act_bwd_layout<T, RELU, false, false>(p, gate);
}

template <typename T>
void bn_act_bwd_typed(const BwdParams& p) {
  if (p.mask != nullptr) return bn_act_bwd_switches<T, true>(p, MaskGate<T>{p.mask, 0});
  const OutputGate<T> gate{static_cast<const T*>(p.y)};
  return p.relu ? bn_act_bwd_switches<T, true>(p, gate) : bn_act_bwd_switches<T, false>(p, gate);
}

// ============================================================================================
// dtype dispatch and the table
// ============================================================================================

template <typename Fn>
void dispatch_dtype(c10::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

inline void bn_stats_kernel(const StatsParams& p, c10::ScalarType dtype) {
  dispatch_dtype(dtype, "fusedres::bn_stats", [&](auto tag) {
    using T = decltype(tag);
    if (p.g.channels_last) {
      bn_stats_nhwc<T>(p);
    } else {
      bn_stats_nchw<T>(p);
    }
  });
}

inline void bn_act_fwd_kernel(const FwdParams& p, c10::ScalarType dtype) {
  dispatch_dtype(dtype, "fusedres::bn_act_fwd",
                 [&](auto tag) { bn_act_fwd_typed<decltype(tag)>(p); });
}

inline void bn_act_bwd_kernel(const BwdParams& p, c10::ScalarType dtype) {
  dispatch_dtype(dtype, "fusedres::bn_act_bwd",
                 [&](auto tag) { bn_act_bwd_typed<decltype(tag)>(p); });
}

inline void bn_train_fwd_kernel(const TrainFwdParams& p, c10::ScalarType dtype) {
  dispatch_dtype(dtype, "fusedres::unit_train",
                 [&](auto tag) { bn_train_fwd_typed<decltype(tag)>(p); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

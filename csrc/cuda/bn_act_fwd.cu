// y = act(z*scale[c] + shift[c] + residual) over an NHWC tensor viewed as [rows, channels]:
// one read of z (and residual), one write of y, 16-byte accesses.
//
// Each thread owns VEC channels for the whole kernel, so scale and shift are loaded once into
// registers and no per-element channel index (a 64-bit modulo) is computed.
#include "cuda/bn_common.cuh"

namespace fusedres {
namespace cuda {
namespace {

template <typename T, int VEC, bool RELU, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_act_fwd_kernel(
    const T* __restrict__ z,              // [rows, channels] conv output
    const T* __restrict__ residual,       // [rows, channels]; read only when HAS_RESIDUAL
    const acc_t<T>* __restrict__ scale,   // [channels] gamma*invstd
    const acc_t<T>* __restrict__ shift,   // [channels] beta - mean*scale
    T* __restrict__ y,                    // [rows, channels] output
    int64_t rows, int64_t channels) {
  using A = acc_t<T>;
  constexpr int kRows = rows_in_flight<VEC>();
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;  // no barriers in this kernel
  A sc[VEC], sh[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sc[k] = scale[c0 + k];
    sh[k] = shift[c0 + k];
  }
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += kRows * row_step) {
    // Issue every load of the unrolled rows before the first store.
    Vec<T, VEC> zv[kRows], rv[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
        zv[u] = load_vec<T, VEC>(z + r * channels + c0);
        if constexpr (HAS_RESIDUAL) rv[u] = load_vec<T, VEC>(residual + r * channels + c0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
        Vec<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A res = HAS_RESIDUAL ? to_acc(rv[u].v[k]) : A(0);
          out.v[k] = from_acc<T>(math::bn_act(to_acc(zv[u].v[k]), sc[k], sh[k], res, RELU));
        }
        store_vec<T, VEC>(y + r * channels + c0, out);
      }
    }
  }
}

template <typename T, int VEC>
LaunchStatus launch_fwd_vec(const FwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  // Elementwise: fill every SM (8 blocks of 256 threads) and let threads stride over the rows.
  const Tiling t = make_tiling(p.rows, p.channels, VEC, p.num_sms, 8, 65535);
  return dispatch_bool(p.relu, [&](auto relu) {
    return dispatch_bool(p.residual != nullptr, [&](auto has_residual) {
      bn_act_fwd_kernel<T, VEC, decltype(relu)::value, decltype(has_residual)::value>
          <<<t.grid, t.block, 0, stream>>>(
              static_cast<const T*>(p.z), static_cast<const T*>(p.residual),
              static_cast<const A*>(p.scale), static_cast<const A*>(p.shift), static_cast<T*>(p.y),
              p.rows, p.channels);
      FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_act_fwd_kernel");
      return LaunchStatus{};
    });
  });
}

}  // namespace

LaunchStatus bn_act_fwd(const FwdParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto tag) {
    using T = decltype(tag);
    if (use_vectors<T>(p.channels, {p.z, p.residual, p.y})) return launch_fwd_vec<T, vec_width<T>()>(p, stream);
    return launch_fwd_vec<T, 1>(p, stream);
  });
}

}  // namespace cuda
}  // namespace fusedres

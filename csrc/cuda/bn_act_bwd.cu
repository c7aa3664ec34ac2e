// Backward of y = act(bn(z) + residual) over an NHWC tensor viewed as [rows, channels].
//
//   pass 1  bn_bwd_reduce_kernel:   g = dy through the ReLU gate (read off the saved output y,
//                                   or off the packed bit mask of bn_act_fwd_mask); per-block partial sums of g and
//                                   g*(z - mean); writes dresidual = g (HAS_RESIDUAL) and, in eval,
//                                   dz = gamma*invstd*g (WRITE_DZ), which needs no reduction.
//   finalize bn_bwd_finalize_kernel: one warp per channel sums the partials -> dbias, dweight and,
//                                   in training, the coefficients a, b, c of dz = a*g + b*z + c.
//   pass 2  bn_bwd_dz_kernel:       (training only) dz = a*g + b*z + c. When dresidual was written
//                                   it already holds g, so pass 2 reads it instead of dy and y.
// Centering on the saved mean keeps sum g*(z - mean) free of cancellation; sums run in fp32
// (fp64 for fp64 activations).
#include "cuda/bn_common.cuh"

namespace fusedres {
namespace cuda {
namespace {

// Where pass 1 gets the ReLU gate from.
enum class ReluGate : int {
  kNone = 0,     // no ReLU: g = dy
  kOutput = 1,   // the saved output: g = y <= 0 ? 0 : dy
  kBitMask = 2,  // the packed mask of bn_act_fwd_mask: g = bit ? dy : 0
};

// Where pass 2 gets g from.
enum class GradSource : int {
  kMasked = 0,    // a buffer that already holds g (dresidual)
  kReluMask = 1,  // dy masked by the saved output: g = y <= 0 ? 0 : dy
  kIdentity = 2,  // no ReLU: g = dy
  kBitMask = 3,   // dy masked by the packed bit mask: g = bit ? dy : 0
};

// dy through the gate of element k of a vector: `y` is its saved output (kOutput), `bits` the
// vector's mask bits (kBitMask).
template <ReluGate GATE, typename A>
__device__ __forceinline__ A gate_grad(A dy, A y, unsigned bits, int k) {
  if constexpr (GATE == ReluGate::kOutput) return math::relu_grad(dy, y, true);
  if constexpr (GATE == ReluGate::kBitMask) return ((bits >> k) & 1u) ? dy : A(0);
  return dy;
}

// Workspace layout, P = grid.y row chunks: sum_g [C][P], sum_g_zc [C][P], coef [3][C] (a, b, c).
template <typename A>
struct BwdWorkspace {
  A* sum_g;
  A* sum_g_zc;
  A* coef;
};

template <typename A>
BwdWorkspace<A> bwd_workspace(void* base, int64_t channels, int64_t partials) {
  A* p = static_cast<A*>(base);
  return {p, p + channels * partials, p + 2 * channels * partials};
}

template <typename T, int VEC, ReluGate GATE, bool HAS_RESIDUAL, bool WRITE_DZ>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_bwd_reduce_kernel(
    const T* __restrict__ dy,              // [rows, channels] output gradient
    const T* __restrict__ y,               // [rows, channels] saved output; read only for kOutput
    const uint8_t* __restrict__ mask,      // [rows * channels bits] read only for kBitMask
    const T* __restrict__ z,               // [rows, channels] saved conv output
    const acc_t<T>* __restrict__ mean,     // [channels]
    const acc_t<T>* __restrict__ invstd,   // [channels]; read only when WRITE_DZ
    const acc_t<T>* __restrict__ weight,   // [channels] gamma; read only when WRITE_DZ
    T* __restrict__ dresidual,             // [rows, channels] out (= g); written when HAS_RESIDUAL
    T* __restrict__ dz,                    // [rows, channels] out; written when WRITE_DZ
    acc_t<T>* __restrict__ ws_sum_g,       // [channels, gridDim.y] partial sums of g
    acc_t<T>* __restrict__ ws_sum_g_zc,    // [channels, gridDim.y] partial sums of g*(z - mean)
    int64_t rows, int64_t channels) {
  using A = acc_t<T>;
  constexpr int kRows = rows_in_flight<VEC>();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + tx) * VEC;
  const bool active = c0 < channels;
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;

  A s_g[VEC], s_gzc[VEC], mu[VEC], a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s_g[k] = s_gzc[k] = A(0);
    mu[k] = active ? mean[c0 + k] : A(0);
    a[k] = (WRITE_DZ && active) ? weight[c0 + k] * invstd[c0 + k] : A(0);
  }

  if (active) {
    for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + ty; r0 < rows; r0 += kRows * row_step) {
      Vec<T, VEC> dyv[kRows], yv[kRows], zv[kRows];
      unsigned bits[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t r = r0 + u * row_step;
        if (r < rows) {
          dyv[u] = load_vec<T, VEC>(dy + r * channels + c0);
          if constexpr (GATE == ReluGate::kOutput) yv[u] = load_vec<T, VEC>(y + r * channels + c0);
          if constexpr (GATE == ReluGate::kBitMask) bits[u] = mask_bits<VEC>(mask, r * channels + c0);
          zv[u] = load_vec<T, VEC>(z + r * channels + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t r = r0 + u * row_step;
        if (r < rows) {
          Vec<T, VEC> gv, dzv;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A yk = GATE == ReluGate::kOutput ? to_acc(yv[u].v[k]) : A(1);
            const unsigned bk = GATE == ReluGate::kBitMask ? bits[u] : 0u;
            const A g = gate_grad<GATE>(to_acc(dyv[u].v[k]), yk, bk, k);
            s_g[k] += g;
            s_gzc[k] += g * (to_acc(zv[u].v[k]) - mu[k]);
            if constexpr (HAS_RESIDUAL) gv.v[k] = from_acc<T>(g);
            if constexpr (WRITE_DZ) dzv.v[k] = from_acc<T>(a[k] * g);
          }
          if constexpr (HAS_RESIDUAL) store_vec<T, VEC>(dresidual + r * channels + c0, gv);
          if constexpr (WRITE_DZ) store_vec<T, VEC>(dz + r * channels + c0, dzv);
        }
      }
    }
  }

  // Tree sum over ty; slot (ty, k, tx) keeps neighbouring tx in neighbouring banks.
  __shared__ A sh_g[kBlockThreads * VEC];
  __shared__ A sh_gzc[kBlockThreads * VEC];
  const int tdx = blockDim.x;
  auto slot = [&](int row, int k) { return (row * VEC + k) * tdx + tx; };
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh_g[slot(ty, k)] = s_g[k];
    sh_gzc[slot(ty, k)] = s_gzc[k];
  }
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s_g[k] += sh_g[slot(ty + half, k)];
        s_gzc[k] += sh_gzc[slot(ty + half, k)];
        sh_g[slot(ty, k)] = s_g[k];
        sh_gzc[slot(ty, k)] = s_gzc[k];
      }
    }
    __syncthreads();
  }

  if (ty == 0 && active) {
    const int64_t partials = gridDim.y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ws_sum_g[(c0 + k) * partials + blockIdx.y] = s_g[k];
      ws_sum_g_zc[(c0 + k) * partials + blockIdx.y] = s_gzc[k];
    }
  }
}

// One warp per channel sums its partials, then lane 0 writes dbias, dweight and (training) a, b, c.
template <typename A>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_bwd_finalize_kernel(
    const A* __restrict__ ws_sum_g,     // [channels, partials]
    const A* __restrict__ ws_sum_g_zc,  // [channels, partials]
    const A* __restrict__ mean,         // [channels]
    const A* __restrict__ invstd,       // [channels]
    const A* __restrict__ weight,       // [channels] gamma
    A* __restrict__ dweight,            // [channels] out
    A* __restrict__ dbias,              // [channels] out
    A* __restrict__ coef,               // [3, channels] out (a, b, c); written when training
    int64_t channels, int64_t partials, int64_t rows, bool training) {
  const int lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * (kBlockThreads / 32) + threadIdx.x / 32;
  if (c >= channels) return;  // whole warps leave together; no block barrier follows
  A s_g = A(0), s_gzc = A(0);
#pragma unroll 4
  for (int64_t p = lane; p < partials; p += 32) {
    s_g += ws_sum_g[c * partials + p];
    s_gzc += ws_sum_g_zc[c * partials + p];
  }
  s_g = warp_sum(s_g);
  s_gzc = warp_sum(s_gzc);
  if (lane == 0) {
    dbias[c] = s_g;
    dweight[c] = invstd[c] * s_gzc;
    if (training) {
      const math::BwdCoefficients<A> k =
          math::bwd_coefficients(weight[c], mean[c], invstd[c], s_g, s_gzc, A(rows), true);
      coef[c] = k.a;
      coef[channels + c] = k.b;
      coef[2 * channels + c] = k.c;
    }
  }
}

template <typename T, int VEC, GradSource GRAD>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_bwd_dz_kernel(
    const T* __restrict__ g_src,         // [rows, channels] g (kMasked) or dy
    const T* __restrict__ y,             // [rows, channels] saved output; read only for kReluMask
    const uint8_t* __restrict__ mask,    // [rows * channels bits] read only for kBitMask
    const T* __restrict__ z,             // [rows, channels] saved conv output
    const acc_t<T>* __restrict__ coef,   // [3, channels] a, b, c from the finalize kernel
    T* __restrict__ dz,                  // [rows, channels] out
    int64_t rows, int64_t channels) {
  using A = acc_t<T>;
  constexpr int kRows = rows_in_flight<VEC>();
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;  // no barriers in this kernel
  A ca[VEC], cb[VEC], cc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    ca[k] = coef[c0 + k];
    cb[k] = coef[channels + c0 + k];
    cc[k] = coef[2 * channels + c0 + k];
  }
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += kRows * row_step) {
    Vec<T, VEC> gv[kRows], yv[kRows], zv[kRows];
    unsigned bits[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
        gv[u] = load_vec<T, VEC>(g_src + r * channels + c0);
        if constexpr (GRAD == GradSource::kReluMask) yv[u] = load_vec<T, VEC>(y + r * channels + c0);
        if constexpr (GRAD == GradSource::kBitMask) bits[u] = mask_bits<VEC>(mask, r * channels + c0);
        zv[u] = load_vec<T, VEC>(z + r * channels + c0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
        Vec<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          A g = to_acc(gv[u].v[k]);
          if constexpr (GRAD == GradSource::kReluMask) g = math::relu_grad(g, to_acc(yv[u].v[k]), true);
          if constexpr (GRAD == GradSource::kBitMask) g = gate_grad<ReluGate::kBitMask>(g, A(0), bits[u], k);
          out.v[k] = from_acc<T>(ca[k] * g + cb[k] * to_acc(zv[u].v[k]) + cc[k]);
        }
        store_vec<T, VEC>(dz + r * channels + c0, out);
      }
    }
  }
}

// Calls f(std::integral_constant<ReluGate, gate>{}) with the gate the parameters ask for.
template <typename F>
LaunchStatus dispatch_gate(const BwdParams& p, F&& f) {
  if (p.mask != nullptr) return f(std::integral_constant<ReluGate, ReluGate::kBitMask>{});
  if (p.relu) return f(std::integral_constant<ReluGate, ReluGate::kOutput>{});
  return f(std::integral_constant<ReluGate, ReluGate::kNone>{});
}

template <typename T>
Tiling reduce_tiling(const BwdParams& p) {
  const int vec = use_vectors<T>(p.channels, {p.dy, p.y, p.z, p.dz, p.dresidual}) ? vec_width<T>() : 1;
  return make_tiling(p.rows, p.channels, vec, p.num_sms, 4, kMaxRowChunks);
}

template <typename T, int VEC>
LaunchStatus launch_bwd_vec(const BwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const Tiling t = reduce_tiling<T>(p);
  const int64_t partials = t.grid.y;
  const BwdWorkspace<A> ws = bwd_workspace<A>(p.workspace, p.channels, partials);
  const T* dy = static_cast<const T*>(p.dy);
  const T* y = static_cast<const T*>(p.y);
  const T* z = static_cast<const T*>(p.z);
  const A* mean = static_cast<const A*>(p.mean);
  const A* invstd = static_cast<const A*>(p.invstd);
  const A* weight = static_cast<const A*>(p.weight);
  T* dz = static_cast<T*>(p.dz);
  T* dres = static_cast<T*>(p.dresidual);

  LaunchStatus st = dispatch_gate(p, [&](auto gate) {
    return dispatch_bool(dres != nullptr, [&](auto has_residual) {
      return dispatch_bool(!p.training, [&](auto write_dz) {
        bn_bwd_reduce_kernel<T, VEC, decltype(gate)::value, decltype(has_residual)::value,
                             decltype(write_dz)::value><<<t.grid, t.block, 0, stream>>>(
            dy, y, p.mask, z, mean, invstd, weight, dres, dz, ws.sum_g, ws.sum_g_zc, p.rows, p.channels);
        FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_bwd_reduce_kernel");
        return LaunchStatus{};
      });
    });
  });
  if (!st.ok()) return st;

  const int64_t warps_per_block = kBlockThreads / 32;
  const dim3 fgrid(unsigned((p.channels + warps_per_block - 1) / warps_per_block));
  bn_bwd_finalize_kernel<A><<<fgrid, kBlockThreads, 0, stream>>>(
      ws.sum_g, ws.sum_g_zc, mean, invstd, weight, static_cast<A*>(p.dweight),
      static_cast<A*>(p.dbias), ws.coef, p.channels, partials, p.rows, p.training);
  FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_bwd_finalize_kernel");
  if (!p.training) return {};

  // Elementwise: fill every SM, threads stride over the rows.
  const Tiling te = make_tiling(p.rows, p.channels, VEC, p.num_sms, 8, 65535);
  if (dres != nullptr) {
    bn_bwd_dz_kernel<T, VEC, GradSource::kMasked><<<te.grid, te.block, 0, stream>>>(
        dres, nullptr, nullptr, z, ws.coef, dz, p.rows, p.channels);
  } else if (p.mask != nullptr) {
    bn_bwd_dz_kernel<T, VEC, GradSource::kBitMask><<<te.grid, te.block, 0, stream>>>(
        dy, nullptr, p.mask, z, ws.coef, dz, p.rows, p.channels);
  } else if (p.relu) {
    bn_bwd_dz_kernel<T, VEC, GradSource::kReluMask><<<te.grid, te.block, 0, stream>>>(
        dy, y, nullptr, z, ws.coef, dz, p.rows, p.channels);
  } else {
    bn_bwd_dz_kernel<T, VEC, GradSource::kIdentity><<<te.grid, te.block, 0, stream>>>(
        dy, nullptr, nullptr, z, ws.coef, dz, p.rows, p.channels);
  }
  FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_bwd_dz_kernel");
  return {};
}

}  // namespace

size_t bn_act_bwd_workspace_bytes(const BwdParams& p) {
  size_t bytes = 0;
  dispatch_kind(p.kind, [&](auto tag) {
    using T = decltype(tag);
    const int64_t partials = reduce_tiling<T>(p).grid.y;
    bytes = sizeof(acc_t<T>) * size_t(p.channels) * size_t(2 * partials + 3);
    return LaunchStatus{};
  });
  return bytes;
}

LaunchStatus bn_act_bwd(const BwdParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto tag) {
    using T = decltype(tag);
    if (use_vectors<T>(p.channels, {p.dy, p.y, p.z, p.dz, p.dresidual})) {
      return launch_bwd_vec<T, vec_width<T>()>(p, stream);
    }
    return launch_bwd_vec<T, 1>(p, stream);
  });
}

}  // namespace cuda
}  // namespace fusedres

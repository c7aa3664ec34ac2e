// y = act(z*scale[c] + shift[c] + residual) over an NHWC tensor viewed as [rows, channels]:
// one read of z (and residual), one write of y, 16-byte accesses.
//
// Each thread owns VEC channels for the whole kernel, so scale and shift are loaded once into
// registers and no per-element channel index (a 64-bit modulo) is computed.
//
// The mask variant (bn_act_fwd_mask) also writes the packed ReLU mask of y, one bit per element.
// Bits are only written a whole byte at a time (no atomics, no read-modify-write): the vector
// kernel gives each thread 8 channels of a row, whose bits are one byte when C % 8 == 0; the flat
// kernel, for every other layout, gives each thread 8 consecutive elements in memory order.
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

// Elements per mask byte, and the channels one thread of bn_act_fwd_mask_kernel owns.
constexpr int kMaskGroup = 8;

// Bit of element v of y (stored, in the storage dtype): 1 where the backward passes the gradient.
template <typename T>
__device__ __forceinline__ unsigned relu_mask_bit(T v) {
  return to_acc(v) <= acc_t<T>(0) ? 0u : 1u;
}

template <typename T, int VEC, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_act_fwd_mask_kernel(
    const T* __restrict__ z,              // [rows, channels] conv output
    const T* __restrict__ residual,       // [rows, channels]; read only when HAS_RESIDUAL
    const acc_t<T>* __restrict__ scale,   // [channels]
    const acc_t<T>* __restrict__ shift,   // [channels]
    T* __restrict__ y,                    // [rows, channels] output
    uint8_t* __restrict__ mask,           // [rows * channels / 8] output; channels % 8 == 0
    int64_t rows, int64_t channels) {
  using A = acc_t<T>;
  constexpr int kVecs = kMaskGroup / VEC;  // 16-byte vectors per thread and row
  constexpr int kRows = rows_in_flight<kMaskGroup>();
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kMaskGroup;
  if (c0 >= channels) return;  // no barriers in this kernel
  A sc[kMaskGroup], sh[kMaskGroup];
#pragma unroll
  for (int k = 0; k < kMaskGroup; ++k) {
    sc[k] = scale[c0 + k];
    sh[k] = shift[c0 + k];
  }
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += kRows * row_step) {
    Vec<T, VEC> zv[kRows][kVecs], rv[kRows][kVecs];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
#pragma unroll
        for (int j = 0; j < kVecs; ++j) {
          zv[u][j] = load_vec<T, VEC>(z + r * channels + c0 + j * VEC);
          if constexpr (HAS_RESIDUAL) rv[u][j] = load_vec<T, VEC>(residual + r * channels + c0 + j * VEC);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < rows) {
        unsigned bits = 0;
#pragma unroll
        for (int j = 0; j < kVecs; ++j) {
          Vec<T, VEC> out;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const int ch = j * VEC + k;
            const A res = HAS_RESIDUAL ? to_acc(rv[u][j].v[k]) : A(0);
            out.v[k] = from_acc<T>(math::bn_act(to_acc(zv[u][j].v[k]), sc[ch], sh[ch], res, true));
            bits |= relu_mask_bit(out.v[k]) << ch;
          }
          store_vec<T, VEC>(y + r * channels + c0 + j * VEC, out);
        }
        mask[(r * channels + c0) / kMaskGroup] = uint8_t(bits);
      }
    }
  }
}

// The general mask kernel: each thread walks runs of 8 consecutive elements in memory order
// (grid stride) and writes their byte; channel = (e / channel_run) % channels, advanced
// incrementally so only the run's first element pays the 64-bit divisions.
template <typename T, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_act_fwd_mask_flat_kernel(
    const T* __restrict__ z,              // [numel] conv output in memory order
    const T* __restrict__ residual,       // [numel]; read only when HAS_RESIDUAL
    const acc_t<T>* __restrict__ scale,   // [channels]
    const acc_t<T>* __restrict__ shift,   // [channels]
    T* __restrict__ y,                    // [numel] output
    uint8_t* __restrict__ mask,           // [(numel + 7) / 8] output
    int64_t numel, int64_t channels, int64_t channel_run) {
  using A = acc_t<T>;
  const int64_t bytes = (numel + kMaskGroup - 1) / kMaskGroup;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < bytes; b += stride) {
    const int64_t e0 = b * kMaskGroup;
    const int64_t run = e0 / channel_run;
    int64_t pos = e0 - run * channel_run;  // position within the channel's run
    int64_t c = run % channels;
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < kMaskGroup; ++k) {
      const int64_t e = e0 + k;
      if (e < numel) {
        const A res = HAS_RESIDUAL ? to_acc(residual[e]) : A(0);
        const T v = from_acc<T>(math::bn_act(to_acc(z[e]), scale[c], shift[c], res, true));
        y[e] = v;
        bits |= relu_mask_bit(v) << k;
        if (++pos == channel_run) {
          pos = 0;
          if (++c == channels) c = 0;
        }
      }
    }
    mask[b] = uint8_t(bits);
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

template <typename T>
LaunchStatus launch_fwd_mask(const FwdMaskParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const T* z = static_cast<const T*>(p.z);
  const T* res = static_cast<const T*>(p.residual);
  const A* scale = static_cast<const A*>(p.scale);
  const A* shift = static_cast<const A*>(p.shift);
  T* y = static_cast<T*>(p.y);
  const bool vector_path = p.channel_run == 1 && p.channels % kMaskGroup == 0 &&
                           use_vectors<T>(p.channels, {p.z, p.residual, p.y});
  return dispatch_bool(p.residual != nullptr, [&](auto has_residual) {
    constexpr bool kRes = decltype(has_residual)::value;
    if constexpr (vec_width<T>() > 1) {
      if (vector_path) {
        const int64_t rows = p.numel / p.channels;
        const Tiling t = make_tiling(rows, p.channels, kMaskGroup, p.num_sms, 8, 65535);
        bn_act_fwd_mask_kernel<T, vec_width<T>(), kRes><<<t.grid, t.block, 0, stream>>>(
            z, res, scale, shift, y, p.mask, rows, p.channels);
        FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_act_fwd_mask_kernel");
        return LaunchStatus{};
      }
    }
    const int64_t bytes = (p.numel + kMaskGroup - 1) / kMaskGroup;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((bytes + kBlockThreads - 1) / kBlockThreads, int64_t(std::max(p.num_sms, 1)) * 8));
    bn_act_fwd_mask_flat_kernel<T, kRes><<<dim3(unsigned(blocks)), kBlockThreads, 0, stream>>>(
        z, res, scale, shift, y, p.mask, p.numel, p.channels, p.channel_run);
    FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_act_fwd_mask_flat_kernel");
    return LaunchStatus{};
  });
}

}  // namespace

LaunchStatus bn_act_fwd_mask(const FwdMaskParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto tag) { return launch_fwd_mask<decltype(tag)>(p, stream); });
}

LaunchStatus bn_act_fwd(const FwdParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto tag) {
    using T = decltype(tag);
    if (use_vectors<T>(p.channels, {p.z, p.residual, p.y})) return launch_fwd_vec<T, vec_width<T>()>(p, stream);
    return launch_fwd_vec<T, 1>(p, stream);
  });
}

}  // namespace cuda
}  // namespace fusedres

// Per-channel mean and biased variance of an NHWC tensor viewed as [rows, channels].
//
// Two levels, numerically stable at any size: every thread runs Welford over its rows for VEC
// channels, the threads of a block along rows are merged with Chan's formula in shared memory, and
// each block writes one (count, mean, M2) partial per channel. A finalize kernel merges the
// partials of a channel with one warp (Chan again). Sums of z and z^2 would cancel catastrophically
// for activations with a large mean; Welford/Chan never subtract two large sums.
#include "cuda/bn_common.cuh"

namespace fusedres {
namespace cuda {
namespace {

// Workspace layout, P = grid.y row chunks: count [P], mean [C][P], m2 [C][P]. Partials of one
// channel are contiguous so a warp of the finalize kernel reads them coalesced.
template <typename A>
struct StatsWorkspace {
  A* count;
  A* mean;
  A* m2;
};

template <typename A>
StatsWorkspace<A> stats_workspace(void* base, int64_t channels, int64_t partials) {
  A* p = static_cast<A*>(base);
  return {p, p + partials, p + partials + channels * partials};
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_stats_partial_kernel(
    const T* __restrict__ z,     // [rows, channels] input
    acc_t<T>* __restrict__ ws_count,  // [gridDim.y] rows per partial
    acc_t<T>* __restrict__ ws_mean,   // [channels, gridDim.y] partial means
    acc_t<T>* __restrict__ ws_m2,     // [channels, gridDim.y] partial sums of squared deviations
    int64_t rows, int64_t channels) {
  using A = acc_t<T>;
  constexpr int kRows = rows_in_flight<VEC>();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + tx) * VEC;  // first channel of this thread
  const bool active = c0 < channels;
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;

  A count = A(0);
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = A(0);

  if (active) {
    for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + ty; r0 < rows; r0 += kRows * row_step) {
      Vec<T, VEC> v[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t r = r0 + u * row_step;
        if (r < rows) v[u] = load_vec<T, VEC>(z + r * channels + c0);
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (r0 + u * row_step < rows) {
          // All VEC channels share the count, so one reciprocal serves them all.
          count += A(1);
          const A inv_count = A(1) / count;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A x = to_acc(v[u].v[k]);
            const A delta = x - mean[k];
            mean[k] += delta * inv_count;
            m2[k] += delta * (x - mean[k]);
          }
        }
      }
    }
  }

  // Tree merge over ty. Slot (ty, k, tx) keeps neighbouring tx in neighbouring banks.
  __shared__ A sh_count[kBlockThreads];
  __shared__ A sh_mean[kBlockThreads * VEC];
  __shared__ A sh_m2[kBlockThreads * VEC];
  const int tdx = blockDim.x;
  auto slot = [&](int row, int k) { return (row * VEC + k) * tdx + tx; };
  sh_count[ty * tdx + tx] = count;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh_mean[slot(ty, k)] = mean[k];
    sh_m2[slot(ty, k)] = m2[k];
  }
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (ty < half) {
      const A other_count = sh_count[(ty + half) * tdx + tx];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A n = count;  // welford_merge advances the count; every channel starts from the same one
        math::welford_merge(n, mean[k], m2[k], other_count, sh_mean[slot(ty + half, k)],
                            sh_m2[slot(ty + half, k)]);
        sh_mean[slot(ty, k)] = mean[k];
        sh_m2[slot(ty, k)] = m2[k];
      }
      count += other_count;
      sh_count[ty * tdx + tx] = count;
    }
    __syncthreads();
  }

  if (ty == 0 && active) {
    const int64_t partials = gridDim.y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ws_mean[(c0 + k) * partials + blockIdx.y] = mean[k];
      ws_m2[(c0 + k) * partials + blockIdx.y] = m2[k];
    }
    // Every column of a chunk saw the same rows; the first one records the count.
    if (blockIdx.x == 0 && tx == 0) ws_count[blockIdx.y] = count;
  }
}

// One warp per channel merges that channel's partials: lanes stride over them, then shuffle.
template <typename A>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) bn_stats_finalize_kernel(
    const A* __restrict__ ws_count,  // [partials]
    const A* __restrict__ ws_mean,   // [channels, partials]
    const A* __restrict__ ws_m2,     // [channels, partials]
    A* __restrict__ mean_out,        // [channels]
    A* __restrict__ var_out,         // [channels] biased variance
    int64_t channels, int64_t partials) {
  const int lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * (kBlockThreads / 32) + threadIdx.x / 32;
  if (c >= channels) return;  // whole warps leave together; no block barrier follows
  A count = A(0), mean = A(0), m2 = A(0);
#pragma unroll 4
  for (int64_t p = lane; p < partials; p += 32) {
    math::welford_merge(count, mean, m2, ws_count[p], ws_mean[c * partials + p], ws_m2[c * partials + p]);
  }
  warp_welford_reduce(count, mean, m2);
  if (lane == 0) {
    mean_out[c] = mean;
    var_out[c] = m2 / count;
  }
}

template <typename T>
Tiling stats_tiling(const StatsParams& p) {
  const int vec = use_vectors<T>(p.channels, {p.z}) ? vec_width<T>() : 1;
  // 4 blocks of 256 threads per SM keep enough 16-byte loads in flight for HBM bandwidth while
  // bounding the partials.
  return make_tiling(p.rows, p.channels, vec, p.num_sms, 4, kMaxRowChunks);
}

template <typename T>
LaunchStatus launch_stats(const StatsParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const Tiling t = stats_tiling<T>(p);
  const int64_t partials = t.grid.y;
  const StatsWorkspace<A> ws = stats_workspace<A>(p.workspace, p.channels, partials);
  const T* z = static_cast<const T*>(p.z);
  if (use_vectors<T>(p.channels, {p.z})) {
    bn_stats_partial_kernel<T, vec_width<T>()><<<t.grid, t.block, 0, stream>>>(
        z, ws.count, ws.mean, ws.m2, p.rows, p.channels);
  } else {
    bn_stats_partial_kernel<T, 1><<<t.grid, t.block, 0, stream>>>(z, ws.count, ws.mean, ws.m2,
                                                                   p.rows, p.channels);
  }
  FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_stats_partial_kernel");
  const int64_t warps_per_block = kBlockThreads / 32;
  const dim3 fgrid(unsigned((p.channels + warps_per_block - 1) / warps_per_block));
  bn_stats_finalize_kernel<A><<<fgrid, kBlockThreads, 0, stream>>>(
      ws.count, ws.mean, ws.m2, static_cast<A*>(p.mean), static_cast<A*>(p.var), p.channels, partials);
  FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_stats_finalize_kernel");
  return {};
}

}  // namespace

size_t bn_stats_workspace_bytes(const StatsParams& p) {
  size_t bytes = 0;
  dispatch_kind(p.kind, [&](auto tag) {
    using T = decltype(tag);
    const int64_t partials = stats_tiling<T>(p).grid.y;
    bytes = sizeof(acc_t<T>) * size_t(partials) * size_t(1 + 2 * p.channels);
    return LaunchStatus{};
  });
  return bytes;
}

LaunchStatus bn_stats(const StatsParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto tag) { return launch_stats<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace fusedres

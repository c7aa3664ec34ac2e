// The per-channel coefficient kernel of a unit's forward (bn_kernels.h, CoefParams): invstd,
// scale and shift, and in training the running-statistics update, in one tiny launch.
#include "cuda/bn_common.cuh"

namespace fusedres {
namespace cuda {
namespace {

template <typename R>
__device__ __forceinline__ double load_as_double(const void* p, int64_t c) {
  return static_cast<double>(to_acc(static_cast<const R*>(p)[c]));
}

template <typename R>
__device__ __forceinline__ void store_from_double(void* p, int64_t c, double v) {
  static_cast<R*>(p)[c] = from_acc<R>(static_cast<acc_t<R>>(v));
}

// A: accumulation dtype of the outputs; S: dtype of mean/var; R: dtype of the running statistics.
template <typename A, typename S, typename R>
__global__ void bn_coefficients_kernel(CoefParams p) {
  double factor = p.momentum;
  if (p.training && p.num_batches_tracked != nullptr) {
    const int64_t tracked = *p.num_batches_tracked + 1;
    if (p.cumulative) factor = 1.0 / static_cast<double>(tracked);
    __syncthreads();  // every thread has read the old count before thread 0 writes the new one
    if (threadIdx.x == 0) *p.num_batches_tracked = tracked;
  } else if (p.training && p.cumulative) {
    factor = 0.0;  // nn.BatchNorm2d without a counter leaves the statistics where they are
  }
  for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) {
    const double mean = load_as_double<S>(p.mean, c);
    const double var = load_as_double<S>(p.var, c);
    const double invstd = 1.0 / sqrt(var + p.eps);
    const double gamma = p.gamma != nullptr ? static_cast<double>(static_cast<const A*>(p.gamma)[c]) : 1.0;
    const double beta = p.beta != nullptr ? static_cast<double>(static_cast<const A*>(p.beta)[c]) : 0.0;
    const double scale = gamma * invstd;
    static_cast<A*>(p.invstd)[c] = static_cast<A>(invstd);
    static_cast<A*>(p.scale)[c] = static_cast<A>(scale);
    static_cast<A*>(p.shift)[c] = static_cast<A>(beta - mean * scale);
    if (p.training && p.running_mean != nullptr) {
      const double unbiased = var * p.count / (p.count - 1.0);
      store_from_double<R>(p.running_mean, c,
                           (1.0 - factor) * load_as_double<R>(p.running_mean, c) + factor * mean);
      store_from_double<R>(p.running_var, c,
                           (1.0 - factor) * load_as_double<R>(p.running_var, c) + factor * unbiased);
    }
  }
}

template <typename A, typename S>
LaunchStatus launch_with_stats(const CoefParams& p, cudaStream_t stream) {
  return dispatch_kind(p.running_kind, [&](auto running_tag) {
    using R = decltype(running_tag);
    bn_coefficients_kernel<A, S, R><<<1, kBlockThreads, 0, stream>>>(p);
    FUSEDRES_RETURN_IF_LAUNCH_FAILED("bn_coefficients_kernel");
    return LaunchStatus{};
  });
}

}  // namespace

LaunchStatus bn_coefficients(const CoefParams& p, cudaStream_t stream) {
  return dispatch_kind(p.kind, [&](auto act_tag) {
    using A = acc_t<decltype(act_tag)>;
    return dispatch_kind(p.stat_kind, [&](auto stat_tag) {
      return launch_with_stats<A, decltype(stat_tag)>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fusedres

// Device and launch helpers shared by the .cu files of csrc/cuda: dtype conversions, 16-byte
// vectors, the [rows, channels] tiling of NHWC tensors and dtype/flag dispatch. No torch headers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/bn_math.h"
#include "cuda/bn_kernels.h"

namespace fusedres {
namespace cuda {

// Every kernel runs 256-thread blocks: blockDim = (tx, ty) with tx threads along channel vectors
// and ty = 256/tx threads along rows.
constexpr int kBlockThreads = 256;
// At least two resident blocks per SM: caps registers at 128 per thread, so the 8-wide bf16
// kernels on sm_90 (which ptxas otherwise lets grow to ~160) keep 16 warps per SM to hide latency.
constexpr int kMinBlocksPerSm = 2;
// Rows each thread has in flight per loop iteration: independent 16-byte loads hide latency.
// 8-wide (16-bit) vectors take 2 rows: 4 rows of three 8-wide inputs spill on sm_90 within the
// 128-register cap, and 2 rows x 16 bytes per tensor at 16 warps/SM still cover HBM latency.
template <int VEC>
constexpr int rows_in_flight() {
  return VEC >= 8 ? 2 : 4;
}
// Upper bound on the row chunks (grid.y) of the reductions: bounds the partials that the
// finalize kernels merge per channel.
constexpr int64_t kMaxRowChunks = 1024;

// Accumulation dtype: fp32 for 16/32-bit storage, fp64 for fp64 (docs/design.md section 4: math in fp32).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Explicit conversions: torch's nvcc flags define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so the implicit ones do not exist.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive channels of one row; alignas makes the compiler emit one 16-byte access when
// sizeof(T)*VEC == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Elements per 16-byte vector, and whether the vector kernels may run: every channel row must
// start on a 16-byte boundary (C % VEC == 0) and so must every buffer. fp64 takes the scalar path.
template <typename T>
constexpr int vec_width() {
  return std::is_same<T, double>::value ? 1 : int(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
inline bool use_vectors(int64_t channels, std::initializer_list<const void*> ptrs) {
  if constexpr (vec_width<T>() == 1) {
    return false;
  } else {
    if (channels % vec_width<T>() != 0) return false;
    for (const void* p : ptrs) {
      if (!aligned16(p)) return false;
    }
    return true;
  }
}

// The launch shape of a [rows, channels] kernel: grid.x covers the channel vectors, grid.y splits
// the rows into chunks that threads walk with a grid stride (ty rows apart per block,
// grid.y*ty rows apart across the grid).
struct Tiling {
  dim3 block;
  dim3 grid;
};

// ctas_per_sm: resident blocks wanted per multiprocessor, more for the elementwise kernels, fewer
// for the reductions (each partial costs a merge in the finalize kernel).
inline Tiling make_tiling(int64_t rows, int64_t channels, int vec, int num_sms, int ctas_per_sm,
                          int64_t max_row_chunks) {
  const int64_t channel_vecs = channels / vec;
  int tx = 1;
  while (tx < channel_vecs && tx < 32) tx <<= 1;
  const int ty = kBlockThreads / tx;
  const int64_t gx = (channel_vecs + tx - 1) / tx;
  int64_t gy = (int64_t(num_sms > 0 ? num_sms : 1) * ctas_per_sm + gx - 1) / gx;
  gy = std::min<int64_t>(gy, (rows + ty - 1) / ty);
  gy = std::max<int64_t>(std::min<int64_t>(gy, max_row_chunks), 1);
  Tiling t;
  t.block = dim3(unsigned(tx), unsigned(ty));
  t.grid = dim3(unsigned(gx), unsigned(gy));
  return t;
}

// Calls f(T{}) with the storage type of `kind`.
template <typename F>
LaunchStatus dispatch_kind(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32: return f(float{});
    case ScalarKind::kFloat16: return f(__half{});
    case ScalarKind::kBFloat16: return f(__nv_bfloat16{});
    case ScalarKind::kFloat64: return f(double{});
  }
  return LaunchStatus{cudaErrorInvalidValue, "dispatch_kind (unknown dtype)"};
}

// Calls f(std::bool_constant<b>{}), turning a runtime switch into a constexpr kernel flag.
template <typename F>
LaunchStatus dispatch_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// Gradient gate from the packed ReLU mask (bn_act_fwd_mask): bit k of the result is the bit of
// element e + k. e is a multiple of VEC and VEC divides 8, so the VEC bits share one byte.
template <int VEC>
__device__ __forceinline__ unsigned mask_bits(const uint8_t* __restrict__ mask, int64_t e) {
  static_assert(8 % VEC == 0, "a vector's mask bits must share one byte");
  return unsigned(mask[e >> 3]) >> unsigned(e & 7);
}

// Chan merge of another thread's (count, mean, M2) statistics, fetched with warp shuffles.
template <typename A>
__device__ __forceinline__ void warp_welford_reduce(A& count, A& mean, A& m2) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other_count = __shfl_xor_sync(0xffffffffu, count, offset);
    const A other_mean = __shfl_xor_sync(0xffffffffu, mean, offset);
    const A other_m2 = __shfl_xor_sync(0xffffffffu, m2, offset);
    math::welford_merge(count, mean, m2, other_count, other_mean, other_m2);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace fusedres

// Returns the launch error of the kernel just launched, with its name, from a launcher.
#define FUSEDRES_RETURN_IF_LAUNCH_FAILED(kernel_name)                   \
  do {                                                                  \
    const cudaError_t fusedres_err_ = cudaGetLastError();               \
    if (fusedres_err_ != cudaSuccess) {                                 \
      return ::fusedres::cuda::LaunchStatus{fusedres_err_, kernel_name}; \
    }                                                                   \
  } while (0)

// Host-side interface of the CUDA kernels in csrc/cuda: parameter structs and launchers.
//
// No torch headers here or in the .cu files, so plain nvcc compiles the kernels on any machine
// (the binding in csrc/fusedres.cpp converts tensors to these structs). Everything works on
// channels_last (NHWC) contiguous buffers viewed as a [rows, channels] matrix with
// rows = N*H*W and the channel index innermost; offsets are int64.
//
// Dtypes: activations (z, y, dy, residual, dz, dresidual) share one storage dtype `kind`.
// Per-channel vectors (mean, var, invstd, weight, scale, shift, dweight, dbias) and the workspace
// are in the accumulation dtype: float64 when kind == kFloat64, float32 otherwise.
//
// Every launcher returns a LaunchStatus: cudaSuccess, or the error of the first launch that
// failed together with that kernel's name, so the binding can raise a precise Python exception.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedres {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  const char* kernel = "";  // name of the kernel whose launch failed; "" on success
  bool ok() const { return error == cudaSuccess; }
};

// Per-channel mean and biased variance of z (Welford per thread, Chan merges across threads and
// CTAs, fp32 accumulation for 16/32-bit inputs).
struct StatsParams {
  const void* z = nullptr;  // [rows, channels] input, storage dtype
  void* mean = nullptr;     // [channels] output, accumulation dtype
  void* var = nullptr;      // [channels] output (biased variance), accumulation dtype
  void* workspace = nullptr;  // bn_stats_workspace_bytes() bytes of device memory, uninitialised
  int64_t rows = 0;       // N*H*W, > 0
  int64_t channels = 0;   // C, > 0
  int num_sms = 1;        // multiprocessor count of the device, sizes the grid
  ScalarKind kind = ScalarKind::kFloat32;
};

size_t bn_stats_workspace_bytes(const StatsParams& p);
LaunchStatus bn_stats(const StatsParams& p, cudaStream_t stream);

// y = act(z*scale + shift + residual), elementwise.
struct FwdParams {
  const void* z = nullptr;         // [rows, channels] input, storage dtype
  const void* residual = nullptr;  // [rows, channels] storage dtype, or nullptr for no residual
  const void* scale = nullptr;     // [channels] accumulation dtype
  const void* shift = nullptr;     // [channels] accumulation dtype
  void* y = nullptr;               // [rows, channels] output, storage dtype
  int64_t rows = 0;
  int64_t channels = 0;
  int num_sms = 1;
  ScalarKind kind = ScalarKind::kFloat32;
  bool relu = true;
};

LaunchStatus bn_act_fwd(const FwdParams& p, cudaStream_t stream);

// Backward of bn_act_fwd composed with BatchNorm:
//   g = relu ? (y <= 0 ? 0 : dy) : dy;  dresidual = g;  dbias = sum g;
//   dweight = invstd * sum g*(z - mean);  dz = a*g + b*z + c (math::bwd_coefficients).
// Training: pass 1 reduces the two sums (and writes dresidual), a finalize kernel forms dweight,
// dbias and a, b, c, pass 2 writes dz. Eval: dz = gamma*invstd*g needs no reduction, so pass 1
// writes it directly and pass 2 is skipped.
struct BwdParams {
  const void* dy = nullptr;      // [rows, channels] output gradient, storage dtype
  const void* y = nullptr;       // [rows, channels] saved forward output (ReLU mask), storage dtype
  const void* z = nullptr;       // [rows, channels] saved conv output, storage dtype
  const void* mean = nullptr;    // [channels] statistics used in forward, accumulation dtype
  const void* invstd = nullptr;  // [channels] accumulation dtype
  const void* weight = nullptr;  // [channels] gamma (ones when not affine), accumulation dtype
  void* dz = nullptr;            // [rows, channels] output, storage dtype
  void* dresidual = nullptr;     // [rows, channels] output (= g), storage dtype; nullptr: no residual
  void* dweight = nullptr;       // [channels] output, accumulation dtype
  void* dbias = nullptr;         // [channels] output, accumulation dtype
  void* workspace = nullptr;     // bn_act_bwd_workspace_bytes() bytes of device memory, uninitialised
  int64_t rows = 0;
  int64_t channels = 0;
  int num_sms = 1;
  ScalarKind kind = ScalarKind::kFloat32;
  bool relu = true;
  bool training = true;
};

size_t bn_act_bwd_workspace_bytes(const BwdParams& p);
LaunchStatus bn_act_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedres

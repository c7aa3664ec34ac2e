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

// y = relu(z*scale + shift + residual) plus its packed ReLU mask: bit k of mask[j] (LSB first) is
// !(y <= 0) for element 8j + k of y in memory order, the elements through which the backward
// passes the gradient; the padding bits of the last byte are 0. Memory order is NHWC
// (channel_run = 1) or NCHW (channel_run = H*W): the channel of element e is
// (e / channel_run) % channels. NHWC with channels % 8 == 0 and 16-byte aligned buffers runs a
// vector kernel (each thread owns 8 channels, one mask byte per row); anything else, and fp64,
// runs a kernel over flat runs of 8 elements.
struct FwdMaskParams {
  const void* z = nullptr;         // [numel] input in memory order, storage dtype
  const void* residual = nullptr;  // [numel] storage dtype, z's order, or nullptr for no residual
  const void* scale = nullptr;     // [channels] accumulation dtype
  const void* shift = nullptr;     // [channels] accumulation dtype
  void* y = nullptr;               // [numel] output, z's order, storage dtype
  uint8_t* mask = nullptr;         // [(numel + 7) / 8] output
  int64_t numel = 0;               // N*C*H*W, > 0
  int64_t channels = 0;            // C
  int64_t channel_run = 1;         // consecutive elements of one channel in memory: 1 or H*W
  int num_sms = 1;
  ScalarKind kind = ScalarKind::kFloat32;
};

LaunchStatus bn_act_fwd_mask(const FwdMaskParams& p, cudaStream_t stream);

// Backward of bn_act_fwd composed with BatchNorm:
//   g = relu ? (y <= 0 ? 0 : dy) : dy  (with a mask: g = bit ? dy : 0);  dresidual = g;  dbias = sum g;
//   dweight = invstd * sum g*(z - mean);  dz = a*g + b*z + c (math::bwd_coefficients).
// Training: pass 1 reduces the two sums (and writes dresidual), a finalize kernel forms dweight,
// dbias and a, b, c, pass 2 writes dz. Eval: dz = gamma*invstd*g needs no reduction, so pass 1
// writes it directly and pass 2 is skipped.
struct BwdParams {
  const void* dy = nullptr;      // [rows, channels] output gradient, storage dtype
  const void* y = nullptr;       // [rows, channels] saved forward output (ReLU gate), storage dtype;
                                 // not read when `mask` is set
  const uint8_t* mask = nullptr;  // packed ReLU mask of bn_act_fwd_mask in NHWC order, or nullptr;
                                  // when set, relu must be true and the gate comes from it
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

// Per-channel coefficients of a unit's forward, on the device (no host synchronisation):
//   training: invstd = 1/sqrt(var + eps) from the batch statistics `mean`/`var`, and the running
//             statistics updated in place as nn.BatchNorm2d does it (num_batches_tracked += 1;
//             factor = momentum, or 1/num_batches_tracked for the cumulative average; unbiased
//             variance var*count/(count-1));
//   eval:     invstd from the running statistics, which `mean`/`var` then point to.
//   both:     scale = gamma*invstd, shift = beta - mean*scale.
// One block walks every channel, so every thread reads num_batches_tracked before it is bumped.
struct CoefParams {
  const void* mean = nullptr;     // [channels] `stat_kind` (the running statistics in eval)
  const void* var = nullptr;      // [channels] `stat_kind`: biased batch variance / running_var
  ScalarKind stat_kind = ScalarKind::kFloat32;
  const void* gamma = nullptr;    // [channels] accumulation dtype, or nullptr for 1
  const void* beta = nullptr;     // [channels] accumulation dtype, or nullptr for 0
  void* invstd = nullptr;         // [channels] output, accumulation dtype
  void* scale = nullptr;          // [channels] output, accumulation dtype
  void* shift = nullptr;          // [channels] output, accumulation dtype
  void* running_mean = nullptr;   // [channels] `running_kind`, updated in training; or nullptr
  void* running_var = nullptr;    // [channels] `running_kind`, updated in training; or nullptr
  ScalarKind running_kind = ScalarKind::kFloat32;
  int64_t* num_batches_tracked = nullptr;  // [1], incremented in training; or nullptr
  double momentum = 0.1;
  bool cumulative = false;        // momentum=None: factor 1/num_batches_tracked
  double eps = 1e-5;
  double count = 0;               // N*H*W (training)
  int64_t channels = 0;
  ScalarKind kind = ScalarKind::kFloat32;  // activations (selects the accumulation dtype)
  bool training = true;
};

LaunchStatus bn_coefficients(const CoefParams& p, cudaStream_t stream);


LaunchStatus bn_act_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedres

// Turns the LaunchStatus of a csrc/cuda launcher into a torch error (a Python RuntimeError) that
// names the op, the kernel whose launch failed and the CUDA error. Needs c10 and the CUDA runtime
// API, so only the binding (csrc/fusedres.cpp) includes it; tests/test_cuda_compile.py builds it
// into a small module of its own to check the message without a GPU.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "cuda/bn_kernels.h"

namespace fusedres {

inline void check_launch(const cuda::LaunchStatus& st, const char* op) {
  TORCH_CHECK(st.ok(), op, ": CUDA kernel ", st.kernel, " failed: ", cudaGetErrorString(st.error),
              " (", cudaGetErrorName(st.error), ")");
}

}  // namespace fusedres

// The AVX2 + FMA build of the CPU kernels, chosen at run time when the CPU supports it (see
// bn_act_cpu.cpp). setup.py compiles every csrc/cpu/*.cpp with the same flags, so instead of
// -mavx2 this file raises the target ISA with a pragma placed before any include, and defines the
// macros with which ATen selects its AVX2 Vectorized specialisations. As in ATen's own AVX2 kernel
// files, the code here must only run after the run-time check; the table below is constant data,
// so nothing in this file executes at load time.
//
// The file name sorts after bn_act_kernels_default.cpp on purpose: setup.py links objects in
// sorted order and the linker keeps the first copy of every inline function both files
// instantiate (std::vector members, c10 helpers), so those shared copies are the portable ones
// and the DEFAULT kernels never run an AVX2 instruction on a CPU without AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRES_HAVE_AVX2_KERNELS 1
// Every libstdc++ header and the capability-neutral ATen and c10 headers come first, under the
// default target. libstdc++ 13 marks members such as ~allocator() always_inline; defined under
// the AVX2 pragma, they cannot be inlined into the special members g++ generates without it, and
// g++ 13 rejects the file ("inlining failed ... target specific option mismatch"). Included
// here, they keep the default target, which AVX2 code may inline.
#include <bits/stdc++.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#pragma GCC target("avx2,fma,f16c")
#include "cpu/target_isa_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cpu/bn_act_kernels.h"
#include "cpu/pool_kernels.h"
#include "cpu/winograd_kernels.h"
#else
#include "cpu/kernels.h"
#endif

namespace fusedres {
namespace cpu {

const KernelTable* kernel_table_avx2() {
#if defined(FUSEDRES_HAVE_AVX2_KERNELS)
  static constexpr KernelTable table{"AVX2", &AVX2::bn_stats_kernel, &AVX2::bn_act_fwd_kernel,
                                     &AVX2::bn_act_bwd_kernel,
                                     &AVX2::bn_train_fwd_kernel, &AVX2::max_pool_kernel,
                                     &AVX2::winograd_input_kernel,
                                     &AVX2::winograd_output_kernel};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace fusedres

// The AVX-512 build of the CPU kernels, chosen at run time where ATen itself runs AVX-512 (see
// bn_act_cpu.cpp). Built the way bn_act_kernels_x86_avx2.cpp is (that file explains the target
// pragma, the include order and why the file name must sort after bn_act_kernels_default.cpp),
// with ATen's AVX512 flags (avx512f, bw, vl, dq and fma) and its AVX512 Vectorized
// specialisations: 16 floats or 32 bfloat16 values per vector, where the AVX2 build converts a
// bfloat16 vector to float in two 8-lane halves.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRES_HAVE_AVX512_KERNELS 1
#include <bits/stdc++.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FUSEDRES_TARGET_AVX512
#include "cpu/target_isa_macros.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "cpu/bn_act_kernels.h"
#include "cpu/pool_kernels.h"
#include "cpu/winograd_kernels.h"
#else
#include "cpu/kernels.h"
#endif

namespace fusedres {
namespace cpu {

const KernelTable* kernel_table_avx512() {
#if defined(FUSEDRES_HAVE_AVX512_KERNELS)
  static constexpr KernelTable table{"AVX512", &AVX512::bn_stats_kernel,
                                     &AVX512::bn_act_fwd_kernel, &AVX512::bn_act_bwd_kernel,
                                     &AVX512::bn_train_fwd_kernel, &AVX512::max_pool_kernel,
                                     &AVX512::winograd_input_kernel,
                                     &AVX512::winograd_output_kernel};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace fusedres

// The portable build of the CPU kernels: at::vec::Vectorized's generic implementation, which the
// compiler vectorises for the baseline ISA of the build (SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "cpu/bn_act_kernels.h"
#include "cpu/pool_kernels.h"
#include "cpu/winograd_kernels.h"

namespace fusedres {
namespace cpu {

const KernelTable* kernel_table_default() {
  static constexpr KernelTable table{"DEFAULT", &DEFAULT::bn_stats_kernel,
                                     &DEFAULT::bn_act_fwd_kernel, &DEFAULT::bn_act_bwd_kernel,
                                     &DEFAULT::bn_train_fwd_kernel, &DEFAULT::max_pool_kernel,
                                     &DEFAULT::winograd_input_kernel,
                                     &DEFAULT::winograd_output_kernel};
  return &table;
}

}  // namespace cpu
}  // namespace fusedres

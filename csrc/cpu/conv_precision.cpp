// Which reduced-precision CPU convolutions run in float32 (conv_precision.h says why).
#include "cpu/conv_precision.h"

#include <atomic>

namespace fusedres {
namespace cpu {
namespace {

// Constant-initialised (no environment to read): set at load by fusedres/_ext.py.
std::atomic<bool> bfloat16_in_float32{false};
std::atomic<bool> float16_in_float32{false};

}  // namespace

void set_conv_in_float32(bool bfloat16, bool float16) {
  bfloat16_in_float32.store(bfloat16);
  float16_in_float32.store(float16);
}

bool conv_in_float32(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return bfloat16_in_float32.load();
  if (dtype == at::kHalf) return float16_in_float32.load();
  return false;
}

}  // namespace cpu
}  // namespace fusedres

// Which reduced-precision CPU convolutions run in float32 (conv_precision.h says why).
#include "cpu/conv_precision.h"

#include <atomic>

namespace fusedres {
namespace cpu {
namespace {

std::atomic<bool>& bfloat16_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

std::atomic<bool>& float16_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

}  // namespace

void set_conv_in_float32(bool bfloat16, bool float16) {
  bfloat16_flag().store(bfloat16);
  float16_flag().store(float16);
}

bool conv_in_float32(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return bfloat16_flag().load();
  if (dtype == at::kHalf) return float16_flag().load();
  return false;
}

}  // namespace cpu
}  // namespace fusedres

// Generic float helpers shared by every op family, host and device.
#pragma once

#include <cstdint>
#include <cstring>

#include "unlearn/macros.h"

namespace unlearn {

// Finite test on the float's bit pattern (exponent not all ones): the same answer on host and
// device, without a libm call.
UE_HOST_DEVICE bool is_finite_float(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7f800000u) != 0x7f800000u;
}

}  // namespace unlearn

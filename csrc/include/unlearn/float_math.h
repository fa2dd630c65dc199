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

// A float's bit pattern as int32 and back. For non-negative floats the integer order is the float
// order, so minima of radii reduce as integers (which vectorizes without -ffast-math).
UE_HOST_DEVICE int32_t float_bits(float f) {
  int32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
}

UE_HOST_DEVICE float bits_float(int32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

}  // namespace unlearn

// Per-element math of the history codecs (DESIGN section 5), written once for CPU and CUDA.
//
// Blockwise absmax quantization. Each tensor of a list is cut into blocks of `block_size`
// consecutive elements (row-major order of the tensor; the last block of a tensor may be short;
// blocks never span two tensors). A block stores one float32 scale and one code per element:
//   absmax = max |x| over the block's finite elements (non-finite elements count as 0)
//   scale  = absmax / qmax                    qmax = 127 (int8) or 7 (int4), float32 division
//   inv    = min(1 / scale, FLT_MAX)          once per block, float32 division
//   code   = round_half_even(clamp(x * inv, -qmax, qmax))     (0 for a zero block or non-finite x)
//   deq    = float(code) * scale
// so |x - deq| <= scale / 2 + 2^-22 * absmax for every finite x of the block (half a step, plus
// the float roundings of 1 / scale, x * inv and code * scale, each at most 2^-24 relative).
// Multiplying by the block's inverse instead of dividing every element is what keeps the
// encoder near memory speed on CPU (a 512-bit division costs ~6 cycles on Zen 4).
// int8 codes are int8; int4 codes are symmetric in -7..7, two per byte, low nibble first
// (element 2i in bits 0-3, element 2i+1 in bits 4-7, as two's-complement nibbles; the high
// nibble of a tensor's odd last element is 0).
//
// Bit-exactness with the reference (unlearn_ext/reference/codecs.py) relies on every operation
// being one IEEE float32 operation rounded to nearest, in the order written here: no contraction
// of a*b+c into an FMA (the CPU file disables it with a pragma, the CUDA path uses __fmul_rn and
// __fadd_rn), and the inverse scale computed exactly as written (one IEEE division).
#pragma once

#include <cstdint>

#include "unlearn/float_math.h"
#include "unlearn/macros.h"

namespace unlearn {

constexpr int64_t kMinBlock = 64;
constexpr int64_t kMaxBlock = 4096;

UE_HOST_DEVICE float codec_qmax(int bits) { return bits == 8 ? 127.0f : 7.0f; }

// The one C++ source of code and scale sizes (the Python one is unlearn_ext/reference/codecs.py):
// codes (entries) of `numel` elements: int8 one per element, int4 two per byte. For an even
// element index e it is also where element e's codes start, since blocks own whole bytes.
UE_HOST_DEVICE int64_t code_numel(int64_t numel, int64_t bits) { return bits == 8 ? numel : (numel + 1) / 2; }
// Blocks (= scales) of a tensor of `numel` elements.
UE_HOST_DEVICE int64_t block_count(int64_t numel, int64_t block_size) { return (numel + block_size - 1) / block_size; }

// One float32 product and one sum, each rounded once (never fused into an FMA).
UE_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
UE_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
UE_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
UE_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// |v| for a finite v, 0 otherwise: the absmax ignores NaN/Inf so one bad value cannot wipe out a
// block (callers that must refuse non-finite input check before encoding).
UE_HOST_DEVICE float finite_abs(float v) { return is_finite_float(v) ? fabsf(v) : 0.0f; }

UE_HOST_DEVICE float max_of(float m, float a) { return a > m ? a : m; }

// The bit pattern of finite_abs(v). Non-negative floats order like their bit patterns, so an
// absmax can be an integer max, which compilers vectorize without -ffast-math (a float max
// reduction needs -ffinite-math-only and -fno-signed-zeros to vectorize in GCC).
// Signed int32 on purpose: GCC 12 vectorizes a signed max reduction with this select, not an
// unsigned one.
UE_HOST_DEVICE int32_t finite_abs_bits(float v) {
  int32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  bits &= 0x7fffffff;
  return bits < 0x7f800000 ? bits : 0;
}

UE_HOST_DEVICE float block_scale(float absmax, float qmax) { return div_rn(absmax, qmax); }

// Round half to even for |y| < 2^22: adding 1.5 * 2^23 moves y into the binade whose ulp is 1, so
// the float addition itself rounds y to an integer (ties to even, the IEEE default), and the
// subtraction is exact. Identical to rintf/torch.round there, and it vectorizes everywhere.
UE_HOST_DEVICE float round_half_even(float y) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return sub_rn(add_rn(y, magic), magic);
}

// 1 / scale of a block with scale > 0, capped so that a subnormal scale cannot give inf (and
// 0 * inf = NaN for the block's zeros).
UE_HOST_DEVICE float inverse_scale(float scale) {
  const float inv = div_rn(1.0f, scale);
  return inv < 3.4028234663852886e38f ? inv : 3.4028234663852886e38f;
}

// Code of v in a block with scale > 0, given inv = inverse_scale(scale). The clamp comes first
// because |v * inv| may exceed qmax by an ulp or two; NaN/Inf become 0 before the conversion.
UE_HOST_DEVICE int32_t quantize_in_block(float v, float inv, float qmax) {
  float y = mul_rn(v, inv);
  y = y < -qmax ? -qmax : y;
  y = y > qmax ? qmax : y;
  y = is_finite_float(v) ? y : 0.0f;
  return static_cast<int32_t>(round_half_even(y));
}

// Any block: a zero block (scale 0) has all codes 0.
UE_HOST_DEVICE int32_t quantize_value(float v, float scale, float qmax) {
  return scale > 0.0f ? quantize_in_block(v, inverse_scale(scale), qmax) : 0;
}

UE_HOST_DEVICE float dequantize_value(int32_t code, float scale) {
  return mul_rn(static_cast<float>(code), scale);
}

// int4 packing: two's-complement nibbles, low nibble = even element.
UE_HOST_DEVICE uint8_t pack_int4(int32_t lo, int32_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
UE_HOST_DEVICE int32_t int4_low(uint8_t byte) { return static_cast<int32_t>((byte & 0xF) ^ 0x8) - 8; }
UE_HOST_DEVICE int32_t int4_high(uint8_t byte) { return static_cast<int32_t>((byte >> 4) ^ 0x8) - 8; }

// Closed-loop delta: the reconstruction moves by exactly the dequantized delta, so the decoder,
// which adds the same dequantized values in the same order, ends at the same bits.
UE_HOST_DEVICE float recon_update(float recon, int32_t code, float scale) {
  return add_rn(recon, dequantize_value(code, scale));
}

// y + alpha * deq, two roundings (alpha * deq, then the sum); with alpha = 1 this equals
// recon_update, which is what makes decoding a delta chain with axpy bit-exact.
UE_HOST_DEVICE float axpy_value(float y, float alpha, int32_t code, float scale) {
  return add_rn(y, mul_rn(alpha, dequantize_value(code, scale)));
}

}  // namespace unlearn

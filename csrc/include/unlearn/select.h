// Per-element math of the selection family (DESIGN section 7, our formulation), host + device.
//
// Every selection is "the largest keys win": each element gets an unsigned 32-bit key whose integer
// order is the order we want, and an element is selected iff
//     key > threshold  or  (key == threshold and global index < boundary),
// with threshold in [-1, 2^32] (held in int64: -1 selects everything, 2^32 nothing) and boundary a
// global index (ties at the threshold are taken from the lowest global index up, so a top-K picks
// exactly K). The keys:
//   * kKeyValue: the score as given, through the order-preserving float map (flip all bits of a
//     negative float, set the sign bit of a non-negative one); -0.0 is read as +0.0;
//   * kKeyAbs:   the same map of |score| (saliency: the default of the perturbation methods);
//   * kKeyRandom: ~w, w = word 0 of the Philox block of the element (RNG contract, DESIGN section 3,
//     counter (offset, global index)). A top-K of these keys is a uniform K-subset (ties among
//     32-bit words are broken by index, a bias of order K^2 / 2^32), and Bernoulli(p) is the
//     threshold 2^32 - 256 * levels_below(p) - 1 with no ties: key > T  <=>  (w >> 8) < levels_below(p),
//     bit for bit philox_bernoulli's draw 0.
// NaN scores have no place in an order: histograms count them apart (their last bin) so callers
// refuse them; the apply and mask passes never select them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "unlearn/macros.h"
#include "unlearn/philox.h"

namespace unlearn {

constexpr int kKeyValue = 0;
constexpr int kKeyAbs = 1;
constexpr int kKeyRandom = 2;

// What select_apply_ does to a selected coordinate (w: the parameter, s: the source list's value).
constexpr int kActSet = 0;    // w = s (reset to the stored initial weights), or 0 without a source
constexpr int kActScale = 1;  // w = alpha * w (dampen)
constexpr int kActNoise = 2;  // w = w + alpha * z, z ~ N(0, 1) by Box-Muller on the noise seed's words
constexpr int kActAxpy = 3;   // w = w + alpha * s (one step of normalized ascent: s the masked gradient)

UE_HOST_DEVICE uint32_t float_as_u32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// Order-preserving map of a float to uint32: a < b as floats  <=>  key(a) < key(b). Branch-free
// (the CPU loops vectorize). NaNs land outside the keys of [-inf, +inf] (see key_is_nan).
UE_HOST_DEVICE uint32_t order_key(float v) {
  uint32_t b = float_as_u32(v);
  b = b == 0x80000000u ? 0u : b;  // -0.0 ranks with +0.0
  const uint32_t neg = static_cast<uint32_t>(static_cast<int32_t>(b) >> 31);
  return b ^ (neg | 0x80000000u);  // negative: all bits flipped; non-negative: sign bit set
}

// The key of |v| (the sign bit cleared, then set).
UE_HOST_DEVICE uint32_t order_key_abs(float v) { return float_as_u32(v) | 0x80000000u; }

// key(-inf) = 0x007fffff and key(+inf) = 0xff800000: every NaN maps outside that range.
UE_HOST_DEVICE bool key_is_nan(uint32_t key) { return key > 0xff800000u || key < 0x007fffffu; }

UE_HOST_DEVICE uint32_t random_key(uint64_t seed, uint64_t offset, uint64_t element) {
  return ~philox_block_for(seed, offset, 0, element).w[0];
}

// The key of a score under a (non-random) mode; `nan` tells the caller to keep it out of any order.
UE_HOST_DEVICE uint32_t score_key(float v, int mode, bool& nan) {
  const uint32_t key = mode == kKeyAbs ? order_key_abs(v) : order_key(v);
  nan = key_is_nan(key);
  return key;
}

UE_HOST_DEVICE bool is_selected(uint32_t key, int64_t global, int64_t threshold, int64_t boundary) {
  const int64_t k = static_cast<int64_t>(key);
  return k > threshold || (k == threshold && global < boundary);
}

// A standard normal from two contract words (Box-Muller, in double: backends may differ by an ulp).
UE_HOST_DEVICE float box_muller(uint32_t w0, uint32_t w1) {
  const double u1 = uniform_from_word(w0), u2 = uniform_from_word(w1);
  return static_cast<float>(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// The new value of a selected coordinate (fp32 math, one rounding by the caller's store).
UE_HOST_DEVICE float apply_action(int action, float w, float s, float alpha, uint64_t noise_seed,
                                  uint64_t noise_offset, uint64_t element) {
  switch (action) {
    case kActSet: return s;
    case kActScale: return alpha * w;
    case kActNoise: {
      const PhiloxBlock r = philox_block_for(noise_seed, noise_offset, 0, element);
      return w + alpha * box_muller(r.w[0], r.w[1]);
    }
    default: return w + alpha * s;
  }
}

}  // namespace unlearn

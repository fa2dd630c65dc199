// Selection keys on the CPU, a tile at a time, and 16-lane comparisons of a tile's keys.
//
// The per-element key math is unlearn/select.h's (shared with CUDA); this header only makes it
// fast: score keys come from a plain loop GCC vectorizes, random keys from the AVX-512 Philox of
// philox_avx512.h (the scalar Philox would cost more than the rest of a pass). Consumers then test
// 16 keys per instruction (LaneMask) and visit only the lanes that matter, which at a top-1% is a
// few lanes per thousand.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_walk.h"
#include "philox_avx512.h"
#include "unlearn/select.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace unlearn {
namespace cpu {

constexpr int64_t kKeyTile = 256;  // keys are computed a tile at a time into a stack buffer, then consumed

// The element pointer the key functions read, taken once per span rather than once per tile
// (data_ptr checks the dtype and the storage on every call: ~8% of a first pass when called per
// tile). Random keys read no scores (the list may be the parameters, passed for their shapes).
template <typename T>
inline const T* key_source(const at::Tensor& scores, int mode) {
  return mode == kKeyRandom ? nullptr : scores.data_ptr<T>();
}

// Random keys of global elements [g, g + n) into out. Out of line: the AVX-512 Philox is large, and
// inlined into every pass it crowds the score path out of the inliner's budget.
__attribute__((noinline)) inline void random_tile_keys(uint64_t seed, uint64_t offset, int64_t n, int64_t g,
                                                       uint32_t* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 64 <= n; j += 64) philox_word0_avx512<4>(seed, offset, static_cast<uint64_t>(g + j), out + j);
  for (; j + 16 <= n; j += 16) philox_word0_avx512<1>(seed, offset, static_cast<uint64_t>(g + j), out + j);
  for (int64_t i = 0; i < j; ++i) out[i] = ~out[i];
#endif
  for (; j < n; ++j) out[j] = random_key(seed, offset, static_cast<uint64_t>(g + j));
}

// Keys of elements [lo, lo + n) of a contiguous score tensor (its elements at `scores`, from
// key_source) into out (global index of element lo: g). Always inlined: a call per 256-key tile
// (with its stores and reloads) cost a fused apply ~1.3x when GCC stopped inlining it.
template <typename T>
inline __attribute__((always_inline)) void tile_keys(const T* scores, int mode, uint64_t seed, uint64_t offset,
                                                     int64_t lo, int64_t n, int64_t g, uint32_t* out) {
  if (mode == kKeyRandom) return random_tile_keys(seed, offset, n, g, out);
  const T* v = scores + lo;
  if (mode == kKeyAbs) {
    for (int64_t j = 0; j < n; ++j) out[j] = order_key_abs(load_float(v[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = order_key(load_float(v[j]));
  }
}

// The key of one element (samples, serial scans).
template <typename T>
inline uint32_t element_key(const T* scores, int mode, uint64_t seed, uint64_t offset, int64_t i, int64_t global) {
  if (mode == kKeyRandom) return random_key(seed, offset, static_cast<uint64_t>(global));
  const float v = load_float(scores[i]);
  return mode == kKeyAbs ? order_key_abs(v) : order_key(v);
}

// Keys that take part in an order: all random keys; score keys of non-NaN scores (select.h).
inline uint32_t ordered_key_min(int mode) { return mode == kKeyRandom ? 0u : 0x007fffffu; }
inline uint32_t ordered_key_max(int mode) { return mode == kKeyRandom ? 0xffffffffu : 0xff800000u; }

// Bit j set for the lanes j of keys[0..16) (the first `valid` lanes only) with lo <= key <= hi.
inline uint32_t lanes_in(const uint32_t* keys, int valid, uint32_t lo, uint32_t hi) {
  const uint32_t live = valid >= 16 ? 0xffffu : (1u << valid) - 1u;
#if defined(__AVX512F__)
  const __m512i k = _mm512_loadu_si512(keys);
  return live & _mm512_cmpge_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(lo))) &
         _mm512_cmple_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(hi)));
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<uint32_t>(keys[j] >= lo && keys[j] <= hi) << j;
  return live & m;
#endif
}

inline int lane_count(uint32_t mask) { return __builtin_popcount(mask); }

// A 16-key block against a key range [lo, hi]: the lanes that take part in an order (ordered:
// key_lo <= key <= key_hi), and of those the lanes above the range and inside it. Both passes of
// the fused top-K classify every block this way (the near histogram's bracket, the apply's
// threshold bin); one load and five compares, where three separate lanes_in calls cost six
// compares, three loads and their live masks (~1.1x faster single-threaded in a stand-alone
// microbenchmark of the first pass).
struct BlockLanes {
  uint32_t ordered, above, inside;
};

inline BlockLanes classify_block(const uint32_t* keys, int valid, uint32_t key_lo, uint32_t key_hi, uint32_t lo,
                                 uint32_t hi) {
#if defined(__AVX512F__)
  const uint32_t live = valid >= 16 ? 0xffffu : (1u << valid) - 1u;
  const __m512i k = _mm512_loadu_si512(keys);
  const uint32_t ordered = live & _mm512_cmpge_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(key_lo))) &
                           _mm512_cmple_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(key_hi)));
  const uint32_t above = ordered & _mm512_cmpgt_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(hi)));
  const uint32_t inside = ordered & ~above & _mm512_cmpge_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(lo)));
  return {ordered, above, inside};
#else
  const uint32_t ordered = lanes_in(keys, valid, key_lo, key_hi);
  const uint32_t above = hi == 0xffffffffu ? 0u : ordered & lanes_in(keys, valid, hi + 1, 0xffffffffu);
  return {ordered, above, ordered & lanes_in(keys, valid, lo, hi)};
#endif
}

// Calls f(j) for each set bit j of mask, lowest first.
template <typename F>
inline void for_each_lane(uint32_t mask, F&& f) {
  for (; mask != 0; mask &= mask - 1) f(__builtin_ctz(mask));
}

// Branch-free gathering of the few lanes that matter. A pass that visits its selected lanes inside
// the scan pays a mispredicted branch per 16-key block that holds one (at a top-1% that is ~1 block
// in 4), and a store into the parameter list that misses the cache stalls the scan behind it; so
// passes append the lanes to a small buffer here (no branch) and visit the buffer afterwards.
// Both helpers write a whole 16-lane register: `out` needs room for 16 entries past the returned
// count's start, and only the first `count` written entries are meaningful.

// Appends keys[j] for each lane j set in mask (lowest first) to out; returns the count.
inline int compress_keys(const uint32_t* keys, uint32_t mask, uint32_t* out) {
#if defined(__AVX512F__)
  // Compress into a register, then a plain store (a compressing store to memory is microcoded on Zen 4).
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(static_cast<__mmask16>(mask), _mm512_loadu_si512(keys)));
  return lane_count(mask);
#else
  int n = 0;
  for_each_lane(mask, [&](int j) { out[n++] = keys[j]; });
  return n;
#endif
}

// Appends first + j for each lane j set in mask (lowest first) to out; returns the count.
inline int compress_lane_indices(int32_t first, uint32_t mask, int32_t* out) {
#if defined(__AVX512F__)
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(first), lanes);
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(static_cast<__mmask16>(mask), idx));
  return lane_count(mask);
#else
  int n = 0;
  for_each_lane(mask, [&](int j) { out[n++] = first + j; });
  return n;
#endif
}

}  // namespace cpu
}  // namespace unlearn

// Selection keys on the CPU, a tile at a time, and 16-lane comparisons of a tile's keys.
//
// The per-element key math is unlearn/select.h's (shared with CUDA); this header only makes it
// fast: score keys come from a plain loop GCC vectorizes, random keys from the vector Philox of
// philox_avx512.h / philox_avx2.h / philox_neon.h (the scalar Philox would cost more than the rest of
// a pass).
// Consumers then test 16 keys at a time (lane masks) and visit only the lanes that matter, which at
// a top-1% is a few lanes per thousand.
//
// Compiled once per ISA copy of select_cpu.cpp: include it after isa_target.h; its functions live in
// the copy's namespace (isa.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_walk.h"
#include "unlearn/select.h"

#if defined(UNLEARN_ISA_AVX512)
#include "philox_avx512.h"
#elif defined(UNLEARN_ISA_AVX2)
#include "philox_avx2.h"
#elif defined(UNLEARN_ISA_NEON)
#include "philox_neon.h"
#endif

namespace unlearn {
namespace cpu {
namespace UNLEARN_ISA {

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
#if defined(UNLEARN_ISA_AVX512)
  for (; j + 64 <= n; j += 64) philox_word0_avx512<4>(seed, offset, static_cast<uint64_t>(g + j), out + j);
  for (; j + 16 <= n; j += 16) philox_word0_avx512<1>(seed, offset, static_cast<uint64_t>(g + j), out + j);
  for (int64_t i = 0; i < j; ++i) out[i] = ~out[i];
#elif defined(UNLEARN_ISA_AVX2)
  for (; j + 8 <= n; j += 8) {
    const __m256i word0 = philox_word0_avx2(seed, offset, static_cast<uint64_t>(g + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_xor_si256(word0, _mm256_set1_epi32(-1)));
  }
#elif defined(UNLEARN_ISA_NEON)
  j = random_keys_neon(seed, offset, n, static_cast<uint64_t>(g), out);
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

#if defined(UNLEARN_ISA_AVX2)
// AVX2 has no unsigned compares: keys and bounds are compared as signed after flipping the top bit.
inline __m256i biased_keys8(const uint32_t* keys) {
  return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys)),
                          _mm256_set1_epi32(static_cast<int>(0x80000000u)));
}
inline __m256i biased(uint32_t bound) { return _mm256_set1_epi32(static_cast<int>(bound ^ 0x80000000u)); }
// Bit j set for the lanes j of 8 biased keys with lo <= key <= hi (bounds biased too).
inline uint32_t lanes_in8(__m256i k, __m256i lo, __m256i hi) {
  const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(lo, k), _mm256_cmpgt_epi32(k, hi));
  return static_cast<uint32_t>(~_mm256_movemask_ps(_mm256_castsi256_ps(out))) & 0xffu;
}
// Bit j set for the lanes j of 8 biased keys above `hi` (biased).
inline uint32_t lanes_above8(__m256i k, __m256i hi) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, hi))));
}
#endif

// Bit j set for the lanes j of keys[0..16) (the first `valid` lanes only) with lo <= key <= hi.
inline uint32_t lanes_in(const uint32_t* keys, int valid, uint32_t lo, uint32_t hi) {
  const uint32_t live = valid >= 16 ? 0xffffu : (1u << valid) - 1u;
#if defined(UNLEARN_ISA_AVX2)
  const __m256i l = biased(lo), h = biased(hi);
  return live & (lanes_in8(biased_keys8(keys), l, h) | lanes_in8(biased_keys8(keys + 8), l, h) << 8);
#elif defined(UNLEARN_ISA_AVX512)
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
#if defined(UNLEARN_ISA_AVX2)
  const uint32_t live = valid >= 16 ? 0xffffu : (1u << valid) - 1u;
  const __m256i k0 = biased_keys8(keys), k1 = biased_keys8(keys + 8);
  const __m256i klo = biased(key_lo), khi = biased(key_hi), h = biased(hi), l = biased(lo);
  const uint32_t ordered = live & (lanes_in8(k0, klo, khi) | lanes_in8(k1, klo, khi) << 8);
  const uint32_t above = ordered & (lanes_above8(k0, h) | lanes_above8(k1, h) << 8);
  // inside: ordered, not above, and >= lo, i.e. not below lo
  const uint32_t below = lanes_above8(l, k0) | lanes_above8(l, k1) << 8;  // lo > key
  return {ordered, above, ordered & ~above & ~below & 0xffffu};
#elif defined(UNLEARN_ISA_AVX512)
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

#if defined(UNLEARN_ISA_AVX2)
// AVX2 has no compress: a table gives, per 8-bit lane mask, the set lanes' indices (lowest first) as
// 4-bit fields of one word, which become a vpermd index vector.
struct CompressTable8 {
  uint32_t fields[256];
  constexpr CompressTable8() : fields{} {
    for (unsigned mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (unsigned j = 0; j < 8; ++j)
        if ((mask >> j) & 1u) fields[mask] |= j << (4 * n++);
    }
  }
};
inline constexpr CompressTable8 kCompressTable8{};

// Writes the lanes of v set in mask8 (lowest first) to out[0..8); returns their count.
inline int compress8(__m256i v, uint32_t mask8, uint32_t* out) {
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompressTable8.fields[mask8])),
                                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(v, idx));
  return __builtin_popcount(mask8);
}
#endif

// Appends keys[j] for each lane j set in mask (lowest first) to out; returns the count.
inline int compress_keys(const uint32_t* keys, uint32_t mask, uint32_t* out) {
#if defined(UNLEARN_ISA_AVX2)
  const int n = compress8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys)), mask & 0xffu, out);
  return n + compress8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + 8)), mask >> 8, out + n);
#elif defined(UNLEARN_ISA_AVX512)
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
#if defined(UNLEARN_ISA_AVX2)
  const __m256i lanes = _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  const int n = compress8(lanes, mask & 0xffu, o);
  return n + compress8(_mm256_add_epi32(lanes, _mm256_set1_epi32(8)), mask >> 8, o + n);
#elif defined(UNLEARN_ISA_AVX512)
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

}  // namespace UNLEARN_ISA
}  // namespace cpu
}  // namespace unlearn

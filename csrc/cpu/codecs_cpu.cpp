// CPU kernels of the history codecs: blockwise quantize / dequantize, closed-loop delta encode,
// dequantize-axpy and dequantize-dot, for every code Format (linear int8 / int4, the normal-quantile
// 4-bit and the companded 8-bit codebooks). Per-element math is in unlearn/codecs.h; this file
// walks blocks (cpu_walk.h's block walk over the global block numbers of the list) and keeps one
// block's values in a small stack buffer between its absmax pass and its quantize pass. Inner
// loops are instantiated per format (with_format), so each is branch-free and vectorizes.
//
// Contraction of a*b+c into an FMA is disabled for this file: the reconstruction update and the
// axpy must round exactly as the reference does (two roundings), or decoders would drift from the
// encoder by an ulp per step. It is placed before every include so all inlined code agrees.
#pragma GCC optimize("fp-contract=off")

#include <cmath>
#include <torch/library.h>

#include <type_traits>

#include "cpu_walk.h"
#include "per_isa_ops.h"
#include "unlearn/codec_list.h"
#include "unlearn/codecs.h"

#include "isa_target.h"  // from here on: this copy's ISA (isa.h)

namespace unlearn {
namespace cpu {
namespace UNLEARN_ISA {
namespace {

// Integer max over bit patterns (see finite_abs_bits): vectorizes, equals the float absmax.
inline float block_absmax(const float* x, int64_t n) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = finite_abs_bits(x[i]);
    m = m > b ? m : b;
  }
  return bits_float(m);
}

// Whether +absmax occurs in the block (kNormal4's scale is the signed absmax): the largest finite
// positive value's bit pattern equals the absmax's. An integer max again, so it vectorizes.
inline bool absmax_is_positive(const float* x, int64_t n, float absmax) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    std::memcpy(&b, &x[i], sizeof(b));
    b = (b > 0 && b < 0x7f800000) ? b : 0;  // positive finite floats only (sign bit clear)
    m = m > b ? m : b;
  }
  return bits_float(m) == absmax;
}

// Scale of a block of fp32 values.
inline float block_scale_of(const float* v, int64_t n, int format) {
  const float absmax = block_absmax(v, n);
  return format_scale(absmax, format == kNormal4 && absmax_is_positive(v, n, absmax), format);
}

// Calls f(std::integral_constant<int, format>) so per-element loops see the format as a constant.
template <typename F>
inline void with_format(int format, F&& f) {
  switch (format) {
    case kInt8: f(std::integral_constant<int, kInt8>{}); break;
    case kInt4: f(std::integral_constant<int, kInt4>{}); break;
    case kNormal4: f(std::integral_constant<int, kNormal4>{}); break;
    default: f(std::integral_constant<int, kCompand8>{}); break;
  }
}

// The block's values as fp32: the input itself for float32, else converted into buf.
template <typename T>
inline const float* block_as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = load_float(src[i]);
    return buf;
  }
}

// Writes the codes of n values (already fp32) with the given scale. 4-bit formats pack pairs; n is
// even except for a tensor's last block (whose odd element's high nibble is 0).
template <int F>
void write_codes(const float* v, int64_t n, float scale, uint8_t* codes_at) {
  constexpr int bits = format_bits(F);
  if (!(scale != 0.0f)) {  // zero block: hoisted, so the loops below have no per-element branch on it
    const int z = zero_code(F);
    std::memset(codes_at, bits == 8 ? z : (z | (z << 4)), static_cast<size_t>(n / (bits == 8 ? 1 : 2)));
    if (bits == 4 && n % 2) codes_at[n / 2] = pack_int4(z, 0);
    return;
  }
  const float inv = block_inverse(scale);
  if constexpr (bits == 8) {
    int8_t* c = reinterpret_cast<int8_t*>(codes_at);  // int8 codes in the same byte buffer
    for (int64_t i = 0; i < n; ++i) c[i] = static_cast<int8_t>(encode_in_block(v[i], inv, F));
  } else {
    uint8_t* c = codes_at;
    const int64_t pairs = n / 2;
    for (int64_t p = 0; p < pairs; ++p)
      c[p] = pack_int4(encode_in_block(v[2 * p], inv, F), encode_in_block(v[2 * p + 1], inv, F));
    if (n % 2) c[pairs] = pack_int4(encode_in_block(v[n - 1], inv, F), 0);
  }
}

// Calls f(i, code) for the n codes of one block.
template <int F, typename Fn>
inline void read_codes(const void* codes_at, int64_t n, Fn&& f) {
  if constexpr (format_bits(F) == 8) {
    const int8_t* c = static_cast<const int8_t*>(codes_at);
    for (int64_t i = 0; i < n; ++i) f(i, static_cast<int32_t>(c[i]));
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(codes_at);
    const int64_t pairs = n / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      f(2 * p, nibble_low(c[p], F));
      f(2 * p + 1, nibble_high(c[p], F));
    }
    if (n % 2) f(n - 1, nibble_low(c[pairs], F));
  }
}

// Where the codes of element `elem` (even: a block start, or 16 elements past one) begin.
inline uint8_t* code_at(void* codes, int64_t elem, int64_t bits) {
  return static_cast<uint8_t*>(codes) + code_numel(elem, bits);
}

// Raw data pointers of a list, taken once: per-block Tensor accessors (and a dtype dispatch per
// block) cost more than quantizing a 64-element block.
inline std::vector<void*> raw_ptrs(const std::vector<at::Tensor>& list) {
  std::vector<void*> p;
  p.reserve(list.size());
  for (const auto& t : list) p.push_back(t.data_ptr());
  return p;
}

// Calls f(tag) for the one dtype of a validated float list (flatten_float_list checks it is one).
template <typename F>
inline void dispatch_list(const FlatList& list, F&& f) {
  if (!list.tensors.empty()) dispatch_float_type(list.tensors[0].scalar_type(), f);
}

// sum level_i * v_i over one block in Acc (float or double), with 16 interleaved partial sums: a
// single running sum is a serial dependency chain that GCC may not reorder (no -ffast-math), 16
// independent ones vectorize. The order is fixed, so results do not depend on threads. Linear
// codes are their own levels (int8 multipliers); codebook codes are looked up into a float buffer.
template <typename Acc, typename L, typename T>
Acc dot_levels(const L* c, const T* v, int64_t n) {
  constexpr int kLanes = 16;
  Acc acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<Acc>(c[i + l]) * static_cast<Acc>(load_float(v[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += static_cast<Acc>(c[i]) * static_cast<Acc>(load_float(v[i]));
  Acc sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

template <int F, typename Acc, typename T>
Acc block_dot(const uint8_t* codes_at, const T* v, int64_t n) {
  if constexpr (F == kInt8) {
    return dot_levels<Acc>(reinterpret_cast<const int8_t*>(codes_at), v, n);
  } else if constexpr (F == kInt4) {
    int8_t unpacked[kMaxBlock];
    read_codes<F>(codes_at, n, [&](int64_t i, int32_t code) { unpacked[i] = static_cast<int8_t>(code); });
    return dot_levels<Acc>(unpacked, v, n);
  } else {
    float levels[kMaxBlock];
    read_codes<F>(codes_at, n, [&](int64_t i, int32_t code) { levels[i] = level_of(code, F); });
    return dot_levels<Acc>(levels, v, n);
  }
}

// ---- op implementations ------------------------------------------------------------------------

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> blockwise_quantize_cpu(at::TensorList x_in,
                                                                                    int64_t bits,
                                                                                    int64_t block_size,
                                                                                    c10::string_view levels) {
  const int format = check_codec_args(bits, block_size, levels);
  const FlatList x = flatten_float_list(x_in, "x");
  CodedList out = empty_coded_list(x, bits, block_size);
  const auto src = raw_ptrs(x.tensors), codes = raw_ptrs(out.codes), scales = raw_ptrs(out.scales);
  dispatch_list(x, [&](auto tag) {
    using T = decltype(tag);
    with_format(format, [&](auto fmt) {
      constexpr int F = decltype(fmt)::value;
      parallel_over_blocks(numels_of(x.tensors), block_size, [&](size_t t, int64_t b, int64_t, int64_t e0, int64_t e1) {
        float buf[kMaxBlock];
        const int64_t n = e1 - e0;
        const float* v = block_as_float(static_cast<const T*>(src[t]) + e0, n, buf);
        const float scale = block_scale_of(v, n, F);
        static_cast<float*>(scales[t])[b] = scale;
        write_codes<F>(v, n, scale, code_at(codes[t], e0, bits));
      });
    });
  });
  return {out.codes, out.scales};
}

// int8 codes -> fp32 with non-temporal stores: a decoded history step (tens of MB) is written once
// and not read back soon, so streaming stores skip the read-for-ownership of every output line
// (~9 bytes of traffic per element become ~5). The product is the same single IEEE multiply as
// dequantize_value. Returns the number of elements done (the rest go through the scalar path).
inline int64_t dequantize_int8_stream(const int8_t* c, float scale, float* dst, int64_t n) {
#if defined(UNLEARN_ISA_AVX2)
  if (reinterpret_cast<uintptr_t>(dst) % 32 != 0) return 0;
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i));
    _mm256_stream_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), s));
  }
  return i;  // the worker fences its streaming stores once per task (parallel_over_blocks)
#elif defined(UNLEARN_ISA_AVX512)
  if (reinterpret_cast<uintptr_t>(dst) % 64 != 0) return 0;
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i));
    _mm512_stream_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), s));
  }
  return i;  // the worker fences its streaming stores once per task (parallel_over_blocks)
#else
  (void)c, (void)scale, (void)dst, (void)n;
  return 0;
#endif
}

// The walk shared by the ops that read a coded list into a value list in place (dequantize, axpy):
// one dtype and one format dispatch, then body(T tag, format tag, values, codes, scale, n) per block.
template <typename Body>
void for_each_coded_block(const CodecInputs& in, int64_t bits, int64_t block_size, Body body) {
  const auto value_ptrs = raw_ptrs(in.values.tensors), codes = raw_ptrs(in.coded.codes),
             scales = raw_ptrs(in.coded.scales);
  dispatch_list(in.values, [&](auto tag) {
    using T = decltype(tag);
    with_format(in.format, [&](auto fmt) {
      parallel_over_blocks(numels_of(in.values.tensors), block_size,
                           [&](size_t t, int64_t b, int64_t, int64_t e0, int64_t e1) {
                             body(tag, fmt, static_cast<T*>(value_ptrs[t]) + e0, code_at(codes[t], e0, bits),
                                  static_cast<const float*>(scales[t])[b], e1 - e0);
                           });
    });
  });
}

void blockwise_dequantize_cpu(at::TensorList out_in, at::TensorList codes_in, at::TensorList scales_in,
                              int64_t bits, int64_t block_size, c10::string_view levels) {
  const CodecInputs in = codec_inputs(out_in, "out", codes_in, scales_in, bits, block_size, levels);
  for_each_coded_block(in, bits, block_size, [&](auto tag, auto fmt, auto* dst, uint8_t* codes, float scale,
                                                 int64_t n) {
    using T = decltype(tag);
    constexpr int F = decltype(fmt)::value;
    int64_t done = 0;
    if constexpr (std::is_same_v<T, float> && F == kInt8)
      done = dequantize_int8_stream(reinterpret_cast<const int8_t*>(codes), scale, dst, n);
    // done is a multiple of 16 and 0 for 4-bit codes, so byte pairs are never split.
    read_codes<F>(codes + code_numel(done, bits), n - done,
                  [&](int64_t i, int32_t c) { dst[done + i] = store_as<T>(dequantize_code(c, scale, F)); });
  });
  write_back(out_in, in.values.tensors);
}

void delta_encode_cpu(at::TensorList target_in, at::TensorList recon_in, at::TensorList codes_in,
                      at::TensorList scales_in, int64_t bits, int64_t block_size, c10::string_view levels) {
  const int format = check_codec_args(bits, block_size, levels);
  const FlatList target = flatten_float_list(target_in, "target");
  check_recon_list(recon_in, target);
  std::vector<at::Tensor> recon = contiguous_work(recon_in);
  CodedList out = check_coded_list(codes_in, scales_in, target, "target", bits, block_size);
  const auto src = raw_ptrs(target.tensors), rec = raw_ptrs(recon), codes = raw_ptrs(out.codes),
             scales = raw_ptrs(out.scales);
  dispatch_list(target, [&](auto tag) {
    using T = decltype(tag);
    with_format(format, [&](auto fmt) {
      constexpr int F = decltype(fmt)::value;
      parallel_over_blocks(numels_of(target.tensors), block_size, [&](size_t t, int64_t b, int64_t, int64_t e0, int64_t e1) {
        float delta[kMaxBlock];
        const int64_t n = e1 - e0;
        float* r = static_cast<float*>(rec[t]) + e0;
        const T* w = static_cast<const T*>(src[t]) + e0;
        for (int64_t i = 0; i < n; ++i) delta[i] = sub_rn(load_float(w[i]), r[i]);
        const float scale = block_scale_of(delta, n, F);
        static_cast<float*>(scales[t])[b] = scale;
        uint8_t* codes_at = code_at(codes[t], e0, bits);
        write_codes<F>(delta, n, scale, codes_at);
        // The reconstruction moves by what the decoder will add: the dequantized code, not the delta.
        read_codes<F>(codes_at, n, [&](int64_t i, int32_t c) { r[i] = recon_update(r[i], c, scale, F); });
      });
    });
  });
  write_back(recon_in, recon);
  write_back(codes_in, out.codes);
  write_back(scales_in, out.scales);
}

void dequantize_axpy_cpu(at::TensorList y_in, double alpha, at::TensorList codes_in, at::TensorList scales_in,
                         int64_t bits, int64_t block_size, c10::string_view levels) {
  const float a = checked_alpha(alpha);
  const CodecInputs in = codec_inputs(y_in, "y", codes_in, scales_in, bits, block_size, levels);
  for_each_coded_block(in, bits, block_size, [&](auto tag, auto fmt, auto* dst, uint8_t* codes, float scale,
                                                 int64_t n) {
    using T = decltype(tag);
    constexpr int F = decltype(fmt)::value;
    read_codes<F>(codes, n, [&](int64_t i, int32_t c) {
      dst[i] = store_as<T>(axpy_value(load_float(dst[i]), a, c, scale, F));
    });
  });
  write_back(y_in, in.values.tensors);
}

at::Tensor dequantize_dot_cpu(at::TensorList codes_in, at::TensorList scales_in, at::TensorList v_in,
                              int64_t bits, int64_t block_size, c10::string_view levels) {
  const CodecInputs in = codec_inputs(v_in, "v", codes_in, scales_in, bits, block_size, levels);
  const FlatList& v = in.values;
  const CodedList& q = in.coded;
  const std::vector<int64_t> numels = numels_of(v.tensors);
  std::vector<double> partial(static_cast<size_t>(unit_offsets(numels, block_size).back()), 0.0);
  const auto v_ptrs = raw_ptrs(v.tensors), codes = raw_ptrs(q.codes), scales = raw_ptrs(q.scales);
  dispatch_list(v, [&](auto tag) {
    using T = decltype(tag);
    with_format(in.format, [&](auto fmt) {
      constexpr int F = decltype(fmt)::value;
      parallel_over_blocks(numels, block_size, [&](size_t t, int64_t b, int64_t g, int64_t e0, int64_t e1) {
        const float scale = static_cast<const float*>(scales[t])[b];
        const T* src = static_cast<const T*>(v_ptrs[t]) + e0;
        const uint8_t* c = code_at(codes[t], e0, bits);
        // The block's sum in float64 (a level times a value is exact there), then the scale: the
        // result the README promises, with no float32 cancellation inside a block.
        partial[static_cast<size_t>(g)] = block_dot<F, double>(c, src, e1 - e0) * static_cast<double>(scale);
      });
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  out.fill_(total);
  return out;
}

}  // namespace

#define UNLEARN_CODEC_OPS(X)                           \
  X("blockwise_quantize", blockwise_quantize_cpu)      \
  X("blockwise_dequantize_", blockwise_dequantize_cpu) \
  X("delta_encode_", delta_encode_cpu)                 \
  X("dequantize_axpy_", dequantize_axpy_cpu)           \
  X("dequantize_dot", dequantize_dot_cpu)

}  // namespace UNLEARN_ISA
}  // namespace cpu
}  // namespace unlearn

#include "isa_target_end.h"

// Exported by every copy, registered once by the scalar copy (per_isa_ops.h).
UNLEARN_PER_ISA_OPS(UNLEARN_CODEC_OPS)

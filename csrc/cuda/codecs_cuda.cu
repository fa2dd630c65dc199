// CUDA kernels of the history codecs. Per-element math comes from unlearn/codecs.h (shared with
// the CPU kernels); this file maps work to threads: one warp per quantization block, any number of
// blocks from any tensors of the list in one launch. A warp reduces its block's absmax with
// shuffles (no shared memory), then quantizes; 4-bit lanes own byte pairs, so no two lanes write
// the same byte (block sizes are even, so blocks own whole bytes). Kernels take the code Format
// (linear int8 / int4, normal-quantile 4-bit, companded 8-bit) as an argument; every per-element
// step is a Format-aware function of unlearn/codecs.h.
#include <torch/library.h>

#include "cuda_walk.cuh"
#include "unlearn/codec_list.h"
#include "unlearn/codecs.h"

namespace unlearn {
namespace cuda {
namespace {

// Arrays of a codec list: values (x / out / target / y / v), codes, scales, and recon (delta_encode_).
enum Slot { kValues = 0, kCodes = 1, kScales = 2, kRecon = 3 };

__device__ __forceinline__ float warp_max(float m) {
  for (int d = 16; d > 0; d >>= 1) m = max_of(m, __shfl_xor_sync(0xffffffffu, m, d));
  return m;
}

// The codec block of this warp (block walk: unit = block_size): tensor, block index inside it,
// first element and element count.
struct Block {
  int t;
  int64_t b, e0, n;
};

__device__ __forceinline__ bool warp_block(const ListView& v, Block& p) {
  Unit u;
  if (!warp_unit(v, u)) return false;
  p = Block{u.t, u.index, u.begin, u.end - u.begin};
  return true;
}

// Reads code i of a block whose codes start at element e0 (even).
__device__ __forceinline__ int32_t read_code(const void* codes, int format, int64_t e0, int64_t i) {
  if (format_bits(format) == 8) return static_cast<const int8_t*>(codes)[e0 + i];
  const uint8_t byte = static_cast<const uint8_t*>(codes)[(e0 + i) / 2];
  return (i % 2) ? nibble_high(byte, format) : nibble_low(byte, format);
}

// Quantizes a block whose fp32 values come from value(i); lanes own elements (int8) or byte pairs
// (int4). After(i, code, scale) sees every element's code, in the lane that read value(i).
template <typename Value, typename After>
__device__ __forceinline__ void quantize_block(const ListView& v, const Block& p, int format, Value&& value,
                                                After&& after) {
  const int lane = threadIdx.x % 32;
  float m = 0.0f, pos = 0.0f;
  for (int64_t i = lane; i < p.n; i += 32) {
    const float x = value(i);
    m = max_of(m, finite_abs(x));
    pos = max_of(pos, is_finite_float(x) && x > 0.0f ? x : 0.0f);
  }
  const float absmax = warp_max(m);
  // kNormal4's scale is the signed absmax: negative when the largest positive value falls short of
  // the absmax (only -absmax occurs).
  const bool positive = format == kNormal4 && warp_max(pos) == absmax;
  const float scale = format_scale(absmax, positive, format);
  if (lane == 0) static_cast<float*>(v.ptr(kScales, p.t))[p.b] = scale;
  // encode_in_block with the block's inverse computed once; a zero block gets the zero level's code.
  const bool nonzero = scale != 0.0f;
  const float inv = nonzero ? block_inverse(scale) : 0.0f;
  const int32_t zero = zero_code(format);
  auto quantize = [&](float x) { return nonzero ? encode_in_block(x, inv, format) : zero; };
  if (format_bits(format) == 8) {
    int8_t* c = static_cast<int8_t*>(v.ptr(kCodes, p.t)) + p.e0;
    for (int64_t i = lane; i < p.n; i += 32) {
      const int32_t code = quantize(value(i));
      c[i] = static_cast<int8_t>(code);
      after(i, code, scale);
    }
  } else {
    uint8_t* c = static_cast<uint8_t*>(v.ptr(kCodes, p.t)) + code_numel(p.e0, 4);
    for (int64_t j = lane; 2 * j < p.n; j += 32) {
      const int32_t lo = quantize(value(2 * j));
      const bool has_hi = 2 * j + 1 < p.n;
      const int32_t hi = has_hi ? quantize(value(2 * j + 1)) : 0;
      c[j] = pack_int4(lo, hi);
      after(2 * j, lo, scale);
      if (has_hi) after(2 * j + 1, hi, scale);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(ListView v, int format) {
  Block p;
  if (!warp_block(v, p)) return;
  const T* x = static_cast<const T*>(v.ptr(kValues, p.t)) + p.e0;
  quantize_block(v, p, format, [&](int64_t i) { return to_float(x[i]); }, [](int64_t, int32_t, float) {});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) delta_encode_kernel(ListView v, int format) {
  Block p;
  if (!warp_block(v, p)) return;
  const T* w = static_cast<const T*>(v.ptr(kValues, p.t)) + p.e0;
  float* r = static_cast<float*>(v.ptr(kRecon, p.t)) + p.e0;
  // Fused: the lane that reads element i (value) is the one that updates r[i] (after), once the
  // warp's absmax is known; no other lane touches r[i], so the in-place update cannot race.
  quantize_block(
      v, p, format, [&](int64_t i) { return sub_rn(to_float(w[i]), r[i]); },
      [&](int64_t i, int32_t code, float scale) { r[i] = recon_update(r[i], code, scale, format); });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(ListView v, int format) {
  Block p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(kScales, p.t))[p.b];
  const void* codes = v.ptr(kCodes, p.t);
  T* out = static_cast<T*>(v.ptr(kValues, p.t)) + p.e0;
  for (int64_t i = lane; i < p.n; i += 32)
    out[i] = static_cast<T>(dequantize_code(read_code(codes, format, p.e0, i), scale, format));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) axpy_kernel(ListView v, int format, float alpha) {
  Block p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(kScales, p.t))[p.b];
  const void* codes = v.ptr(kCodes, p.t);
  T* y = static_cast<T*>(v.ptr(kValues, p.t)) + p.e0;
  for (int64_t i = lane; i < p.n; i += 32)
    y[i] = static_cast<T>(axpy_value(to_float(y[i]), alpha, read_code(codes, format, p.e0, i), scale, format));
}

// Per block: double sum of level * v over the lanes (a float sum overflows where the result is finite), times the scale, added to the double output.
// The order of the atomic additions varies between runs (results agree to rounding, not bits).
template <typename T>
__global__ void __launch_bounds__(kThreads) dot_kernel(ListView v, int format, double* out) {
  Block p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(kScales, p.t))[p.b];
  const void* codes = v.ptr(kCodes, p.t);
  const T* x = static_cast<const T*>(v.ptr(kValues, p.t)) + p.e0;
  double sum = 0.0;
  for (int64_t i = lane; i < p.n; i += 32)
    sum += static_cast<double>(level_of(read_code(codes, format, p.e0, i), format)) *
           static_cast<double>(to_float(x[i]));
  for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  if (lane == 0) atomicAdd(out, sum * static_cast<double>(scale));
}

// ---- op implementations ------------------------------------------------------------------------

using CodesScales = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

CodesScales blockwise_quantize_cuda(at::TensorList x_in, int64_t bits, int64_t block_size, c10::string_view levels) {
  const int format = check_codec_args(bits, block_size, levels);
  const FlatList x = flatten_float_list(x_in, "x");
  CodedList out = empty_coded_list(x, bits, block_size);
  if (x.tensors.empty()) return {out.codes, out.scales};
  ListLaunch launch(x.tensors[0].device());
  const ListView v = launch.pack(numels_of(x.tensors), {x.tensors, out.codes, out.scales}, block_size);
  dispatch_list(x.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_warp(v, quantize_kernel<T>, format);
  });
  return {out.codes, out.scales};
}

void blockwise_dequantize_cuda(at::TensorList out_in, at::TensorList codes_in, at::TensorList scales_in,
                               int64_t bits, int64_t block_size, c10::string_view levels) {
  const CodecInputs in = codec_inputs(out_in, "out", codes_in, scales_in, bits, block_size, levels);
  const CodedList& q = in.coded;
  if (in.values.tensors.empty()) return;
  ListLaunch launch(in.values.tensors[0].device());
  // in.values holds contiguous copies where out_in's were not: those are the work tensors.
  const Array out = launch.in_place(out_in, in.values.tensors);
  const ListView v = launch.pack(numels_of(out), {out, q.codes, q.scales}, block_size);
  dispatch_list(out, [&](auto tag) {
    using T = decltype(tag);
    launch.per_warp(v, dequantize_kernel<T>, in.format);
  });
  launch.finish();
}

void delta_encode_cuda(at::TensorList target_in, at::TensorList recon_in, at::TensorList codes_in,
                       at::TensorList scales_in, int64_t bits, int64_t block_size, c10::string_view levels) {
  const int format = check_codec_args(bits, block_size, levels);
  const FlatList target = flatten_float_list(target_in, "target");
  check_recon_list(recon_in, target);
  const CodedList out = check_coded_list(codes_in, scales_in, target, "target", bits, block_size);
  if (target.tensors.empty()) return;
  ListLaunch launch(target.tensors[0].device());
  const Array recon = launch.in_place(recon_in);
  const Array codes = launch.in_place(codes_in, out.codes);
  const Array scales = launch.in_place(scales_in, out.scales);
  const ListView v = launch.pack(numels_of(target.tensors), {target.tensors, codes, scales, recon}, block_size);
  dispatch_list(target.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_warp(v, delta_encode_kernel<T>, format);
  });
  launch.finish();
}

void dequantize_axpy_cuda(at::TensorList y_in, double alpha, at::TensorList codes_in, at::TensorList scales_in,
                          int64_t bits, int64_t block_size, c10::string_view levels) {
  const float a = checked_alpha(alpha);
  const CodecInputs in = codec_inputs(y_in, "y", codes_in, scales_in, bits, block_size, levels);
  const CodedList& q = in.coded;
  if (in.values.tensors.empty()) return;
  ListLaunch launch(in.values.tensors[0].device());
  const Array y = launch.in_place(y_in, in.values.tensors);
  const ListView v = launch.pack(numels_of(y), {y, q.codes, q.scales}, block_size);
  dispatch_list(y, [&](auto tag) {
    using T = decltype(tag);
    launch.per_warp(v, axpy_kernel<T>, in.format, a);
  });
  launch.finish();
}

at::Tensor dequantize_dot_cuda(at::TensorList codes_in, at::TensorList scales_in, at::TensorList v_in, int64_t bits,
                               int64_t block_size, c10::string_view levels) {
  const CodecInputs in = codec_inputs(v_in, "v", codes_in, scales_in, bits, block_size, levels);
  const FlatList& x = in.values;
  const CodedList& q = in.coded;
  TORCH_CHECK(!x.tensors.empty(), "unlearn_ext: dequantize_dot on CUDA needs at least one tensor");
  ListLaunch launch(x.tensors[0].device());
  at::Tensor out = at::zeros({}, at::TensorOptions().device(launch.device()).dtype(at::kDouble));
  const ListView v = launch.pack(numels_of(x.tensors), {x.tensors, q.codes, q.scales}, block_size);
  dispatch_list(x.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_warp(v, dot_kernel<T>, in.format, out.data_ptr<double>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("blockwise_quantize", &blockwise_quantize_cuda);
  m.impl("blockwise_dequantize_", &blockwise_dequantize_cuda);
  m.impl("delta_encode_", &delta_encode_cuda);
  m.impl("dequantize_axpy_", &dequantize_axpy_cuda);
  m.impl("dequantize_dot", &dequantize_dot_cuda);
}

}  // namespace cuda
}  // namespace unlearn

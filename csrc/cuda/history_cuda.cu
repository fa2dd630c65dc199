// CUDA kernels of the history codecs. Per-element math comes from unlearn/codecs.h (shared with
// the CPU kernels); this file maps work to threads: one warp per quantization block, any number of
// blocks from any tensors of the list in one launch. A warp reduces its block's absmax with
// shuffles (no shared memory), then quantizes; int4 lanes own byte pairs, so no two lanes write
// the same byte (block sizes are even, so blocks own whole bytes).
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_walk.cuh"  // to_float
#include "unlearn/codec_list.h"
#include "unlearn/codecs.h"

namespace unlearn {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kCodecThreads = 32 * kWarpsPerBlock;
constexpr int kArrays = 3;  // values (x / out / target / y / v), codes, scales; recon is slot 3

// Packed per-tensor metadata: pointers of each array, numels and block offsets.
struct CodecView {
  const int64_t* meta;
  int tensors;
  int64_t total_blocks;
  int64_t block_size;
  int bits;

  __device__ __forceinline__ void* ptr(int array, int t) const {
    return reinterpret_cast<void*>(meta[array * tensors + t]);
  }
  __device__ __forceinline__ int64_t numel(int t) const { return meta[(kArrays + 1) * tensors + t]; }
  __device__ __forceinline__ int64_t block_offset(int t) const { return meta[(kArrays + 2) * tensors + t]; }
  // Tensor holding global block g: the last t with block_offset(t) <= g (binary search; empty
  // tensors have no blocks and are skipped by the search).
  __device__ __forceinline__ int tensor_of(int64_t g) const {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (block_offset(mid) <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

// Copies the metadata to the device (synchronous from pageable memory, like cuda_walk.cuh).
CodecView pack(const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& codes,
               const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& recon, int64_t block_size,
               int64_t bits, const at::Device& device, at::Tensor& keep) {
  const int tensors = static_cast<int>(values.size());
  std::vector<int64_t> meta;
  const std::vector<at::Tensor>* arrays[kArrays + 1] = {&values, &codes, &scales, &recon};
  for (int a = 0; a < kArrays + 1; ++a)
    for (int t = 0; t < tensors; ++t)
      meta.push_back(arrays[a]->empty() ? 0 : reinterpret_cast<int64_t>((*arrays[a])[t].data_ptr()));
  const std::vector<int64_t> numels = numels_of(values);
  const std::vector<int64_t> boff = block_offsets(numels, block_size);
  meta.insert(meta.end(), numels.begin(), numels.end());
  meta.insert(meta.end(), boff.begin(), boff.end() - 1);
  keep = at::tensor(meta, at::TensorOptions().dtype(at::kLong)).to(device);
  return CodecView{keep.data_ptr<int64_t>(), tensors, boff.back(), block_size, static_cast<int>(bits)};
}

__device__ __forceinline__ float warp_max(float m) {
  for (int d = 16; d > 0; d >>= 1) m = max_of(m, __shfl_xor_sync(0xffffffffu, m, d));
  return m;
}

// Where a warp's block lives.
struct BlockPos {
  int t;
  int64_t b, e0, n;  // block index inside tensor t, first element, element count
};

__device__ __forceinline__ bool warp_block(const CodecView& v, BlockPos& pos) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (g >= v.total_blocks) return false;
  pos.t = v.tensor_of(g);
  pos.b = g - v.block_offset(pos.t);
  pos.e0 = pos.b * v.block_size;
  pos.n = min(v.block_size, v.numel(pos.t) - pos.e0);
  return true;
}

// Reads code i of a block whose codes start at element e0 (even).
__device__ __forceinline__ int32_t read_code(const void* codes, int bits, int64_t e0, int64_t i) {
  if (bits == 8) return static_cast<const int8_t*>(codes)[e0 + i];
  const uint8_t byte = static_cast<const uint8_t*>(codes)[(e0 + i) / 2];
  return (i % 2) ? int4_high(byte) : int4_low(byte);
}

// Quantizes a block whose fp32 values come from value(i); lanes own elements (int8) or byte pairs
// (int4). After(i, code, scale) sees every element's code, in the lane that read value(i).
template <typename Value, typename After>
__device__ __forceinline__ void quantize_block(const CodecView& v, const BlockPos& p, Value&& value,
                                                After&& after) {
  const int lane = threadIdx.x % 32;
  const float qmax = codec_qmax(v.bits);
  float m = 0.0f;
  for (int64_t i = lane; i < p.n; i += 32) m = max_of(m, finite_abs(value(i)));
  const float scale = block_scale(warp_max(m), qmax);
  if (lane == 0) static_cast<float*>(v.ptr(2, p.t))[p.b] = scale;
  // quantize_value's per-element form, with the block's inverse computed once.
  const bool nonzero = scale > 0.0f;
  const float inv = nonzero ? inverse_scale(scale) : 0.0f;
  auto quantize = [&](float x) { return nonzero ? quantize_in_block(x, inv, qmax) : 0; };
  if (v.bits == 8) {
    int8_t* c = static_cast<int8_t*>(v.ptr(1, p.t)) + p.e0;
    for (int64_t i = lane; i < p.n; i += 32) {
      const int32_t code = quantize(value(i));
      c[i] = static_cast<int8_t>(code);
      after(i, code, scale);
    }
  } else {
    uint8_t* c = static_cast<uint8_t*>(v.ptr(1, p.t)) + p.e0 / 2;
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
__global__ void __launch_bounds__(kCodecThreads) quantize_kernel(CodecView v) {
  BlockPos p;
  if (!warp_block(v, p)) return;
  const T* x = static_cast<const T*>(v.ptr(0, p.t)) + p.e0;
  quantize_block(v, p, [&](int64_t i) { return to_float(x[i]); }, [](int64_t, int32_t, float) {});
}

template <typename T>
__global__ void __launch_bounds__(kCodecThreads) delta_encode_kernel(CodecView v) {
  BlockPos p;
  if (!warp_block(v, p)) return;
  const T* w = static_cast<const T*>(v.ptr(0, p.t)) + p.e0;
  float* r = static_cast<float*>(v.ptr(3, p.t)) + p.e0;
  // Fused: the lane that reads element i (value) is the one that updates r[i] (after), once the
  // warp's absmax is known; no other lane touches r[i], so the in-place update cannot race.
  quantize_block(
      v, p, [&](int64_t i) { return sub_rn(to_float(w[i]), r[i]); },
      [&](int64_t i, int32_t code, float scale) { r[i] = recon_update(r[i], code, scale); });
}

template <typename T>
__global__ void __launch_bounds__(kCodecThreads) dequantize_kernel(CodecView v) {
  BlockPos p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(2, p.t))[p.b];
  const void* codes = v.ptr(1, p.t);
  T* out = static_cast<T*>(v.ptr(0, p.t)) + p.e0;
  for (int64_t i = lane; i < p.n; i += 32)
    out[i] = static_cast<T>(dequantize_value(read_code(codes, v.bits, p.e0, i), scale));
}

template <typename T>
__global__ void __launch_bounds__(kCodecThreads) axpy_kernel(CodecView v, float alpha) {
  BlockPos p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(2, p.t))[p.b];
  const void* codes = v.ptr(1, p.t);
  T* y = static_cast<T*>(v.ptr(0, p.t)) + p.e0;
  for (int64_t i = lane; i < p.n; i += 32)
    y[i] = static_cast<T>(axpy_value(to_float(y[i]), alpha, read_code(codes, v.bits, p.e0, i), scale));
}

// Per block: float sum of code * v over the lanes, times the scale, added to the double output.
// The order of the atomic additions varies between runs (results agree to rounding, not bits).
template <typename T>
__global__ void __launch_bounds__(kCodecThreads) dot_kernel(CodecView v, double* out) {
  BlockPos p;
  if (!warp_block(v, p)) return;
  const int lane = threadIdx.x % 32;
  const float scale = static_cast<const float*>(v.ptr(2, p.t))[p.b];
  const void* codes = v.ptr(1, p.t);
  const T* x = static_cast<const T*>(v.ptr(0, p.t)) + p.e0;
  float sum = 0.0f;
  for (int64_t i = lane; i < p.n; i += 32) sum += static_cast<float>(read_code(codes, v.bits, p.e0, i)) * to_float(x[i]);
  for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  if (lane == 0) atomicAdd(out, static_cast<double>(sum) * static_cast<double>(scale));
}

template <typename Kernel, typename... Args>
void launch(const CodecView& v, Kernel kernel, Args... args) {
  if (v.total_blocks == 0) return;
  const int64_t grid = (v.total_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(grid < (int64_t(1) << 31), "unlearn_ext: too many blocks for one launch");
  kernel<<<static_cast<unsigned>(grid), kCodecThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(v, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- op implementations ------------------------------------------------------------------------

using CodesScales = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

CodesScales blockwise_quantize_cuda(at::TensorList x_in, int64_t bits, int64_t block_size) {
  check_codec_args(bits, block_size);
  const FlatList x = flatten_float_list(x_in, "x");
  CodedList out = empty_coded_list(x, bits, block_size);
  if (x.tensors.empty()) return {out.codes, out.scales};
  const at::Device device = x.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  at::Tensor keep;
  const CodecView v = pack(x.tensors, out.codes, out.scales, {}, block_size, bits, device, keep);
  dispatch_float_type(x.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(v, quantize_kernel<T>);
  });
  return {out.codes, out.scales};
}

void blockwise_dequantize_cuda(at::TensorList out_in, at::TensorList codes_in, at::TensorList scales_in,
                               int64_t bits, int64_t block_size) {
  const CodecInputs in = codec_inputs(out_in, "out", codes_in, scales_in, bits, block_size);
  const FlatList& out = in.values;
  const CodedList& q = in.coded;
  if (out.tensors.empty()) return;
  const at::Device device = out.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  at::Tensor keep;
  const CodecView v = pack(out.tensors, q.codes, q.scales, {}, block_size, bits, device, keep);
  dispatch_float_type(out.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(v, dequantize_kernel<T>);
  });
  write_back(out_in, out.tensors);
}

void delta_encode_cuda(at::TensorList target_in, at::TensorList recon_in, at::TensorList codes_in,
                       at::TensorList scales_in, int64_t bits, int64_t block_size) {
  check_codec_args(bits, block_size);
  const FlatList target = flatten_float_list(target_in, "target");
  check_recon_list(recon_in, target);
  CodedList out = check_coded_list(codes_in, scales_in, target, "target", bits, block_size);
  if (target.tensors.empty()) return;
  std::vector<at::Tensor> recon = contiguous_work(recon_in);
  const at::Device device = target.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  at::Tensor keep;
  const CodecView v = pack(target.tensors, out.codes, out.scales, recon, block_size, bits, device, keep);
  dispatch_float_type(target.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(v, delta_encode_kernel<T>);
  });
  write_back(recon_in, recon);
  write_back(codes_in, out.codes);
  write_back(scales_in, out.scales);
}

void dequantize_axpy_cuda(at::TensorList y_in, double alpha, at::TensorList codes_in, at::TensorList scales_in,
                          int64_t bits, int64_t block_size) {
  const float a = checked_alpha(alpha);
  const CodecInputs in = codec_inputs(y_in, "y", codes_in, scales_in, bits, block_size);
  const FlatList& y = in.values;
  const CodedList& q = in.coded;
  if (y.tensors.empty()) return;
  const at::Device device = y.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  at::Tensor keep;
  const CodecView v = pack(y.tensors, q.codes, q.scales, {}, block_size, bits, device, keep);
  dispatch_float_type(y.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(v, axpy_kernel<T>, a);
  });
  write_back(y_in, y.tensors);
}

at::Tensor dequantize_dot_cuda(at::TensorList codes_in, at::TensorList scales_in, at::TensorList v_in, int64_t bits,
                               int64_t block_size) {
  const CodecInputs in = codec_inputs(v_in, "v", codes_in, scales_in, bits, block_size);
  const FlatList& x = in.values;
  const CodedList& q = in.coded;
  TORCH_CHECK(!x.tensors.empty(), "unlearn_ext: dequantize_dot on CUDA needs at least one tensor");
  const at::Device device = x.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::zeros({}, at::TensorOptions().device(device).dtype(at::kDouble));
  at::Tensor keep;
  const CodecView v = pack(x.tensors, q.codes, q.scales, {}, block_size, bits, device, keep);
  dispatch_float_type(x.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch(v, dot_kernel<T>, out.data_ptr<double>());
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

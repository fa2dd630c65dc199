// How the CUDA kernels walk a tensor list, and the one launch helper every CUDA op goes through
// (DESIGN section 2: one generic walker + launch helper per backend).
//
// One description serves every op: any number of arrays of per-tensor pointers (values, codes,
// scales, recon, ...), the running element offsets (global element index = offsets[t] + local
// index, what the RNG contract needs), and a cut of each tensor into units of `unit` elements (a
// tensor's last unit may be short). Units are numbered across the list, tensor after tensor.
// Element walks give each thread block one unit of kChunk elements; block walks give each warp one
// block of `unit` elements (e.g. a codec block). A unit number maps back to its tensor by a binary
// search over the per-tensor unit offsets, so the metadata is O(tensors) whatever the sizes, and
// one launch covers the whole list.
//
// The metadata reaches the device without a synchronizing copy: it is written into pinned host
// memory and copied with cudaMemcpyAsync on the current stream (copy_ with non_blocking). The
// caching host allocator records that copy and does not hand the pinned block out again before it
// has run; the device copy comes from the caching device allocator, whose blocks are reused only
// by work ordered after ours on the same stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // block walks: one unit per warp
constexpr int64_t kChunk = 4096;       // element walks: elements per thread block

// The piece of the list one thread block (element walk) or one warp (block walk) owns.
struct Unit {
  int t;          // tensor
  int64_t index;  // unit number inside tensor t (the block number in block walks)
  int64_t begin;  // first local element
  int64_t end;    // one past the last local element
};

// Device view of the packed metadata: [arrays * tensors pointers][tensors + 1 element offsets]
// [tensors + 1 unit offsets].
struct ListView {
  const int64_t* meta;
  int tensors;
  int arrays;
  int64_t unit;   // elements per unit
  int64_t units;  // units of the whole list

  __device__ __forceinline__ void* ptr(int array, int t) const {
    return reinterpret_cast<void*>(meta[array * tensors + t]);
  }
  __device__ __forceinline__ int64_t offset(int t) const { return meta[arrays * tensors + t]; }
  __device__ __forceinline__ int64_t numel(int t) const { return offset(t + 1) - offset(t); }
  __device__ __forceinline__ int64_t unit_offset(int t) const {
    return meta[(arrays + 1) * tensors + 1 + t];
  }
  // Unit g (< units) lives in the last tensor t with unit_offset(t) <= g: empty tensors own no
  // units, share their offset with the next tensor and are passed over by the search.
  __device__ __forceinline__ Unit unit_at(int64_t g) const {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (unit_offset(mid) <= g) lo = mid; else hi = mid - 1;
    }
    const int64_t index = g - unit_offset(lo);
    const int64_t begin = index * unit;
    return Unit{lo, index, begin, min(begin + unit, numel(lo))};
  }
};

// The unit of this thread block in an element walk (grid = units).
__device__ __forceinline__ Unit block_unit(const ListView& v) { return v.unit_at(blockIdx.x); }

// The unit of this warp in a block walk (grid = ceil(units / kWarps)); false past the last unit.
__device__ __forceinline__ bool warp_unit(const ListView& v, Unit& u) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (g >= v.units) return false;
  u = v.unit_at(g);
  return true;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Element walk: op(view, tensor, local_index, global_index) for every element, one unit of kChunk
// elements per thread block. The op is a functor holding all of an op's math (as in apex's
// multi_tensor_apply): walks that also reduce per block write their own kernel on block_unit.
template <typename Op>
__global__ void __launch_bounds__(kThreads) elements_kernel(ListView view, Op op) {
  const Unit u = block_unit(view);
  const int64_t base = view.offset(u.t);
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) op(view, u.t, i, base + i);
}

// Launches kernel<<<grid, threads>>>(args...) on the current stream: every CUDA kernel of the
// extension starts here, so none runs on the legacy default stream by mistake.
template <typename Kernel, typename... Args>
inline void launch_kernel(int64_t grid, int threads, Kernel kernel, Args... args) {
  if (grid == 0) return;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "unlearn_ext: too many thread blocks for one launch (",
              grid, ")");
  kernel<<<static_cast<unsigned>(grid), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- the launch helper -----------------------------------------------------------------------------
// What every list op does around its kernels, in one place: the device guard (held for the op's
// lifetime), in-place lists worked through contiguous copies and written back by finish(), the
// metadata packed and sent to the device, dtype dispatch, and launches on the current stream.
using Array = std::vector<at::Tensor>;  // one pointer array; empty = null pointers

class ListLaunch {
 public:
  explicit ListLaunch(const at::Device& device) : guard_(device), device_(device) {}

  const at::Device& device() const { return device_; }

  // A list the op writes in place, as contiguous work tensors (the originals where they already
  // are contiguous); finish() copies the results into the non-contiguous originals.
  Array in_place(at::TensorList originals) { return in_place(originals, contiguous_work(originals)); }

  // The same, with work tensors the caller already has (contiguous copies made by the checks).
  Array in_place(at::TensorList originals, Array work) {
    written_.emplace_back(originals, work);
    return work;
  }

  // Describes a list whose tensors hold numels[t] elements (the walk is sized by numels, not by
  // any array: votes hold 2 * numel counts, int4 codes numel / 2 bytes), cut into units of `unit`.
  ListView pack(const std::vector<int64_t>& numels, const std::vector<Array>& arrays, int64_t unit) {
    const int tensors = static_cast<int>(numels.size());
    const int n_arrays = static_cast<int>(arrays.size());
    const int64_t size = static_cast<int64_t>(n_arrays + 2) * tensors + 2;
    at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* m = host.data_ptr<int64_t>();
    for (int a = 0; a < n_arrays; ++a) {
      TORCH_INTERNAL_ASSERT(arrays[a].empty() || static_cast<int>(arrays[a].size()) == tensors);
      for (int t = 0; t < tensors; ++t)
        *m++ = arrays[a].empty() ? 0 : reinterpret_cast<int64_t>(arrays[a][t].data_ptr());
    }
    int64_t* offsets = m;
    int64_t* unit_offsets = m + tensors + 1;
    offsets[0] = unit_offsets[0] = 0;
    for (int t = 0; t < tensors; ++t) {
      offsets[t + 1] = offsets[t] + numels[t];
      unit_offsets[t + 1] = unit_offsets[t] + unit_count(numels[t], unit);
    }
    at::Tensor meta = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device_));
    meta.copy_(host, /*non_blocking=*/true);
    keep_.push_back(meta);  // alive until the op returns: its launches are queued by then
    return ListView{meta.data_ptr<int64_t>(), tensors, n_arrays, unit, unit_offsets[tensors]};
  }

  // Element walk (see elements_kernel).
  template <typename Op>
  void elements(const ListView& v, const Op& op) {
    TORCH_INTERNAL_ASSERT(v.unit == kChunk);
    launch_kernel(v.units, kThreads, elements_kernel<Op>, v, op);
  }

  // kernel(view, args...) with one thread block per unit (block_unit).
  template <typename Kernel, typename... Args>
  void per_block(const ListView& v, Kernel kernel, Args... args) {
    launch_kernel(v.units, kThreads, kernel, v, args...);
  }

  // kernel(view, args...) with one warp per unit (warp_unit).
  template <typename Kernel, typename... Args>
  void per_warp(const ListView& v, Kernel kernel, Args... args) {
    launch_kernel((v.units + kWarps - 1) / kWarps, kThreads, kernel, v, args...);
  }

  // Copies in-place results back into non-contiguous originals (queued on the current stream).
  void finish() {
    for (auto& w : written_) write_back(w.first, w.second);
  }

 private:
  c10::cuda::CUDAGuard guard_;
  at::Device device_;
  std::vector<at::Tensor> keep_;
  std::vector<std::pair<at::TensorList, Array>> written_;
};

// Calls f(tag) with a value of the kernel element type of a float list (fp32 / fp16 / bf16).
template <typename F>
inline void dispatch_list(const Array& list, F&& f) {
  dispatch_float_type(list[0].scalar_type(), std::forward<F>(f));
}

}  // namespace cuda
}  // namespace unlearn

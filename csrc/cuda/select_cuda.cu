// CUDA kernels of the selection family (contract in unlearn_ext/ops/schemas.py, math in
// unlearn/select.h; the CPU twin is csrc/cpu/select_cpu.cpp). One thread block per unit of kChunk elements (cuda_walk.cuh).
// Histograms of up to 12 digit bits are counted in shared memory and added to the output with one
// atomic per non-empty bin; wider digits go straight to global atomics (integer counts: the result
// does not depend on the order). Reductions that are floating point (the masked gradient's squared
// norm) go through per-block partials summed by ATen, so they are deterministic.
// select_apply_bin_ has no CUDA kernel: the CUDA select never leaves a selection pending (its digit
// plan starts with 11 bits, not the CPU's 16), so the library never calls it on CUDA, and the op's default kernel
// (the reference, unlearn_ext/ops/registry.py) serves a direct call on CUDA tensors.
#include <torch/library.h>

#include "cuda_walk.cuh"
#include "unlearn/select.h"
#include "unlearn/select_checks.h"

namespace unlearn {
namespace cuda {
namespace {

constexpr int kSharedDigitBits = 12;

struct KeyArgs {
  int mode;
  uint64_t seed, offset;
  int64_t base;
};

template <typename T>
__device__ __forceinline__ uint32_t key_at(const ListView& v, int t, int64_t i, int64_t global, const KeyArgs& k,
                                           bool& nan) {
  if (k.mode == kKeyRandom) {
    nan = false;
    return random_key(k.seed, k.offset, static_cast<uint64_t>(global));
  }
  return score_key(to_float(static_cast<const T*>(v.ptr(0, t))[i]), k.mode, nan);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) histogram_kernel(ListView view, KeyArgs k, uint64_t want,
                                                             int prefix_shift, int digit_shift, int digit_bits,
                                                             unsigned long long* out) {
  __shared__ unsigned int local[(1 << kSharedDigitBits) + 1];
  const int64_t bins = int64_t(1) << digit_bits;
  const bool shared = digit_bits <= kSharedDigitBits;
  if (shared)
    for (int64_t b = threadIdx.x; b <= bins; b += kThreads) local[b] = 0;
  __syncthreads();
  const Unit u = block_unit(view);
  const int64_t g0 = k.base + view.offset(u.t);
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) {
    bool nan;
    const uint64_t key = key_at<T>(view, u.t, i, g0 + i, k, nan);
    int64_t bin = -1;
    if (nan) bin = bins;
    else if ((key >> prefix_shift) == want) bin = static_cast<int64_t>((key >> digit_shift) & (bins - 1));
    if (bin < 0) continue;
    if (shared) atomicAdd(&local[bin], 1u);
    else atomicAdd(out + bin, 1ull);
  }
  if (!shared) return;
  __syncthreads();
  for (int64_t b = threadIdx.x; b <= bins; b += kThreads)
    if (local[b]) atomicAdd(out + b, static_cast<unsigned long long>(local[b]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) count_ties_kernel(ListView view, KeyArgs k, int64_t key, int64_t* counts) {
  const Unit u = block_unit(view);
  const int64_t g0 = k.base + view.offset(u.t);
  unsigned long long n = 0;
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) {
    bool nan;
    const uint32_t kk = key_at<T>(view, u.t, i, g0 + i, k, nan);
    n += !nan && static_cast<int64_t>(kk) == key;
  }
  for (int d = 16; d > 0; d >>= 1) n += __shfl_down_sync(0xffffffffu, n, d);
  __shared__ unsigned long long warp_sum[kWarps];
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_sum[w];
    counts[blockIdx.x] = static_cast<int64_t>(s);
  }
}

// The block whose unit holds the needed-th tie scans it serially (at most kChunk elements, once).
template <typename T>
__global__ void __launch_bounds__(kThreads) find_tie_kernel(ListView view, KeyArgs k, int64_t key, int64_t needed,
                                                            const int64_t* inclusive, int64_t* out) {
  const int64_t c = blockIdx.x;
  const int64_t before = c == 0 ? 0 : inclusive[c - 1];
  if (threadIdx.x != 0 || !(before < needed && needed <= inclusive[c])) return;
  const Unit u = block_unit(view);
  const int64_t g0 = k.base + view.offset(u.t);
  int64_t seen = before;
  for (int64_t i = u.begin; i < u.end; ++i) {
    bool nan;
    const uint32_t kk = key_at<T>(view, u.t, i, g0 + i, k, nan);
    if (!nan && static_cast<int64_t>(kk) == key && ++seen == needed) {
      *out = g0 + i + 1;
      return;
    }
  }
}

struct ApplyArgs {
  int64_t threshold, boundary;
  int action;
  float alpha;
  uint64_t noise_seed, noise_offset;
};

// Arrays: 0 scores, 1 params, 2 source (may be null), 3 masks (may be null).
template <typename T, typename P>
__global__ void __launch_bounds__(kThreads) apply_kernel(ListView view, KeyArgs k, ApplyArgs a,
                                                         unsigned long long* count) {
  const Unit u = block_unit(view);
  const int64_t g0 = k.base + view.offset(u.t);
  P* w = static_cast<P*>(view.ptr(1, u.t));
  const P* src = static_cast<const P*>(view.ptr(2, u.t));
  bool* m = static_cast<bool*>(view.ptr(3, u.t));
  unsigned long long n = 0;
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) {
    bool nan;
    const uint32_t key = key_at<T>(view, u.t, i, g0 + i, k, nan);
    const bool sel = !nan && is_selected(key, g0 + i, a.threshold, a.boundary);
    if (m) m[i] = sel;
    if (!sel) continue;
    ++n;
    const float s = src ? to_float(src[i]) : 0.0f;
    w[i] = static_cast<P>(apply_action(a.action, to_float(w[i]), s, a.alpha, a.noise_seed, a.noise_offset,
                                       static_cast<uint64_t>(g0 + i)));
  }
  for (int d = 16; d > 0; d >>= 1) n += __shfl_down_sync(0xffffffffu, n, d);
  if (threadIdx.x % 32 == 0 && n) atomicAdd(count, n);
}

// Arrays: 0 scores, 1 grads.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) mask_grad_kernel(ListView view, KeyArgs k, int64_t threshold,
                                                             int64_t boundary, double* partial) {
  const Unit u = block_unit(view);
  const int64_t g0 = k.base + view.offset(u.t);
  G* x = static_cast<G*>(view.ptr(1, u.t));
  double s = 0.0;
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) {
    bool nan;
    const uint32_t key = key_at<T>(view, u.t, i, g0 + i, k, nan);
    if (!nan && is_selected(key, g0 + i, threshold, boundary)) {
      const double v = to_float(x[i]);
      s += v * v;
    } else {
      x[i] = static_cast<G>(0.0f);
    }
  }
  for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
  __shared__ double warp_sum[kWarps];
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += warp_sum[w];
    partial[blockIdx.x] = t;
  }
}

KeyArgs key_args(int64_t mode, int64_t seed, int64_t offset, int64_t base) {
  check_key_mode(mode);
  check_base(base);
  return KeyArgs{static_cast<int>(mode), as_u64(seed), as_u64(offset), base};
}

at::Tensor select_histogram_cuda(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset, int64_t base,
                                 int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  const KeyArgs k = key_args(mode, seed, offset, base);
  check_histogram_args(prefix, prefix_bits, digit_bits);
  const FlatList s = flatten_float_list(scores_in, "scores");
  ListLaunch launch(s.tensors[0].device());
  at::Tensor out = at::zeros({(int64_t(1) << digit_bits) + 1}, s.tensors[0].options().dtype(at::kLong));
  const ListView view = launch.pack(numels_of(s.tensors), {s.tensors}, kChunk);
  const int prefix_shift = 32 - static_cast<int>(prefix_bits);
  dispatch_list(s.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_block(view, histogram_kernel<T>, k, static_cast<uint64_t>(prefix), prefix_shift,
                     prefix_shift - static_cast<int>(digit_bits), static_cast<int>(digit_bits),
                     reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
  });
  return out;
}

at::Tensor select_tie_boundary_cuda(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset,
                                    int64_t base, int64_t key, int64_t needed) {
  const KeyArgs k = key_args(mode, seed, offset, base);
  TORCH_CHECK(needed >= 0, "unlearn_ext: needed must be >= 0, got ", needed);
  const FlatList s = flatten_float_list(scores_in, "scores");
  ListLaunch launch(s.tensors[0].device());
  const auto opts = s.tensors[0].options().dtype(at::kLong);
  if (needed == 0) return at::full({}, base, opts);
  at::Tensor out = at::full({}, base + s.total(), opts);  // fewer ties than needed: all of them
  const ListView view = launch.pack(numels_of(s.tensors), {s.tensors}, kChunk);
  if (view.units == 0) return out;
  at::Tensor counts = at::empty({view.units}, opts);
  dispatch_list(s.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_block(view, count_ties_kernel<T>, k, key, counts.data_ptr<int64_t>());
    const at::Tensor inclusive = counts.cumsum(0);
    launch.per_block(view, find_tie_kernel<T>, k, key, needed,
                     static_cast<const int64_t*>(inclusive.data_ptr<int64_t>()), out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor select_apply_cuda(at::TensorList params, at::TensorList scores_in, at::TensorList source_in,
                             at::TensorList masks, int64_t mode, int64_t seed, int64_t offset, int64_t base,
                             int64_t threshold, int64_t boundary, int64_t action, double alpha, int64_t noise_seed,
                             int64_t noise_offset) {
  const KeyArgs k = key_args(mode, seed, offset, base);
  check_selection(threshold, boundary);
  check_action(action, alpha, source_in.size(), params.size());
  const bool shapes_only = mode == kKeyRandom && scores_in.empty();
  const FlatList s = check_apply_lists(params, shapes_only ? params : scores_in, source_in, masks);
  ListLaunch launch(params[0].device());
  at::Tensor count = at::zeros({}, params[0].options().dtype(at::kLong));
  Array work = launch.in_place(params);
  Array source;
  for (const auto& x : source_in) source.push_back(x.contiguous());
  Array mask_list(masks.begin(), masks.end());
  // In shapes-only random mode the scores array points at the params: never read (random keys).
  const ListView view = launch.pack(numels_of(s.tensors), {shapes_only ? work : s.tensors, work, source, mask_list},
                                    kChunk);
  const ApplyArgs a{threshold, boundary, static_cast<int>(action), static_cast<float>(alpha), as_u64(noise_seed),
                    as_u64(noise_offset)};
  dispatch_list(work, [&](auto ptag) {
    using P = decltype(ptag);
    dispatch_list(shapes_only ? work : s.tensors, [&](auto stag) {
      using T = decltype(stag);
      launch.per_block(view, apply_kernel<T, P>, k, a, reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
    });
  });
  launch.finish();
  return count;
}

at::Tensor select_mask_grad_cuda(at::TensorList grads, at::TensorList scores_in, int64_t mode, int64_t seed,
                                 int64_t offset, int64_t base, int64_t threshold, int64_t boundary) {
  const KeyArgs k = key_args(mode, seed, offset, base);
  check_selection(threshold, boundary);
  const FlatList s = check_apply_lists(grads, scores_in, {}, {});
  ListLaunch launch(grads[0].device());
  Array work = launch.in_place(grads);
  const ListView view = launch.pack(numels_of(s.tensors), {s.tensors, work}, kChunk);
  at::Tensor partial = at::zeros({view.units}, grads[0].options().dtype(at::kDouble));
  dispatch_list(work, [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_list(s.tensors, [&](auto stag) {
      using T = decltype(stag);
      launch.per_block(view, mask_grad_kernel<T, G>, k, threshold, boundary, partial.data_ptr<double>());
    });
  });
  launch.finish();
  return partial.sum();
}

// The CUDA bracket is every bin: the exact 16-bit histogram (global atomics), then lo_bin 0 and
// hi_bin 2^16 - 1 (the contract lets the kernel choose the bracket; the CPU samples one).
at::Tensor select_histogram_near_cuda(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset,
                                      int64_t base, int64_t k) {
  TORCH_CHECK(k >= 0, "unlearn_ext: k must be >= 0, got ", k);
  const at::Tensor h = select_histogram_cuda(scores_in, mode, seed, offset, base, 0, 0, 16);
  return at::cat({h, at::tensor({int64_t(0), int64_t((1 << 16) - 1)}, h.options().device(at::kCPU)).to(h.device())});
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("select_histogram", &select_histogram_cuda);
  m.impl("select_tie_boundary", &select_tie_boundary_cuda);
  m.impl("select_apply_", &select_apply_cuda);
  m.impl("select_mask_grad_", &select_mask_grad_cuda);
  m.impl("select_histogram_near", &select_histogram_near_cuda);
}

}  // namespace cuda
}  // namespace unlearn

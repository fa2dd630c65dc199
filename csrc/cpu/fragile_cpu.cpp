// CPU kernel of fragile_compact: stream compaction of (global index, value, radius) where the radius
// is below a threshold. Pass 1 counts per chunk in parallel, a prefix sum over the chunk counts
// gives each chunk its output position, pass 2 writes in parallel. Output order is the global index
// order whatever the thread count.
#include <torch/library.h>

#include "cpu_walk.h"
#include "unlearn/elementwise.h"

namespace unlearn {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fragile_compact_cpu(at::TensorList values_in,
                                                                   at::TensorList radii_in,
                                                                   double threshold) {
  const std::pair<FlatList, FlatList> inputs = fragile_inputs(values_in, radii_in);
  const FlatList& values = inputs.first;  // named references: lambdas below capture them
  const FlatList& radii = inputs.second;
  const float thr = static_cast<float>(threshold);
  const int64_t total = values.total();
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<int64_t> start(static_cast<size_t>(chunks) + 1, 0);

  // Pass 1: how many fragile entries each chunk holds.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for_each_span(values.offsets, c * kChunk, std::min(total, (c + 1) * kChunk),
                    [&](size_t t, int64_t lo, int64_t hi, int64_t) {
                      const float* r = radii.tensors[t].data_ptr<float>();
                      for (int64_t i = lo; i < hi; ++i) count += is_fragile(r[i], thr);
                    });
      start[static_cast<size_t>(c) + 1] = count;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) start[c + 1] += start[c];

  const auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor index = at::empty({start.back()}, opts.dtype(at::kLong));
  at::Tensor value = at::empty({start.back()}, opts.dtype(at::kFloat));
  at::Tensor radius = at::empty({start.back()}, opts.dtype(at::kFloat));
  if (start.back() == 0) return {index, value, radius};
  int64_t* out_i = index.data_ptr<int64_t>();
  float* out_v = value.data_ptr<float>();
  float* out_r = radius.data_ptr<float>();

  // Pass 2: each chunk writes its entries from its own start.
  dispatch_float_type(values.tensors.empty() ? at::kFloat : values.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t pos = start[static_cast<size_t>(c)];
        for_each_span(values.offsets, c * kChunk, std::min(total, (c + 1) * kChunk),
                      [&](size_t t, int64_t lo, int64_t hi, int64_t g) {
                        const T* v = values.tensors[t].data_ptr<T>();
                        const float* r = radii.tensors[t].data_ptr<float>();
                        for (int64_t i = lo; i < hi; ++i) {
                          if (!is_fragile(r[i], thr)) continue;
                          out_i[pos] = g + (i - lo);
                          out_v[pos] = load_float(v[i]);
                          out_r[pos] = r[i];
                          ++pos;
                        }
                      });
      }
    });
  });
  return {index, value, radius};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { m.impl("fragile_compact", &fragile_compact_cpu); }

}  // namespace cpu
}  // namespace unlearn

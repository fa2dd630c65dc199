// CPU kernel of fragile_compact: stream compaction of (global index, value, radius) where the radius
// is below a threshold. Pass 1 counts per chunk in parallel, a prefix sum over the chunk counts
// gives each chunk its output position, pass 2 writes in parallel. Output order is the global index
// order whatever the thread count.
#include <torch/library.h>

#include "cpu_walk.h"
#include "unlearn/fragile.h"
#include "unlearn/fragile_checks.h"

namespace unlearn {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fragile_compact_cpu(at::TensorList values_in,
                                                                   at::TensorList radii_in,
                                                                   double threshold) {
  const std::pair<FlatList, FlatList> inputs = fragile_inputs(values_in, radii_in);
  const FlatList& values = inputs.first;  // named references: lambdas below capture them
  const FlatList& radii = inputs.second;
  const float thr = float32_arg(threshold, "threshold", true);

  // Pass 1: how many fragile entries each chunk holds.
  const std::vector<int64_t> counts =
      chunk_partials<int64_t>(values.offsets, [&](int64_t& count, size_t t, int64_t lo, int64_t hi, int64_t) {
        const float* r = radii.tensors[t].data_ptr<float>();
        int64_t n = 0;
        for (int64_t i = lo; i < hi; ++i) n += is_fragile(r[i], thr);
        count += n;
      });
  // start[c]: where chunk c's entries go (exclusive prefix sum in chunk order).
  std::vector<int64_t> start(counts.size() + 1, 0);
  for (size_t c = 0; c < counts.size(); ++c) start[c + 1] = start[c] + counts[c];

  const auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor index = at::empty({start.back()}, opts.dtype(at::kLong));
  at::Tensor value = at::empty({start.back()}, opts.dtype(at::kFloat));
  at::Tensor radius = at::empty({start.back()}, opts.dtype(at::kFloat));
  if (start.back() == 0) return {index, value, radius};
  int64_t* out_i = index.data_ptr<int64_t>();
  float* out_v = value.data_ptr<float>();
  float* out_r = radius.data_ptr<float>();

  // Pass 2: each chunk writes its entries from its own start. A chunk's spans come in order, so
  // its write position just advances (a chunk is handled by one worker).
  std::vector<int64_t> pos(start.begin(), start.end() - 1);
  dispatch_float_type(values.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(values.offsets, [&](int64_t c, size_t t, int64_t lo, int64_t hi, int64_t g) {
      const T* v = values.tensors[t].data_ptr<T>();
      const float* r = radii.tensors[t].data_ptr<float>();
      int64_t& p = pos[static_cast<size_t>(c)];
      for (int64_t i = lo; i < hi; ++i) {
        if (!is_fragile(r[i], thr)) continue;
        out_i[p] = g + (i - lo);
        out_v[p] = load_float(v[i]);
        out_r[p] = r[i];
        ++p;
      }
    });
  });
  return {index, value, radius};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { m.impl("fragile_compact", &fragile_compact_cpu); }

}  // namespace cpu
}  // namespace unlearn

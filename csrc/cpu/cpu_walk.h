// How the CPU kernels walk a tensor list (DESIGN section 2: one generic walker per backend).
//
// Element walks cut the global index range into fixed chunks of kChunk elements. Chunks run in
// parallel (at::parallel_for), each chunk produces its own partial result, and the partials are
// combined in chunk order afterwards, so results never depend on the thread count. The partial is
// a template parameter of the caller's choosing (a sum, a count, a histogram, or nothing at all for
// pure elementwise ops); the walker knows no op.
//
// Block walks visit every tensor cut into blocks of block_size elements (a tensor's last block may
// be short; numbered across the list by unit_offsets, unlearn/tensor_list.h), grouped into parallel
// tasks of about kChunk elements.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_sfence (SSE: in every x86-64)
#endif

#include "unlearn/float_math.h"  // float_bits, bits_float
#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task

inline float load_float(float v) { return v; }
inline float load_float(c10::Half v) { return static_cast<float>(v); }
inline float load_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline T store_as(float v) { return static_cast<T>(v); }

inline int64_t chunk_count(const std::vector<int64_t>& offsets) { return (offsets.back() + kChunk - 1) / kChunk; }

// Chunks handed out one at a time from a shared counter. A static split into one range per thread
// waits for its slowest range: when another process takes one of the cores for a moment, the
// whole pass waits for it, while with a queue the other thread takes over the remaining chunks.
// The partials stay per chunk, so results still do not depend on who ran which chunk.
class ChunkQueue {
 public:
  explicit ChunkQueue(int64_t chunks) : chunks_(chunks) {}
  // The next chunk to run, or -1 when all are taken.
  int64_t take() {
    const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
    return c < chunks_ ? c : -1;
  }
  // Runs worker(queue) on up to one thread per chunk; each worker takes chunks until none are left
  // (a worker may keep its own state across its chunks, e.g. a private histogram).
  template <typename Worker>
  static void run(int64_t chunks, Worker&& worker) {
    if (chunks <= 0) return;
    ChunkQueue queue(chunks);
    const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) worker(queue);
    });
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t chunks_;
};

// Runs body(chunk, tensor_index, local_begin, local_end, global_begin) over every span of the
// list, chunk by chunk in parallel. For passes that need no partial result (the write pass of a
// compaction, a plain elementwise update).
template <typename Body>
inline void for_each_chunk(const std::vector<int64_t>& offsets, Body&& body) {
  const int64_t total = offsets.back();
  ChunkQueue::run(chunk_count(offsets), [&](ChunkQueue& queue) {
    for (int64_t c; (c = queue.take()) >= 0;)
      for_each_span(offsets, c * kChunk, std::min(total, (c + 1) * kChunk),
                    [&](size_t t, int64_t lo, int64_t hi, int64_t g) { body(c, t, lo, hi, g); });
  });
}

// One Partial per chunk (value-initialized, then filled by body(partial, tensor_index, local_begin,
// local_end, global_begin) for each span of the chunk), returned in chunk order. Callers that need
// the per-chunk values themselves (compaction offsets, per-chunk histograms) use this directly.
template <typename Partial, typename Body>
inline std::vector<Partial> chunk_partials(const std::vector<int64_t>& offsets, Body&& body) {
  std::vector<Partial> partial(static_cast<size_t>(chunk_count(offsets)), Partial{});
  for_each_chunk(offsets, [&](int64_t c, size_t t, int64_t lo, int64_t hi, int64_t g) {
    body(partial[static_cast<size_t>(c)], t, lo, hi, g);
  });
  return partial;
}

// The partials of every chunk folded in chunk order with Partial::merge (a fixed order, so a
// non-associative merge such as a float sum still gives the same bits on any thread count).
template <typename Partial, typename Body>
inline Partial parallel_over_list(const std::vector<int64_t>& offsets, Body&& body) {
  Partial all{};
  for (const Partial& p : chunk_partials<Partial>(offsets, std::forward<Body>(body))) all.merge(p);
  return all;
}

// Runs body(tensor_index, block_in_tensor, global_block, elem_begin, elem_end) for every block of
// block_size elements of a list whose tensors hold `numels` elements, in parallel tasks of about
// kChunk elements.
template <typename Body>
inline void parallel_over_blocks(const std::vector<int64_t>& numels, int64_t block_size, Body&& body) {
  const std::vector<int64_t> boff = unit_offsets(numels, block_size);
  const int64_t total = boff.back();
  if (total == 0) return;
  const int64_t grain = std::max<int64_t>(1, kChunk / block_size);
  at::parallel_for(0, total, grain, [&](int64_t b_begin, int64_t b_end) {
    for_each_span(boff, b_begin, b_end, [&](size_t t, int64_t lo, int64_t hi, int64_t g0) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t e0 = b * block_size;
        body(t, b, g0 + (b - lo), e0, std::min(numels[t], e0 + block_size));
      }
    });
#if defined(__x86_64__)
    // Bodies may use streaming stores (the codecs' int8 decode does), which are weakly ordered: each
    // worker fences its own once per task (a fence per block made that decode 1.65x slower), before
    // the join hands the outputs over.
    _mm_sfence();
#endif
  });
}

}  // namespace cpu
}  // namespace unlearn

// CPU enqueue: items[k].T goes into columns ptr, ptr+1, ... (mod Q) of queues[k]; ptr advances by N.
// On the CPU ptr is read directly. Same-dtype pairs are written by a plain strided loop (the
// common case: cheaper than TensorIterator for a [D, N] block); other pairs convert via copy_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace albef_fast {
namespace {

// Each queue row lives in its own pages ([D, Q] layout), so the write is latency-bound: rows are
// split across threads and the destination of a row a few ahead is prefetched.
template <typename T>
void write_columns(const at::Tensor& queue, const at::Tensor& item, int64_t start, int64_t n) {
  constexpr int64_t kAhead = 4;
  T* dst = queue.data_ptr<T>();
  const T* src = item.const_data_ptr<T>();
  const int64_t first = std::min(n, queue.size(1) - start);  // columns before the wrap
  const int64_t rows = queue.size(0);
  const int64_t qs0 = queue.stride(0), qs1 = queue.stride(1), is0 = item.stride(0), is1 = item.stride(1);
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kAhead < r1) __builtin_prefetch(dst + (r + kAhead) * qs0 + start * qs1, 1);
      T* row = dst + r * qs0;
      const T* col = src + r * is1;
      for (int64_t i = 0; i < first; ++i) row[(start + i) * qs1] = col[i * is0];
      for (int64_t i = first; i < n; ++i) row[(i - first) * qs1] = col[i * is0];
    }
  });
}

void convert_columns(at::Tensor queue, const at::Tensor& item, int64_t start, int64_t n) {
  const int64_t first = std::min(n, queue.size(1) - start);  // columns before the wrap
  const at::Tensor item_t = item.t();
  queue.narrow(1, start, first).copy_(item_t.narrow(1, 0, first));
  if (first < n) queue.narrow(1, 0, n - first).copy_(item_t.narrow(1, first, n - first));
}

void enqueue_cpu(at::TensorList queues, at::TensorList items, at::Tensor ptr) {
  check_enqueue_args(queues, items, ptr);
  const int64_t q = queues[0].size(1);
  const int64_t n = items[0].size(0);
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t start = ((*p % q) + q) % q;
  for (size_t k = 0; k < queues.size(); ++k) {
    if (queues[k].scalar_type() != items[k].scalar_type()) {
      convert_columns(queues[k], items[k], start, n);
      continue;
    }
    AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, queues[k].scalar_type(), "enqueue_cpu", [&] {
      write_columns<scalar_t>(queues[k], items[k], start, n);
    });
  }
  *p = (start + n) % q;
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, CPU, m) { m.impl("enqueue_", &enqueue_cpu); }

}  // namespace albef_fast

// CPU enqueue: items[k].T goes into columns ptr, ptr+1, ... (mod Q) of queues[k]; ptr advances by N.
// On the CPU ptr can be read directly; the write is at most two contiguous column ranges.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace albef_fast {
namespace {

void enqueue_cpu(at::TensorList queues, at::TensorList items, at::Tensor ptr) {
  check_enqueue_args(queues, items, ptr);
  const int64_t q = queues[0].size(1);
  const int64_t n = items[0].size(0);
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t start = ((*p % q) + q) % q;
  const int64_t first = std::min(n, q - start);  // columns before the wrap
  for (size_t k = 0; k < queues.size(); ++k) {
    at::Tensor queue = queues[k];
    const at::Tensor item_t = items[k].t();
    queue.narrow(1, start, first).copy_(item_t.narrow(1, 0, first));
    if (first < n) {
      queue.narrow(1, 0, n - first).copy_(item_t.narrow(1, first, n - first));
    }
  }
  *p = (start + n) % q;
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, CPU, m) { m.impl("enqueue_", &enqueue_cpu); }

}  // namespace albef_fast

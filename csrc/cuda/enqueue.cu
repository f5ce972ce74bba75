// CUDA enqueue with no host synchronization: the write kernel reads ptr on the device, writes
// every queue's N columns (one grid row per queue, coalesced along the queue's columns; up to 8
// queues a launch), and a one-thread kernel then advances ptr. Stream order keeps the launches
// consistent.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"

namespace albef_fast {
namespace {

constexpr int kMaxQueues = 8;
constexpr int kThreads = 256;

enum Kind : int { kF32, kF16, kBF16, kF64, kI64, kI32 };

struct QueueView {
  void* queue;
  const void* item;
  int64_t d, q_stride0, q_stride1, i_stride0, i_stride1;
  int queue_kind, item_kind;
};

struct EnqueueArgs {
  QueueView views[kMaxQueues];
};

__device__ __forceinline__ double load_real(const void* p, int kind, int64_t off) {
  switch (kind) {
    case kF16: return static_cast<float>(static_cast<const at::Half*>(p)[off]);
    case kBF16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[off]);
    case kF64: return static_cast<const double*>(p)[off];
    default: return static_cast<const float*>(p)[off];
  }
}

__device__ __forceinline__ void store_real(void* p, int kind, int64_t off, double v) {
  switch (kind) {
    case kF16: static_cast<at::Half*>(p)[off] = static_cast<float>(v); break;
    case kBF16: static_cast<at::BFloat16*>(p)[off] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[off] = v; break;
    default: static_cast<float*>(p)[off] = static_cast<float>(v);
  }
}

__device__ __forceinline__ int64_t load_int(const void* p, int kind, int64_t off) {
  return kind == kI32 ? static_cast<const int32_t*>(p)[off] : static_cast<const int64_t*>(p)[off];
}

__device__ __forceinline__ void store_int(void* p, int kind, int64_t off, int64_t v) {
  if (kind == kI32) static_cast<int32_t*>(p)[off] = static_cast<int32_t>(v);
  else static_cast<int64_t*>(p)[off] = v;
}

__global__ void enqueue_kernel(EnqueueArgs args, const int64_t* ptr, int64_t n, int64_t q) {
  const QueueView v = args.views[blockIdx.y];
  const int64_t start = ((*ptr % q) + q) % q;
  const bool integer = v.queue_kind >= kI64;
  for (int64_t t = blockIdx.x * int64_t(kThreads) + threadIdx.x; t < n * v.d; t += gridDim.x * int64_t(kThreads)) {
    const int64_t row = t / n, i = t % n;  // queue row (feature) and item index: writes run along columns
    const int64_t dst = row * v.q_stride0 + ((start + i) % q) * v.q_stride1;
    const int64_t src = i * v.i_stride0 + row * v.i_stride1;
    if (integer) store_int(v.queue, v.queue_kind, dst, load_int(v.item, v.item_kind, src));
    else store_real(v.queue, v.queue_kind, dst, load_real(v.item, v.item_kind, src));
  }
}

__global__ void advance_ptr_kernel(int64_t* ptr, int64_t n, int64_t q) {
  *ptr = ((((*ptr % q) + q) % q) + n) % q;
}

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    case at::kLong: return kI64;
    case at::kInt: return kI32;
    default: TORCH_CHECK(false, "enqueue_: unsupported dtype ", t);
  }
}

// One launch writes up to kMaxQueues queues (their views travel as a kernel argument); more
// queues take more launches, each reading ptr before the one advance after them (stream order).
void launch_writes(at::TensorList queues, at::TensorList items, size_t first, const int64_t* ptr, int64_t n,
                   int64_t q, cudaStream_t stream) {
  const size_t count = std::min<size_t>(kMaxQueues, queues.size() - first);
  EnqueueArgs args{};
  int64_t most = 0;
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor &queue = queues[first + k], &item = items[first + k];
    args.views[k] = {queue.data_ptr(), item.const_data_ptr(), queue.size(0), queue.stride(0), queue.stride(1),
                     item.stride(0), item.stride(1), kind_of(queue.scalar_type()), kind_of(item.scalar_type())};
    most = std::max(most, n * queue.size(0));
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((most + kThreads - 1) / kThreads, 1024)),
                  static_cast<unsigned>(count));
  enqueue_kernel<<<grid, kThreads, 0, stream>>>(args, ptr, n, q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void enqueue_cuda(at::TensorList queues, at::TensorList items, at::Tensor ptr) {
  check_enqueue_args(queues, items, ptr);
  const int64_t q = queues[0].size(1), n = items[0].size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(ptr.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < queues.size(); first += kMaxQueues) {
    launch_writes(queues, items, first, ptr.const_data_ptr<int64_t>(), n, q, stream);
  }
  advance_ptr_kernel<<<1, 1, 0, stream>>>(ptr.data_ptr<int64_t>(), n, q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, CUDA, m) { m.impl("enqueue_", &enqueue_cuda); }

}  // namespace albef_fast

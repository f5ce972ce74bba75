// CUDA EMA over all parameter tensors in one launch per dtype: a device-resident table lists
// each tensor's pointers and its first chunk; every block walks chunks of kChunk elements,
// finds its tensor by binary search and streams it with 16-byte loads and stores when aligned.
// fp32 uses __fmul_rn / __fadd_rn (and the file builds with --fmad=false): no FMA contraction,
// so results are bit-identical to ALBEF's `p_m * m + p * (1. - m)`.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../ema_layout.h"

namespace albef_fast {
namespace {

constexpr int64_t kChunk = 8192;  // elements per block iteration
constexpr int kThreads = 256;

struct EmaEntry {
  void* pm;
  const void* p;
  int64_t numel;
  int64_t first_chunk;
  int64_t aligned;  // both pointers 16-byte aligned
};

__device__ __forceinline__ float blend(float pm, float p, float m, float om) {
  return __fadd_rn(__fmul_rn(pm, m), __fmul_rn(p, om));
}
__device__ __forceinline__ double blend(double pm, double p, double m, double om) {
  return __dadd_rn(__dmul_rn(pm, m), __dmul_rn(p, om));
}

template <typename T, typename A>
__device__ __forceinline__ uint4 blend_vec(uint4 raw_m, const uint4 raw, A m, A om) {
  constexpr int kVec = 16 / sizeof(T);
  T* vm = reinterpret_cast<T*>(&raw_m);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec; ++j) vm[j] = static_cast<T>(blend(A(vm[j]), A(v[j]), m, om));
  return raw_m;
}

// Elements [begin, end) of one tensor. Aligned: kUnroll 16-byte loads of each operand in flight
// per thread before any store (the stores may alias nothing, but the compiler cannot know).
template <typename T>
__device__ void ema_range(T* pm, const T* p, int64_t begin, int64_t end, bool aligned, double momentum) {
  using acc_t = at::opmath_type<T>;
  const acc_t m = static_cast<acc_t>(momentum), om = static_cast<acc_t>(1.0 - momentum);
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kThreads) * kVec;
  if (aligned) {
    int64_t i = begin + threadIdx.x * kVec;
    for (; i + (kUnroll - 1) * kStep + kVec <= end; i += kUnroll * kStep) {
      uint4 raw_m[kUnroll], raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        raw_m[u] = *reinterpret_cast<const uint4*>(pm + i + u * kStep);
        raw[u] = *reinterpret_cast<const uint4*>(p + i + u * kStep);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        *reinterpret_cast<uint4*>(pm + i + u * kStep) = blend_vec<T>(raw_m[u], raw[u], m, om);
      }
    }
    for (; i + kVec <= end; i += kStep) {
      const uint4 raw_m = *reinterpret_cast<const uint4*>(pm + i);
      *reinterpret_cast<uint4*>(pm + i) = blend_vec<T>(raw_m, *reinterpret_cast<const uint4*>(p + i), m, om);
    }
    begin = end - (end - begin) % kVec;  // the tail, element by element
  }
  for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
    pm[k] = static_cast<T>(blend(acc_t(pm[k]), acc_t(p[k]), m, om));
  }
}

template <typename T>
__global__ void ema_update_kernel(const EmaEntry* table, int entries, int64_t chunks, double momentum) {
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    int lo = 0, hi = entries - 1;  // last entry whose first_chunk <= chunk
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    const EmaEntry e = table[lo];
    const int64_t begin = (chunk - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
    ema_range<T>(static_cast<T*>(e.pm), static_cast<const T*>(e.p), begin, end, e.aligned != 0, momentum);
  }
}

bool aligned16(const void* a, const void* b) {
  return (reinterpret_cast<uintptr_t>(a) % 16 == 0) && (reinterpret_cast<uintptr_t>(b) % 16 == 0);
}

// A copy captured in a CUDA graph reads its pinned source at every replay, so the source has to
// outlive the graph, which this op cannot see; torch's host allocator before pytorch#161583
// (2025) recycles the freed block, and a replay then copies whatever was written to it since (a
// DataLoader's pinned batches) as the table's pointers. Kept for the process when capturing: one
// small table per capture (never freed: at exit the allocator may already be gone).
void keep_while_captured(const at::Tensor& host) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) return;
  static std::mutex mutex;
  static auto* kept = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(host);
}

// Builds the table in pinned memory and copies it to the device asynchronously (no host sync).
at::Tensor upload_table(const std::vector<EmaEntry>& entries, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(EmaEntry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), bytes);
  keep_while_captured(host);
  return host.to(device, /*non_blocking=*/true);
}

void launch_group(at::TensorList params_m, at::TensorList params, const std::vector<size_t>& members,
                  double momentum) {
  std::vector<EmaEntry> entries;
  int64_t chunks = 0;
  for (size_t i : members) {
    if (params[i].numel() == 0) continue;
    entries.push_back({params_m[i].data_ptr(), params[i].const_data_ptr(), params[i].numel(), chunks,
                       aligned16(params_m[i].data_ptr(), params[i].const_data_ptr())});
    chunks += (params[i].numel() + kChunk - 1) / kChunk;
  }
  if (entries.empty()) return;
  const at::Tensor table = upload_table(entries, params_m[members[0]].device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, params_m[members[0]].get_device()));
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, int64_t(sms) * 8));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params_m[members[0]].scalar_type(), "ema_update_cuda", [&] {
    ema_update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        reinterpret_cast<const EmaEntry*>(table.const_data_ptr()), static_cast<int>(entries.size()), chunks, momentum);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The flat pairs by (device, dtype), in order of first appearance: one launch each, so that a
// model split over several GPUs is updated on each (a handful of groups: a linear search).
struct Group {
  c10::Device device;
  at::ScalarType dtype;
  std::vector<size_t> members;
};

std::vector<Group> flat_groups(at::TensorList params_m, at::TensorList params) {
  std::vector<Group> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!ema_flat_pair(params_m[i], params[i])) continue;
    const c10::Device device = params_m[i].device();
    const at::ScalarType dtype = params_m[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.device == device && g.dtype == dtype; });
    if (it == groups.end()) it = groups.insert(groups.end(), Group{device, dtype, {}});
    it->members.push_back(i);
  }
  return groups;
}

void ema_update_cuda(at::TensorList params_m, at::TensorList params, double momentum) {
  check_ema_args(params_m, params, at::kCUDA);  // every pair, before any write
  for (size_t i = 0; i < params.size(); ++i) {
    if (ema_flat_pair(params_m[i], params[i])) continue;
    const c10::cuda::CUDAGuard guard(params_m[i].device());
    ema_strided_pair(params_m[i], params[i], momentum);
  }
  for (const Group& group : flat_groups(params_m, params)) {
    const c10::cuda::CUDAGuard guard(group.device);
    launch_group(params_m, params, group.members, momentum);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace albef_fast

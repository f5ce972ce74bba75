// CPU EMA: p_m <- p_m * m + p * (1 - m), threaded over fixed-size spans of all flat pairs at once
// (ema_layout.h: the others one at a time, in ATen ops).
// Built with -ffp-contract=off: the two products and the sum are each rounded, as in ALBEF's
// `param_m.data * m + param.data * (1. - m)`, so fp32 results are bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "ema_layout.h"

namespace albef_fast {
namespace {

constexpr int64_t kSpan = 1 << 15;  // elements per work item: big enough to stream, small enough to balance

struct Span {
  int64_t tensor;
  int64_t begin;
};

template <typename T>
void ema_span(T* __restrict pm, const T* __restrict p, int64_t n, double momentum) {
  using acc_t = at::opmath_type<T>;
  const acc_t m = static_cast<acc_t>(momentum);
  const acc_t om = static_cast<acc_t>(1.0 - momentum);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t kept = static_cast<acc_t>(pm[i]) * m;
    const acc_t added = static_cast<acc_t>(p[i]) * om;
    pm[i] = static_cast<T>(kept + added);
  }
}

// The spans of the pairs the threads walk flat (ema_flat_pair).
std::vector<Span> split(at::TensorList params_m, at::TensorList params) {
  std::vector<Span> spans;
  for (size_t t = 0; t < params.size(); ++t) {
    if (!ema_flat_pair(params_m[t], params[t])) continue;
    for (int64_t begin = 0; begin < params[t].numel(); begin += kSpan) {
      spans.push_back({static_cast<int64_t>(t), begin});
    }
  }
  return spans;
}

void ema_update_cpu(at::TensorList params_m, at::TensorList params, double momentum) {
  check_ema_args(params_m, params, at::kCPU);
  for (size_t t = 0; t < params.size(); ++t) {
    if (!ema_flat_pair(params_m[t], params[t])) ema_strided_pair(params_m[t], params[t], momentum);
  }
  const std::vector<Span> spans = split(params_m, params);
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const at::Tensor& pm = params_m[spans[s].tensor];
      const at::Tensor& p = params[spans[s].tensor];
      const int64_t begin = spans[s].begin;
      const int64_t n = std::min(kSpan, pm.numel() - begin);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pm.scalar_type(), "ema_update_cpu", [&] {
        ema_span<scalar_t>(pm.data_ptr<scalar_t>() + begin, p.const_data_ptr<scalar_t>() + begin, n, momentum);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace albef_fast

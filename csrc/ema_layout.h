// The EMA's parameter layouts: which pairs its kernels walk as flat arrays, and the update of the
// others. Shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace albef_fast {

// A pair the EMA kernels can walk as one flat array: both dense without overlap, with the same
// strides (contiguous, channels_last and other permuted layouts alike).
inline bool ema_flat_pair(const at::Tensor& pm, const at::Tensor& p) {
  return pm.is_non_overlapping_and_dense() && p.is_non_overlapping_and_dense() && pm.strides() == p.strides();
}

// Any other pair (a sliced or transposed view, layouts that differ): the kernels' arithmetic in
// ATen ops, rounded as they round (each product and the sum in the op math type, then once to
// the parameter dtype); one pair at a time, so a few launches more on CUDA.
inline void ema_strided_pair(const at::Tensor& pm, const at::Tensor& p, double momentum) {
  const at::ScalarType acc = at::toOpMathType(pm.scalar_type());
  pm.copy_(pm.to(acc).mul(momentum).add_(p.to(acc).mul(1.0 - momentum)));
}

}  // namespace albef_fast

// Several small tensors in one allocation: the fused step's outputs (csrc/itc_launch.cpp).
//
// Why: at ALBEF's B = 64 the step is host bound (benchmarks/NOTES.md), and each at::empty is a
// dispatcher call and a caching-allocator malloc and free. The step's eight outputs take two
// allocations this way instead of eight, its backward's two gradients one instead of two.
//
// The pieces share the block's storage but are plain tensors, not views: autograd tracks no view
// relation between them (an in-place op on the loss behaves as on a tensor of its own), each has
// its own version counter, and the storage lives while any piece does. Each piece starts at a
// 16-byte boundary, as the kernels writing them were compiled for (Triton specializes pointers
// on 16-byte alignment, and fresh allocations have it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstddef>

namespace albef_fast {

constexpr int64_t kPieceAlignBytes = 16;

// A contiguous tensor of `sizes` at element `offset` of block's storage (not a view of block)
at::Tensor piece_of(const at::Tensor& block, int64_t offset, at::IntArrayRef sizes);

// Contiguous tensors of the given shapes in one new allocation of `options`, in order
template <size_t N>
std::array<at::Tensor, N> packed_empty(const std::array<at::IntArrayRef, N>& shapes, const at::TensorOptions& options) {
  const int64_t element = static_cast<int64_t>(options.dtype().itemsize());
  const int64_t align = std::max<int64_t>(1, kPieceAlignBytes / element);
  std::array<int64_t, N> offsets{};
  int64_t total = 0;
  for (size_t k = 0; k < N; ++k) {
    offsets[k] = total;
    total += (c10::multiply_integers(shapes[k]) + align - 1) / align * align;
  }
  const at::Tensor block = at::empty({total}, options);
  std::array<at::Tensor, N> pieces;
  for (size_t k = 0; k < N; ++k) pieces[k] = piece_of(block, offsets[k], shapes[k]);
  return pieces;
}

}  // namespace albef_fast

#include "packed.h"

#include <c10/core/TensorImpl.h>

namespace albef_fast {

// As at::from_blob builds its tensor, with block's storage (shared, counted) for the blob
at::Tensor piece_of(const at::Tensor& block, int64_t offset, at::IntArrayRef sizes) {
  TORCH_CHECK(offset >= 0 && offset + c10::multiply_integers(sizes) <= block.numel(),
              "piece_of: the piece does not fit in its block");
  at::Tensor piece = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(block.storage()), block.key_set(),
                                                               block.dtype());
  piece.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  piece.unsafeGetTensorImpl()->set_storage_offset(block.storage_offset() + offset);
  return piece;
}

}  // namespace albef_fast

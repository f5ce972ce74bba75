// albef_fast::_host_floor_step: the host cost of an ITC training step issued through a C++ op, with
// no kernel work. A measurement, not a loss: its outputs hold no values.
//
// At ALBEF's B = 64 the fused step is host bound (benchmarks/NOTES.md): a Python
// autograd.Function with no kernels already took 136 us to issue on the H200's host, 1/8 of
// eager's step. This op has the shape a C++ call path would have: one dispatcher call, autograd
// in C++ (torch::autograd::Function), the step's allocations (workspace, sims, the two feature
// gradients, the scalars) and `launches` empty CUDA kernels with a Triton-sized parameter block
// in the forward, and in the backward the three gradients and one launch. benchmarks/host_floor.py
// times it next to the Python floors; what it costs bounds what a C++ path could reach.
// `packed`: the outputs in two allocations and the gradients in one, as the C++ step allocates
// them (csrc/packed.h); else one allocation each, as the step did before: the two rows price
// the allocations on a GPU's host.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "host_floor.h"
#include "packed.h"

namespace albef_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fp32 scratch of the Triton step at ALBEF's shape (~66 splits, two key sums): one allocation
int64_t workspace_floats(int64_t b, int64_t d) { return 2 * 2 * 66 * b * (d + 3); }

void launch(const at::Tensor& like, int64_t count) {
  if (!like.is_cuda() || count == 0) return;  // on the CPU there is nothing to launch
#ifdef ALBEF_FAST_WITH_CUDA
  launch_empty_kernels(like.device(), count);
#else
  TORCH_CHECK(false, "_host_floor_step: CUDA tensors need the extension built with CUDA");
#endif
}

struct StepFloor : public torch::autograd::Function<StepFloor> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& image_feat, const at::Tensor& text_feat,
                            const at::Tensor& image_feat_m, const at::Tensor& text_feat_m,
                            const at::Tensor& image_queue, const at::Tensor& text_queue, const at::Tensor& temp,
                            double alpha, int64_t launches, bool packed) {
    const int64_t b = image_feat.size(0), d = image_feat.size(1);
    const auto fp32 = image_feat.options().dtype(at::kFloat);
    const at::Tensor workspace = at::empty({workspace_floats(b, d)}, fp32);
    // loss, losses, grad_temp, grad_temp_dirs, terms; grad_image, grad_text, sims
    std::array<at::Tensor, 5> scalars;
    std::array<at::Tensor, 3> blocks;
    if (packed) {
      scalars = packed_empty<5>({{{}, {2}, {}, {2}, {4}}}, fp32);
      blocks = packed_empty<3>({{{b, d}, {b, d}, {2, b, b}}}, image_feat.options());
    } else {
      scalars = {at::empty({}, fp32), at::empty({2}, fp32), at::empty({}, fp32), at::empty({2}, fp32),
                 at::empty({4}, fp32)};
      blocks = {at::empty({b, d}, image_feat.options()), at::empty({b, d}, image_feat.options()),
                at::empty({2, b, b}, image_feat.options())};
    }
    launch(image_feat, launches);
    ctx->save_for_backward({blocks[0], blocks[1], scalars[2]});
    ctx->saved_data["packed"] = packed;
    return scalars[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list out(10);  // one per forward argument; undefined: no gradient
    if (ctx->saved_data["packed"].toBool()) {
      const auto grads_out = packed_empty<2>({saved[0].sizes(), saved[1].sizes()}, saved[0].options());
      out[0] = grads_out[0];
      out[1] = grads_out[1];
    } else {
      out[0] = at::empty_like(saved[0]);
      out[1] = at::empty_like(saved[1]);
    }
    out[6] = at::empty_like(saved[2]);
    launch(saved[0], 1);  // the scaled gradients in one kernel
    return out;
  }
};

at::Tensor host_floor_step(const at::Tensor& image_feat, const at::Tensor& text_feat, const at::Tensor& image_feat_m,
                           const at::Tensor& text_feat_m, const at::Tensor& image_queue,
                           const at::Tensor& text_queue, const at::Tensor& temp, double alpha, int64_t launches,
                           bool packed) {
  TORCH_CHECK_VALUE(image_feat.dim() == 2, "image_feat: expected a [B, D] tensor, got ", image_feat.dim(), " dims");
  TORCH_CHECK_VALUE(text_feat.sizes() == image_feat.sizes(), "text_feat: expected the shape of image_feat");
  TORCH_CHECK_VALUE(launches >= 0, "launches: expected a count >= 0, got ", launches);
  return StepFloor::apply(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                          launches, packed);
}

}  // namespace

TORCH_LIBRARY_IMPL(albef_fast, Autograd, m) { m.impl("_host_floor_step", &host_floor_step); }

}  // namespace albef_fast

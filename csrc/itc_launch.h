// The fused ITC step issued from C++ (itc_launch.cpp): Python bindings, added to albef_fast._C, and
// the step itself for itc_entry.cpp.
#pragma once

#include <torch/autograd.h>
#include <torch/extension.h>

#include <optional>

namespace albef_fast {

// itc_register_plan, itc_forget_plans, itc_step, itc_take_recorded (see itc_launch.cpp)
void bind_itc_launch(pybind11::module_& m);

// The fused step of registered plan `plan_id`, with autograd: the op's eight outputs
// (albef_fast/itc_op.py); nullopt when the inputs' alignment is not what the plan's kernels were
// compiled for (then nothing is allocated or launched).
std::optional<torch::autograd::variable_list> itc_step(int64_t plan_id, const at::Tensor& image_feat,
                                                       const at::Tensor& text_feat, const std::optional<at::Tensor>& temp,
                                                       const at::Tensor& image_feat_m, const at::Tensor& text_feat_m,
                                                       const at::Tensor& image_queue, const at::Tensor& text_queue,
                                                       const std::optional<at::Tensor>& idx,
                                                       const std::optional<at::Tensor>& idx_queue, double temp_value,
                                                       double alpha);

}  // namespace albef_fast

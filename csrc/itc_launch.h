// The fused ITC step issued from C++ (itc_launch.cpp): Python bindings, added to albef_fast._C.
#pragma once

#include <torch/extension.h>

namespace albef_fast {

// itc_register_plan, itc_forget_plans, itc_step, itc_take_recorded (see itc_launch.cpp)
void bind_itc_launch(pybind11::module_& m);

}  // namespace albef_fast

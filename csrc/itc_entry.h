// itc_loss's usual call checked, keyed and launched in C++ (itc_entry.cpp): Python bindings, added
// to albef_fast._C, and the hooks the C++ step (itc_launch.cpp) calls.
#pragma once

#include <torch/extension.h>

namespace albef_fast {

// itc_loss_entry, itc_entry_learn (see itc_entry.cpp)
void bind_itc_entry(pybind11::module_& m);

// Drop every learned call (the plans they named were dropped).
void forget_entries();

}  // namespace albef_fast

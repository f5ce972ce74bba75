// The CUDA half of albef_fast::_host_floor_step (host_floor.cpp): empty kernel launches.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace albef_fast {

// `count` launches of an empty kernel with a parameter block the size of the Triton ITC kernels'
// (~30 pointers, ints and floats) on the device's current stream: the host cost of a launch.
void launch_empty_kernels(c10::Device device, int64_t count);

}  // namespace albef_fast

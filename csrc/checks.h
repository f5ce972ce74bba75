// Argument checks shared by the CPU and CUDA implementations. The Python API validates first
// (with friendlier messages); these guard direct torch.ops calls. Nothing is written before them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace albef_fast {

// An in-place write to a tensor whose elements share memory (an expand()ed one) would depend on
// the order of the writes: a ValueError naming it, as albef_fast._validate.writable raises.
inline void check_writable(const at::Tensor& t, const char* name, size_t k) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name, "[", k,
                    "]: expected a tensor whose elements do not share memory (an in-place update is undefined ",
                    "there), got strides ", t.strides(), "; clone() it");
}

// The dtypes the ops are built for, as albef_fast._validate lists them (FLOAT_DTYPES, QUEUE_DTYPES):
// checked for every tensor before the first write (a dispatch failing on the k-th would leave the
// ones before it written).
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline bool is_queue_dtype(at::ScalarType t) { return is_float_dtype(t) || t == at::kLong || t == at::kInt; }

constexpr const char* kFloatDtypes = "float32, bfloat16, float16 or float64";
constexpr const char* kQueueDtypes = "float32, bfloat16, float16, float64, int64 or int32";

inline void check_ema_args(at::TensorList params_m, at::TensorList params, at::DeviceType device) {
  TORCH_CHECK(params_m.size() == params.size(), "ema_update_: params has ", params.size(),
              " tensors, expected one per params_m tensor (", params_m.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& pm = params_m[i];
    const auto& p = params[i];
    // named as albef_fast._validate.ema_inputs does: MomentumUpdater.update leaves the check of pairs
    // whose dtype changed since it cached them (model.half() keeps the Parameter objects) to this one
    TORCH_CHECK_VALUE(pm.sizes() == p.sizes() && pm.scalar_type() == p.scalar_type(), "params[", i, "]: expected ",
                      pm.sizes(), " ", pm.scalar_type(), " like params_m[", i, "], got ", p.sizes(), " ",
                      p.scalar_type());
    // named: the Python API checks pairs, not that all of them share a device type
    TORCH_CHECK_VALUE(pm.device().type() == device, "params_m[", i, "]: expected a tensor on a ", device,
                      " device like params_m[0], got ", pm.device(), " (one call per device type)");
    TORCH_CHECK_VALUE(p.device() == pm.device(), "params[", i, "]: expected a tensor on ", pm.device(),
                      " like params_m[", i, "], got ", p.device());
    TORCH_CHECK_TYPE(is_float_dtype(pm.scalar_type()), "params_m[", i, "]: expected dtype ", kFloatDtypes, ", got ",
                     pm.scalar_type());
    check_writable(pm, "params_m", i);
  }
}

inline void check_enqueue_args(at::TensorList queues, at::TensorList items, const at::Tensor& ptr) {
  TORCH_CHECK(!queues.empty() && queues.size() == items.size(), "enqueue_: expected one item per queue, got ",
              items.size(), " items for ", queues.size(), " queues");
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong, "enqueue_: ptr must be a 1-element int64 tensor");
  const int64_t q = queues[0].dim() == 2 ? queues[0].size(1) : -1;
  const int64_t n = items[0].dim() == 2 ? items[0].size(0) : -1;
  TORCH_CHECK(q >= 1 && n >= 0 && n <= q, "enqueue_: expected [D, Q] queues and [N, D] items with N <= Q");
  for (size_t k = 0; k < queues.size(); ++k) {
    TORCH_CHECK(queues[k].dim() == 2 && queues[k].size(1) == q, "enqueue_: queues[", k, "] must be [D_k, ", q, "]");
    TORCH_CHECK(items[k].dim() == 2 && items[k].size(0) == n && items[k].size(1) == queues[k].size(0),
                "enqueue_: items[", k, "] must be [", n, ", ", queues[k].size(0), "]");
    TORCH_CHECK(queues[k].device() == ptr.device() && items[k].device() == ptr.device(), "enqueue_: queues[", k,
                "], items[", k, "] and ptr must share one device");
    TORCH_CHECK_TYPE(is_queue_dtype(queues[k].scalar_type()), "queues[", k, "]: expected dtype ", kQueueDtypes,
                     ", got ", queues[k].scalar_type());
    TORCH_CHECK_TYPE(is_queue_dtype(items[k].scalar_type()), "items[", k, "]: expected dtype ", kQueueDtypes,
                     ", got ", items[k].scalar_type());
    TORCH_CHECK(at::isFloatingType(queues[k].scalar_type()) == at::isFloatingType(items[k].scalar_type()),
                "enqueue_: items[", k, "] dtype does not fit queues[", k, "]");
    check_writable(queues[k], "queues", k);
  }
}

}  // namespace albef_fast

// Argument checks shared by the CPU and CUDA implementations. The Python API validates first
// (with friendlier messages); these guard direct torch.ops calls. Nothing is written before them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <string>
#include <vector>

namespace albef_fast {

// An in-place write to a tensor whose elements share memory (an expand()ed one) would depend on
// the order of the writes: a ValueError naming it, as albef_fast._validate.writable raises.
inline void check_writable(const at::Tensor& t, const char* name, size_t k) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name, "[", k,
                    "]: expected a tensor whose elements do not share memory (an in-place update is undefined ",
                    "there), got strides ", t.strides(), "; clone() it");
}

// One tensor of an op's call, for the check that written tensors share no memory with any other.
struct Operand {
  const at::Tensor* tensor;
  const char* name;  // "params_m", "queues", ...
  size_t index;  // SIZE_MAX: a single tensor (ptr)
  bool written;
  size_t pair;  // the EMA's pair index (a pair's p_m and p may be one tensor); SIZE_MAX: none
};

struct Span {
  uintptr_t begin, end;  // the bytes from the first element to just past the last
  size_t op;
  bool operator<(const Span& other) const { return begin < other.begin; }
};

// (non-negative strides, as torch's; contiguous tensors, the usual ones, without the walk)
inline Span extent(const at::Tensor& t, size_t op) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last = t.numel() - 1;
  if (!t.is_contiguous()) {
    last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  }
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.itemsize()), op};
}

inline std::string operand_name(const Operand& o) {
  return o.index == SIZE_MAX ? o.name : std::string(o.name) + "[" + std::to_string(o.index) + "]";
}

// Two operands may overlap unless one is written: what a written tensor would hold would depend
// on the order of the writes (on CUDA one launch writes them all: a race). Candidates come from
// the extents sorted by address; ATen's overlap status decides (strided views it cannot judge
// pass, as in its own checks); a pair's p_m may be its own p.
inline void check_disjoint(const std::vector<Operand>& ops) {
  std::vector<Span> spans;
  spans.reserve(ops.size());
  for (size_t k = 0; k < ops.size(); ++k) {
    if (ops[k].tensor->numel() > 0) spans.push_back(extent(*ops[k].tensor, k));
  }
  std::sort(spans.begin(), spans.end());
  std::pair<size_t, size_t> first{SIZE_MAX, SIZE_MAX};  // the clash of lowest operands, named whatever the addresses
  for (size_t i = 0; i < spans.size(); ++i) {
    for (size_t j = i + 1; j < spans.size() && spans[j].begin < spans[i].end; ++j) {
      const Operand &a = ops[spans[i].op], &b = ops[spans[j].op];
      if (!a.written && !b.written) continue;
      const auto status = at::get_overlap_status(*a.tensor, *b.tensor);
      if (status == at::MemOverlapStatus::Full && a.pair == b.pair && a.pair != SIZE_MAX) continue;
      if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) {
        const auto clash = std::make_pair(std::min(spans[i].op, spans[j].op), std::max(spans[i].op, spans[j].op));
        first = std::min(first, clash);
      }
    }
  }
  if (first.first == SIZE_MAX) return;
  const Operand &a = ops[first.first], &b = ops[first.second];
  const Operand &w = a.written ? a : b, &other = a.written ? b : a;
  TORCH_CHECK_VALUE(false, operand_name(w), ": shares memory with ", operand_name(other),
                    " (the same tensor listed twice?); written in place, what it would hold depends on the order of ",
                    "the writes");
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
  std::vector<Operand> ops;
  ops.reserve(2 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ops.push_back({&params_m[i], "params_m", i, true, i});
    ops.push_back({&params[i], "params", i, false, i});
  }
  check_disjoint(ops);
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
  std::vector<Operand> ops = {{&ptr, "ptr", SIZE_MAX, true, SIZE_MAX}};
  for (size_t k = 0; k < queues.size(); ++k) {
    ops.push_back({&queues[k], "queues", k, true, SIZE_MAX});
    ops.push_back({&items[k], "items", k, false, SIZE_MAX});
  }
  check_disjoint(ops);
}

}  // namespace albef_fast

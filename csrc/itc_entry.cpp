// itc_loss's usual call, checked, keyed and launched in C++ (kernels/cpp_launch.py: entry).
//
// Why: at ALBEF's B = 64 the step is host bound (benchmarks/NOTES.md). With the kernels launched
// from C++ (itc_launch.cpp) the Python before them still cost ~30 us of a ~80 us step on this
// machine's CPU: itc_loss's checks, the backend and precision choice, the plan key.
//
// How: a call of the usual form (six plain tensors, features of one layout and queues of one
// layout, a positive temperature, a float alpha in [0, 1], integer ids [B] or [B, 1] with [Q] or
// [1, Q], or none) gets a key made of everything
// the Python path's choices depend on: shapes, strides, dtypes, device, the flags, the backend and
// precision arguments, torch's float32 matmul state and the ALBEF_FAST_* / TRITON_INTERPRET
// environment. The key names the C++ plan the Python path used for such a call. On a miss, the
// key waits (one per thread) for the C++ step of the Python path that the same itc_loss call runs
// next; itc_entry_learn binds it to that step's plan. So nothing here decides what the Python
// path decides; it only recognizes a call the Python path has taken before. Any other call (an
// unusual or invalid one, tensor subclasses, torch function or dispatch modes) returns None and
// takes the Python path, which raises its named errors.
#include "itc_entry.h"

#include <ATen/Context.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <array>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "itc_launch.h"

extern char** environ;

namespace albef_fast {
namespace {

namespace py = pybind11;
using torch::autograd::variable_list;

struct EntryKey {
  int64_t b = 0, q = 0, d = 0;
  int64_t feat_stride = 0, queue_strides[2] = {0, 0};  // the features' last stride is 1
  int64_t feat_dtype = 0, queue_dtype = 0, temp_dtype = -1;  // -1: a float temperature
  int64_t device_type = 0, device_index = 0;
  bool teacher = false, grad = false, details = false;
  int64_t backend = 0, precision = 0;  // itc_loss's arguments: 0 = None, else 1 + index in the lists below
  int64_t matmul_precision = 0;
  // retrieval ids: none (all 0), or 1, the two dtypes, dims and strides (Python keys their flat views)
  std::array<int64_t, 9> ids = {};
  std::string settings;

  auto tie() const {
    return std::tie(b, q, d, feat_stride, queue_strides[0], queue_strides[1], feat_dtype, queue_dtype, temp_dtype,
                    device_type, device_index, teacher, grad, details, backend, precision, matmul_precision, ids,
                    settings);
  }
  bool operator==(const EntryKey& other) const { return tie() == other.tie(); }
};

// One usual call: the key and what the C++ step takes
struct Call {
  EntryKey key;
  const at::Tensor* tensors[6];  // image, text, image_m, text_m, image_queue, text_queue
  const at::Tensor* temp = nullptr;
  const at::Tensor* ids[2] = {nullptr, nullptr};  // idx, idx_queue
  double temp_value = 1.0, alpha = 0.0;
};

constexpr Py_ssize_t kNumArgs = 13;  // as itc_loss, positionally
constexpr std::array<const char*, 1> kBackends = {"triton"};  // "torch" is not launched from here
constexpr std::array<const char*, 3> kPrecisions = {"highest", "high", "medium"};
constexpr size_t kMaxEntries = 64;

std::mutex entries_mutex;
std::vector<std::pair<EntryKey, int64_t>> entries;  // learned key -> plan id

struct Pending {
  bool valid = false;
  EntryKey key;
  const void* image_feat = nullptr;  // the call's tensors (TensorImpl), to bind only that call's step
  const void* image_queue = nullptr;
};
thread_local Pending pending;

// ---- the usual form ----

// A Tensor or Parameter (no subclass) with no Python, functorch or functionalization wrapping
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize});
  if (t.layout() != at::kStrided || t.is_nested() || t.key_set().has_any(wrapped)) return nullptr;
  const auto type = t.device().type();
  return type == at::kCPU || type == at::kCUDA ? &t : nullptr;
}

// None -> 0, options[k] -> k + 1, anything else -> -1
template <size_t N>
int64_t option(PyObject* obj, const std::array<const char*, N>& options) {
  if (obj == Py_None) return 0;
  if (!PyUnicode_Check(obj)) return -1;
  for (size_t k = 0; k < N; ++k) {
    if (PyUnicode_CompareWithASCIIString(obj, options[k]) == 0) return static_cast<int64_t>(k) + 1;
  }
  return -1;
}

// image_feat, text_feat, image_feat_m, text_feat_m: [B, D] alike, last stride 1; queues [D, Q] alike
bool usual_tensors(const Call& call) {
  const at::Tensor& image = *call.tensors[0];
  const at::Tensor& queue = *call.tensors[4];
  if (image.dim() != 2 || image.size(0) < 1 || image.size(1) < 1 || image.stride(1) != 1 ||
      !image.is_floating_point() || image.scalar_type() == at::kDouble) {
    return false;
  }
  for (int k = 1; k < 4; ++k) {
    const at::Tensor& f = *call.tensors[k];
    if (f.sizes() != image.sizes() || f.strides() != image.strides() || f.scalar_type() != image.scalar_type() ||
        f.device() != image.device()) {
      return false;
    }
  }
  const at::Tensor& text_queue = *call.tensors[5];
  return queue.dim() == 2 && queue.size(0) == image.size(1) && queue.is_floating_point() &&
         queue.device() == image.device() && text_queue.sizes() == queue.sizes() &&
         text_queue.strides() == queue.strides() && text_queue.scalar_type() == queue.scalar_type() &&
         text_queue.device() == image.device();
}

// a positive float, or a 0-dim floating tensor on the features' device (its value read on the CPU only)
bool usual_temperature(PyObject* obj, Call& call) {
  if (PyFloat_CheckExact(obj)) {
    call.temp_value = PyFloat_AS_DOUBLE(obj);
    return call.temp_value > 0.0;
  }
  call.temp = plain_tensor(obj);
  if (call.temp == nullptr) return false;
  const at::Tensor& t = *call.temp;
  if (t.dim() != 0 || !t.is_floating_point() || t.device() != call.tensors[0]->device()) return false;
  return !t.is_cpu() || t.item<double>() > 0.0;
}

// none, or integer idx [B] / [B, 1] and idx_queue [Q] / [1, Q] on the features' device
bool usual_ids(PyObject* idx_obj, PyObject* idq_obj, Call& call) {
  if (idx_obj == Py_None && idq_obj == Py_None) return true;
  call.ids[0] = idx_obj == Py_None ? nullptr : plain_tensor(idx_obj);
  call.ids[1] = idq_obj == Py_None ? nullptr : plain_tensor(idq_obj);
  if (call.ids[0] == nullptr || call.ids[1] == nullptr) return false;
  const at::Tensor &idx = *call.ids[0], &idq = *call.ids[1];
  const int64_t b = call.tensors[0]->size(0), q = call.tensors[4]->size(1);
  const bool idx_ok = idx.dim() == 1 ? idx.size(0) == b : idx.dim() == 2 && idx.size(0) == b && idx.size(1) == 1;
  const bool idq_ok = idq.dim() == 1 ? idq.size(0) == q : idq.dim() == 2 && idq.size(0) == 1 && idq.size(1) == q;
  const auto device = call.tensors[0]->device();
  return idx_ok && idq_ok && at::isIntegralType(idx.scalar_type(), false) &&
         at::isIntegralType(idq.scalar_type(), false) && idx.device() == device && idq.device() == device;
}

// The environment entries the Python path reads (a superset: every ALBEF_FAST_* and TRITON_INTERPRET)
std::string environment_settings() {
  std::string settings;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, "ALBEF_FAST_", 11) == 0 || std::strncmp(*entry, "TRITON_INTERPRET=", 17) == 0) {
      settings.append(*entry).push_back('\n');
    }
  }
  return settings;
}

// torch's legacy float32 matmul level, or 3 where torch (2.9 on) refuses to read it: the level
// and the per-backend settings disagree
int64_t legacy_matmul_level() {
  try {
    return static_cast<int64_t>(at::globalContext().float32MatmulPrecision());
  } catch (const c10::Error&) {
    return 3;
  }
}

// torch's float32 matmul state as the Python path reads it (itc_op.py:float32_matmul_precision):
// whether CUDA's matmul setting is TF32, and the legacy level. Before 2.13 (whose headers name the
// per-backend settings by enum; 2.9-2.12 by string) the setting is read through allowTF32CuBLAS,
// which raises too where the two disagree; where both raise they do not tell the states apart:
// -1, no key.
int64_t matmul_precision_state() {
  const int64_t level = legacy_matmul_level();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  const bool tf32 = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                    at::Float32Precision::TF32;
  return 4 * static_cast<int64_t>(tf32) + level;
#else
  int64_t tf32 = 2;  // raised
  try {
    tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  } catch (const c10::Error&) {
  }
  return tf32 == 2 && level == 3 ? -1 : 4 * tf32 + level;
#endif
}

// false where grad mode is on and a key (momentum features, queues) requires grad: it gets none
// from this loss, which the Python path warns of (functional.py:_warn_if_keys_require_grad)
bool constant_keys(const Call& call) {
  if (!at::GradMode::is_enabled()) return true;
  for (int k = 2; k < 6; ++k) {
    if (call.tensors[k]->requires_grad()) return false;
  }
  return true;
}

// false: no key for this call (the Python path decides)
bool fill_key(Call& call) {
  const at::Tensor& image = *call.tensors[0];
  const at::Tensor& queue = *call.tensors[4];
  EntryKey& key = call.key;
  key.b = image.size(0);
  key.d = image.size(1);
  key.q = queue.size(1);
  key.feat_stride = image.stride(0);
  key.queue_strides[0] = queue.stride(0);
  key.queue_strides[1] = queue.stride(1);
  key.feat_dtype = static_cast<int64_t>(image.scalar_type());
  key.queue_dtype = static_cast<int64_t>(queue.scalar_type());
  key.temp_dtype = call.temp ? static_cast<int64_t>(call.temp->scalar_type()) : -1;
  key.device_type = static_cast<int64_t>(image.device().type());
  key.device_index = image.device().index();
  key.teacher = call.alpha != 0.0;
  key.grad = at::GradMode::is_enabled() && (image.requires_grad() || call.tensors[1]->requires_grad() ||
                                            (call.temp && call.temp->requires_grad()));
  key.matmul_precision = matmul_precision_state();
  if (key.matmul_precision < 0) return false;
  if (call.ids[0] != nullptr) {
    const at::Tensor &idx = *call.ids[0], &idq = *call.ids[1];
    key.ids = {1, static_cast<int64_t>(idx.scalar_type()), static_cast<int64_t>(idq.scalar_type()), idx.dim(),
               idq.dim(), idx.stride(0), idx.stride(-1), idq.stride(0), idq.stride(-1)};
  }
  key.settings = environment_settings();
  return true;
}

// false: not the usual form (the Python path decides, and raises if the call is invalid)
bool parse(PyObject* const* args, Call& call) {
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() != 0) return false;
  for (int k = 0; k < 6; ++k) {
    call.tensors[k] = plain_tensor(args[k]);
    if (call.tensors[k] == nullptr) return false;
  }
  PyObject *alpha = args[7], *details = args[10];
  call.key.details = details == Py_True;
  if (!usual_tensors(call) || !constant_keys(call) || !usual_temperature(args[6], call) ||
      !PyFloat_CheckExact(alpha) || !usual_ids(args[8], args[9], call) || (details != Py_True && details != Py_False)) {
    return false;
  }
  call.alpha = PyFloat_AS_DOUBLE(alpha);
  EntryKey& key = call.key;
  key.backend = option(args[11], kBackends);
  key.precision = option(args[12], kPrecisions);
  if (!(call.alpha >= 0.0 && call.alpha <= 1.0) || key.backend < 0 || key.precision < 0) return false;
  return fill_key(call);
}

// ---- learned calls ----

int64_t learned_plan(const EntryKey& key) {
  const std::lock_guard<std::mutex> lock(entries_mutex);
  for (const auto& entry : entries) {
    if (entry.first == key) return entry.second;
  }
  return -1;
}

// Bind the key waiting on this thread to the plan whose C++ step the Python path just ran for the
// same call (its image_feat and image_queue, unchanged by the Python path for a usual call).
void learn(int64_t plan_id, const at::Tensor& image_feat, const at::Tensor& image_queue) {
  if (!pending.valid || pending.image_feat != image_feat.unsafeGetTensorImpl() ||
      pending.image_queue != image_queue.unsafeGetTensorImpl()) {
    return;
  }
  pending.valid = false;
  const std::lock_guard<std::mutex> lock(entries_mutex);
  for (auto& entry : entries) {
    if (entry.first == pending.key) {
      entry.second = plan_id;
      return;
    }
  }
  if (entries.size() >= kMaxEntries) entries.clear();  // bounded: calls of new shapes forever
  entries.emplace_back(std::move(pending.key), plan_id);
}

// ---- the call ----

PyObject* wrap(const variable_list& outputs, bool details) {
  if (!details) return THPVariable_Wrap(outputs[0]);
  // ITCOutput's fields: loss, loss_i2t, loss_t2i (differentiable), the sims and terms (detached)
  const at::Tensor sims = outputs[6].detach(), terms = outputs[7].detach();
  const at::Tensor fields[9] = {outputs[0],        outputs[1].select(0, 0), outputs[1].select(0, 1),
                                sims.select(0, 0), sims.select(0, 1),       terms.select(0, 0),
                                terms.select(0, 1), terms.select(0, 2),     terms.select(0, 3)};
  PyObject* tuple = PyTuple_New(9);
  if (tuple == nullptr) return nullptr;
  for (Py_ssize_t k = 0; k < 9; ++k) PyTuple_SET_ITEM(tuple, k, THPVariable_Wrap(fields[k]));
  return tuple;
}

// itc_loss_entry(the 13 arguments of itc_loss, positionally) -> the loss, the nine fields of
// ITCOutput (return_details), or None: take the Python path.
PyObject* itc_loss_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  pending.valid = false;
  TORCH_CHECK_TYPE(nargs == kNumArgs, "itc_loss_entry: expected ", kNumArgs, " arguments, got ", nargs);
  Call call;
  if (!parse(args, call)) Py_RETURN_NONE;
  const int64_t plan_id = learned_plan(call.key);
  const at::Tensor* const* t = call.tensors;
  if (plan_id < 0) {
    pending = {true, std::move(call.key), t[0]->unsafeGetTensorImpl(), t[4]->unsafeGetTensorImpl()};
    Py_RETURN_NONE;
  }
  const std::optional<at::Tensor> temp = call.temp ? std::optional<at::Tensor>(*call.temp) : std::nullopt;
  std::optional<at::Tensor> idx, idx_queue;  // flat, as the Python path passes them
  if (call.ids[0] != nullptr) {
    idx = call.ids[0]->reshape({-1});
    idx_queue = call.ids[1]->reshape({-1});
  }
  const auto outputs = itc_step(plan_id, *t[0], *t[1], temp, *t[2], *t[3], *t[4], *t[5], idx, idx_queue,
                                call.temp ? 1.0 : call.temp_value, call.alpha);
  if (!outputs.has_value()) Py_RETURN_NONE;  // misaligned inputs: the Python path compiles their variant
  return wrap(*outputs, call.key.details);
  END_HANDLE_TH_ERRORS
}

PyMethodDef entry_def = {"itc_loss_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&itc_loss_entry)),
                         METH_FASTCALL,
                         "itc_loss's usual call from C++: the loss (the ITCOutput fields with return_details), "
                         "or None: take the Python path"};

}  // namespace

void forget_entries() {
  const std::lock_guard<std::mutex> lock(entries_mutex);
  entries.clear();
}

void bind_itc_entry(py::module_& m) {
  m.add_object("itc_loss_entry", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&entry_def, nullptr, nullptr)));
  m.def("itc_entry_learn", &learn,
        "Bind the usual call waiting on this thread to the plan of the C++ step just run for it");
}

}  // namespace albef_fast

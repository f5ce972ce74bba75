// The fused ITC step issued from C++: one call allocates the step's workspace and outputs and
// launches the compiled Triton kernels of a plan; autograd runs in C++, and the usual backward
// (only the mean loss backpropagates) is one more launch (the scale kernel).
//
// Why: at ALBEF's B = 64 the step is host bound (benchmarks/NOTES.md). Python spent ~100 us (this
// machine's CPU) around kernels that run ~0.1 ms on an H200: plan lookup, allocations, the
// launches' argument handling and autograd.Function. kernels/cpp_launch.py records a plan's
// launches once (each kernel's CUfunction, grid, block, shared memory and, per parameter, where
// its value comes from: an input, the workspace, an output, a constant or a float of the call)
// and registers it here; later calls of that plan come straight here.
//
// A parameter block follows the kernel's ABI as Triton compiles it: its non-constexpr arguments
// in order (pointers 8 bytes, i32 4, i64 8, fp32 4), then the global and profile scratch pointers
// (null: the registered kernels use none). cuLaunchKernel is looked up in libcuda at the first
// launch, as Triton's own launcher does, so that the extension loads on machines without a GPU.
// With CPU tensors nothing is launched: the resolved parameters are recorded for the tests.
#include "itc_launch.h"

#include "itc_entry.h"
#include "packed.h"

#include <torch/autograd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#ifdef ALBEF_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#endif

namespace albef_fast {
namespace {

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// where a parameter's value comes from (kinds shared with kernels/cpp_launch.py)
enum ParamKind : int64_t { kInput = 0, kWorkspace = 1, kOutput = 2, kNull = 3, kI32 = 4, kI64 = 5, kF32 = 6 };
constexpr size_t kMaxParams = 64;
constexpr int64_t kNumInputs = 9;  // image, text, image_m, text_m, image_queue, text_queue, temp, idx, idx_queue
constexpr int64_t kNumOutputs = 8;

struct Param {
  int64_t kind;
  int64_t value;    // input / output slot, workspace byte offset, constant, or float index
  int64_t aligned;  // inputs: 1 / 0 = the kernel was compiled for a 16-byte aligned / unaligned address
};

struct Launch {
  uint64_t function;
  std::array<unsigned, 3> grid;
  unsigned threads, shared;
  std::vector<Param> params;
};

struct Plan {
  c10::Device device;
  int64_t b, d, workspace_floats;
  std::vector<Launch> forward;
  std::optional<Launch> backward;  // inputs: saved grad_image, grad_text, grad_temp, g; outputs: their products
};

// Plans are added and dropped from Python (under the GIL) and looked up from the autograd
// engine's threads too: shared pointers behind a mutex. Ids are never reused, so that a backward
// whose plan was dropped finds none (and takes the aten products) rather than another plan.
std::mutex plans_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Plan>> plans;
int64_t next_plan_id = 0;

std::shared_ptr<const Plan> find_plan(int64_t id) {
  const std::lock_guard<std::mutex> lock(plans_mutex);
  const auto it = plans.find(id);
  return it != plans.end() ? it->second : nullptr;
}

// ---- registration (Python tuples -> Plan) ----

Launch parse_launch(const py::tuple& spec) {
  Launch launch;
  launch.function = spec[0].cast<uint64_t>();
  const auto grid = spec[1].cast<std::vector<int64_t>>();
  TORCH_CHECK_VALUE(grid.size() == 3, "launch grid: expected 3 dims");
  for (int i = 0; i < 3; ++i) launch.grid[i] = static_cast<unsigned>(grid[i]);
  launch.threads = spec[2].cast<unsigned>();
  launch.shared = spec[3].cast<unsigned>();
  for (const auto& item : spec[4].cast<py::list>()) {
    const auto p = item.cast<std::array<int64_t, 3>>();
    TORCH_CHECK_VALUE(p[0] >= kInput && p[0] <= kF32, "launch params: unknown kind ", p[0]);
    launch.params.push_back({p[0], p[1], p[2]});
  }
  TORCH_CHECK_VALUE(launch.params.size() <= kMaxParams, "launch params: at most ", kMaxParams);
  return launch;
}

int64_t register_plan(int64_t device_type, int64_t device_index, int64_t b, int64_t d, int64_t workspace_floats,
                      const py::list& forward, const py::object& backward) {
  Plan plan{c10::Device(static_cast<c10::DeviceType>(device_type), static_cast<c10::DeviceIndex>(device_index)),
            b, d, workspace_floats, {}, std::nullopt};
  for (const auto& spec : forward) plan.forward.push_back(parse_launch(spec.cast<py::tuple>()));
  if (!backward.is_none()) plan.backward = parse_launch(backward.cast<py::tuple>());
  const std::lock_guard<std::mutex> lock(plans_mutex);
  plans.emplace(next_plan_id, std::make_shared<const Plan>(std::move(plan)));
  return next_plan_id++;
}

void forget_plans() {
  {
    const std::lock_guard<std::mutex> lock(plans_mutex);
    plans.clear();
  }
  forget_entries();
}

// ---- launching ----

struct Slots {
  const at::Tensor* inputs;
  const at::Tensor* outputs;
  char* workspace;
  std::array<double, 2> floats;  // temp_value, alpha
};

// Every input pointer has the alignment its kernel was compiled for (else: not this plan's kernels)
bool inputs_fit(const std::vector<Launch>& launches, const at::Tensor* inputs) {
  for (const auto& launch : launches) {
    for (const auto& p : launch.params) {
      if (p.kind != kInput) continue;
      const at::Tensor& t = inputs[p.value];
      if (!t.defined() || (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) != (p.aligned == 1)) return false;
    }
  }
  return true;
}

// One parameter block: each value in its own 8-byte slot, as cuLaunchKernel reads them.
struct ParamBlock {
  std::array<uint64_t, kMaxParams> storage{};
  std::array<void*, kMaxParams> pointers{};
  size_t size = 0;

  template <typename T>
  void push(T value) {
    std::memcpy(&storage[size], &value, sizeof(T));
    pointers[size] = &storage[size];
    ++size;
  }
};

ParamBlock pack(const Launch& launch, const Slots& slots) {
  ParamBlock block;
  for (const auto& p : launch.params) {
    switch (p.kind) {
      case kInput: block.push(slots.inputs[p.value].data_ptr()); break;
      case kWorkspace: block.push(static_cast<void*>(slots.workspace + p.value)); break;
      case kOutput: block.push(slots.outputs[p.value].data_ptr()); break;
      case kNull: block.push(static_cast<void*>(nullptr)); break;
      case kI32: block.push(static_cast<int32_t>(p.value)); break;
      case kI64: block.push(static_cast<int64_t>(p.value)); break;
      case kF32: block.push(static_cast<float>(slots.floats[p.value])); break;
    }
  }
  return block;
}

// CPU tensors (tests): the launches' resolved parameters, in order
std::mutex recorded_mutex;
py::list* recorded = nullptr;

void record(const Launch& launch, const ParamBlock& block) {
  py::gil_scoped_acquire gil;
  py::list values;
  for (size_t i = 0; i < launch.params.size(); ++i) {
    const auto kind = launch.params[i].kind;
    if (kind == kI32) values.append(*reinterpret_cast<const int32_t*>(&block.storage[i]));
    else if (kind == kF32) values.append(*reinterpret_cast<const float*>(&block.storage[i]));
    else values.append(static_cast<int64_t>(block.storage[i]));
  }
  const std::lock_guard<std::mutex> lock(recorded_mutex);
  if (recorded == nullptr || py::len(*recorded) >= 1024) {  // a bounded record (benchmarks/host_step.py)
    delete recorded;
    recorded = new py::list();
  }
  recorded->append(py::make_tuple(launch.function, py::make_tuple(launch.grid[0], launch.grid[1], launch.grid[2]),
                                  launch.threads, launch.shared, values));
}

#ifdef ALBEF_FAST_WITH_CUDA
// the driver API entry points, from libcuda (loaded by torch already on a GPU machine)
struct Driver {
  int (*launch_kernel)(uint64_t, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                       void**);
  int (*ctx_get_current)(void**);
};

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "albef_fast: cannot open libcuda.so.1 to launch kernels");
    Driver found{};
    found.launch_kernel = reinterpret_cast<decltype(found.launch_kernel)>(dlsym(lib, "cuLaunchKernel"));
    found.ctx_get_current = reinterpret_cast<decltype(found.ctx_get_current)>(dlsym(lib, "cuCtxGetCurrent"));
    TORCH_CHECK(found.launch_kernel && found.ctx_get_current, "albef_fast: cuLaunchKernel not found in libcuda.so.1");
    return found;
  }();
  return d;
}

// The kernels were loaded into the device's primary context; a thread that has made no runtime
// call yet has no current context (Triton's launcher checks the same): cudaFree(nullptr) binds it.
void ensure_context() {
  void* ctx = nullptr;
  if (driver().ctx_get_current(&ctx) == 0 && ctx != nullptr) return;
  C10_CUDA_CHECK(cudaFree(nullptr));
}
#endif

void run(const Plan& plan, const Launch& launch, const Slots& slots) {
  ParamBlock block = pack(launch, slots);
  if (plan.device.is_cpu()) return record(launch, block);
#ifdef ALBEF_FAST_WITH_CUDA
  ensure_context();
  const auto stream = c10::cuda::getCurrentCUDAStream(plan.device.index());
  const int err = driver().launch_kernel(launch.function, launch.grid[0], launch.grid[1], launch.grid[2], launch.threads,
                                     1, 1, launch.shared, stream.stream(), block.pointers.data(), nullptr);
  TORCH_CHECK(err == 0, "albef_fast: cuLaunchKernel failed with CUDA error ", err);
#else
  TORCH_CHECK(false, "albef_fast: the extension was built without CUDA");
#endif
}

// ---- the step with autograd ----

// loss, losses [2], grad_image, grad_text, grad_temp, grad_temp_dirs [2], sims [2, B, B], terms [4]:
// the fp32 scalars in one allocation, the feature-dtype blocks in another (csrc/packed.h). The
// scalars are kept apart from the rest so that a loss kept for logging holds 80 bytes, not more.
std::array<at::Tensor, kNumOutputs> new_outputs(const Plan& plan, const at::Tensor& image_feat) {
  const auto [loss, losses, grad_temp, grad_temp_dirs, terms] =
      packed_empty<5>({{{}, {2}, {}, {2}, {4}}}, image_feat.options().dtype(at::kFloat));
  const auto [grad_image, grad_text, sims] =
      packed_empty<3>({{{plan.b, plan.d}, {plan.b, plan.d}, {2, plan.b, plan.b}}}, image_feat.options());
  return {loss, losses, grad_image, grad_text, grad_temp, grad_temp_dirs, sims, terms};
}

// A 0-dim zero that depends on the step's differentiable inputs and raises when differentiated
struct SecondOrderGuard : public torch::autograd::Function<SecondOrderGuard> {
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& image_feat,
                            const at::Tensor& /*text_feat*/, const std::optional<at::Tensor>& /*temp*/) {
    return at::zeros({}, image_feat.options());
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false, "albef_fast.itc_loss: its gradient has no gradient of its own with respect to the features or "
                "the temperature (second order: a gradient penalty on the features, a Hessian-vector product); the "
                "one pass keeps no graph of the logits. Use albef_fast.reference.itc_loss for such terms.");
    return {};
  }
};

// A backward that records a graph (create_graph=True), as albef_fast/itc_op.py:_no_second_order:
// the saved gradients are constants to autograd, so the gradients' own gradient w.r.t. the
// features and T would silently be zero; each gets a guarded zero added, which raises instead.
// d / d grad_output stays exact (the guard is on another path); the values are unchanged.
void no_second_order(const std::vector<at::Tensor>& inputs, variable_list& out) {
  if (std::none_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.requires_grad(); })) return;
  const std::optional<at::Tensor> temp = inputs.size() > 2 ? std::optional<at::Tensor>(inputs[2]) : std::nullopt;
  const at::Tensor zero = SecondOrderGuard::apply(inputs[0], inputs[1], temp);
  for (int k = 0; k < 3; ++k) {
    if (out[k].defined()) out[k] = out[k] + zero.to(out[k].scalar_type());
  }
}

struct ItcStep : public torch::autograd::Function<ItcStep> {
  // Function::apply takes no undefined tensors: without a temperature tensor `temp` is a stand-in
  // (image_feat_m, no gradient) and has_temp false; the ids travel outside the autograd inputs.
  // Only the losses are the Function's outputs; all eight come back through `outputs_out`. The
  // other six need no gradient, and as outputs they cost autograd per call (their metadata,
  // mark_non_differentiable's set, six more slots of the backward's grads).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& image_feat, const at::Tensor& text_feat,
                               const at::Tensor& temp, const at::Tensor& image_feat_m, const at::Tensor& text_feat_m,
                               const at::Tensor& image_queue, const at::Tensor& text_queue,
                               const std::array<at::Tensor, 2>* ids, bool has_temp, double temp_value, double alpha,
                               int64_t plan_id, std::array<at::Tensor, kNumOutputs>* outputs_out) {
    const auto plan = find_plan(plan_id);
    TORCH_CHECK(plan != nullptr, "albef_fast: plan ", plan_id, " was dropped during the call");
    const at::Tensor inputs[kNumInputs] = {image_feat, text_feat,   image_feat_m,  text_feat_m,  image_queue,
                                           text_queue, has_temp ? temp : at::Tensor(), (*ids)[0], (*ids)[1]};
    const at::Tensor workspace = at::empty({plan->workspace_floats}, image_feat.options().dtype(at::kFloat));
    const auto outputs = new_outputs(*plan, image_feat);
    const Slots slots{inputs, outputs.data(), static_cast<char*>(workspace.data_ptr()),
                      {temp_value, alpha}};
    for (const auto& launch : plan->forward) run(*plan, launch, slots);
    ctx->save_for_backward({outputs[2], outputs[3], outputs[4], outputs[5]});
    ctx->saved_data["plan"] = plan_id;
    ctx->saved_data["temp_dtype"] = has_temp ? static_cast<int64_t>(temp.scalar_type()) : int64_t{-1};
    ctx->saved_data["grad_inputs"] = has_temp ? std::vector<at::Tensor>{image_feat, text_feat, temp}
                                              : std::vector<at::Tensor>{image_feat, text_feat};
    ctx->set_materialize_grads(false);
    *outputs_out = outputs;
    return {outputs[0], outputs[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(13);  // one per forward argument: image, text, temp get gradients
    const at::Tensor &g_loss = grads[0], &g_losses = grads[1];
    if (!g_loss.defined() && !g_losses.defined()) return out;  // no gradient reached either loss
    const variable_list saved = ctx->get_saved_variables();
    const int64_t temp_dtype = ctx->saved_data["temp_dtype"].toInt();
    const auto plan = find_plan(ctx->saved_data["plan"].toInt());
    if (!g_losses.defined() && plan && plan->backward && one_launch_ok(*plan, g_loss)) {
      scaled_in_one_launch(*plan, saved, g_loss, temp_dtype, out);
    } else {
      scaled_by_aten(saved, g_loss, g_losses, temp_dtype, out);
      if (at::GradMode::is_enabled()) no_second_order(ctx->saved_data["grad_inputs"].toTensorVector(), out);
    }
    return out;
  }

  // the scale kernel takes a plain 0-dim fp32 g on the plan's device, outside a recorded backward
  static bool one_launch_ok(const Plan& plan, const at::Tensor& g) {
    return !at::GradMode::is_enabled() && g.dim() == 0 && g.scalar_type() == at::kFloat && g.device() == plan.device &&
           !g.key_set().has(c10::DispatchKey::Python) && reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0;
  }

  static void scaled_in_one_launch(const Plan& plan, const variable_list& saved, const at::Tensor& g,
                                   int64_t temp_dtype, variable_list& out) {
    const at::Tensor inputs[4] = {saved[0], saved[1], saved[2], g};
    const auto grads = packed_empty<2>({saved[0].sizes(), saved[1].sizes()}, saved[0].options());
    at::Tensor outputs[3] = {grads[0], grads[1], at::Tensor()};
    if (temp_dtype >= 0) outputs[2] = at::empty({}, saved[2].options().dtype(static_cast<at::ScalarType>(temp_dtype)));
    run(plan, *plan.backward, Slots{inputs, outputs, nullptr, {0.0, 0.0}});
    out[0] = outputs[0];
    out[1] = outputs[1];
    out[2] = outputs[2];
  }

  // as albef_fast/itc_op.py:_backward: direction losses weigh 2x (the saved gradients are the mean's)
  static void scaled_by_aten(const variable_list& saved, const at::Tensor& g_loss, const at::Tensor& g_losses,
                             int64_t temp_dtype, variable_list& out) {
    at::Tensor g_image = g_loss, g_text = g_loss;
    if (g_losses.defined()) {
      const at::Tensor g_dirs = g_loss.defined() ? g_losses * 2.0 + g_loss : g_losses * 2.0;
      g_image = g_dirs[0];
      g_text = g_dirs[1];
    }
    out[0] = saved[0] * g_image;
    out[1] = saved[1] * g_text;
    if (temp_dtype < 0) return;
    at::Tensor d_temp;
    if (g_losses.defined()) {
      d_temp = at::dot(saved[3], g_losses.to(saved[3].scalar_type()));
      if (g_loss.defined()) d_temp = d_temp + saved[2] * g_loss;
    } else {
      d_temp = saved[2] * g_loss;
    }
    out[2] = d_temp.to(static_cast<at::ScalarType>(temp_dtype));
  }
};

py::list take_recorded() {
  const std::lock_guard<std::mutex> lock(recorded_mutex);
  py::list out = recorded != nullptr ? *recorded : py::list();
  delete recorded;
  recorded = nullptr;
  return out;
}

}  // namespace

// nullopt when the inputs' alignment is not what the plan's kernels were compiled for (the caller
// then takes the Python path, which compiles and launches the right variant): checked first.
std::optional<variable_list> itc_step(int64_t plan_id, const at::Tensor& image_feat, const at::Tensor& text_feat,
                                  const std::optional<at::Tensor>& temp, const at::Tensor& image_feat_m,
                                  const at::Tensor& text_feat_m, const at::Tensor& image_queue,
                                  const at::Tensor& text_queue, const std::optional<at::Tensor>& idx,
                                  const std::optional<at::Tensor>& idx_queue, double temp_value, double alpha) {
  const auto plan = find_plan(plan_id);
  TORCH_CHECK_VALUE(plan != nullptr, "plan: no registered plan ", plan_id);
  const at::Tensor none;
  const at::Tensor inputs[kNumInputs] = {image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                                         temp.value_or(none), idx.value_or(none), idx_queue.value_or(none)};
  if (!inputs_fit(plan->forward, inputs)) return std::nullopt;
#ifdef ALBEF_FAST_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(plan->device.is_cuda() ? std::optional<c10::Device>(plan->device)
                                                                   : std::nullopt);
#endif
  const std::array<at::Tensor, 2> ids = {inputs[7], inputs[8]};
  std::array<at::Tensor, kNumOutputs> outputs;
  const variable_list losses =
      ItcStep::apply(image_feat, text_feat, temp.has_value() ? *temp : image_feat_m, image_feat_m, text_feat_m,
                     image_queue, text_queue, &ids, temp.has_value(), temp_value, alpha, plan_id, &outputs);
  outputs[0] = losses[0];  // the same tensors, now with their autograd history
  outputs[1] = losses[1];
  return variable_list(outputs.begin(), outputs.end());
}

void bind_itc_launch(py::module_& m) {
  m.def("itc_register_plan", &register_plan, "Register a plan's launches (kernels/cpp_launch.py); returns its id");
  m.def("itc_forget_plans", &forget_plans, "Drop every registered plan");
  m.def("itc_step", &itc_step, "The fused ITC step of a registered plan, with autograd; None: inputs misaligned");
  m.def("itc_take_recorded", &take_recorded, "The launches made with CPU tensors since the last call (tests)");
}

}  // namespace albef_fast

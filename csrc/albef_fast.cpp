// The albef_fast._C extension module: op schemas (TORCH_LIBRARY) and build information (pybind11).
// Implementations are registered per dispatch key in ema.cpp / enqueue.cpp (CPU) and cuda/*.cu;
// host_floor.cpp registers its measurement op at the Autograd key (all devices); itc_launch.cpp
// adds the C++ call path of the fused ITC step to the Python module (not an op: eager only), and
// itc_entry.cpp itc_loss's usual call in front of it.
#include <torch/extension.h>

#include "itc_entry.h"
#include "itc_launch.h"

#include <string>

TORCH_LIBRARY(albef_fast, m) {
  // p_m <- p_m * momentum + p * (1 - momentum) for every pair, rounded as ALBEF's expression (fp32).
  m.def("ema_update_(Tensor(a!)[] params_m, Tensor[] params, float momentum) -> ()");
  // Write items[k] [N, D_k] as columns of queues[k] [D_k, Q] from ptr on (mod Q); ptr += N (mod Q).
  m.def("enqueue_(Tensor(a!)[] queues, Tensor[] items, Tensor(b!) ptr) -> ()");
  // A measurement (host_floor.cpp): an ITC step's host cost through C++ with no kernel work.
  m.def("_host_floor_step(Tensor image_feat, Tensor text_feat, Tensor image_feat_m, Tensor text_feat_m, "
        "Tensor image_queue, Tensor text_queue, Tensor temp, float alpha, int launches, bool packed=True) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef ALBEF_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "albef_fast C++ ops: torch.ops.albef_fast.ema_update_ and enqueue_, and the C++ ITC step";
  albef_fast::bind_itc_launch(m);
  albef_fast::bind_itc_entry(m);
  m.def("build_info", &build_info, "How the extension was built ({'cuda': bool, 'torch': version})");
}

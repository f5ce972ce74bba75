"""The fused ITC loss as a registered torch op: ``torch.ops.albef_fast.itc``.

One forward computes, for both directions, the loss, d loss / d features and d loss / d T
(SPEC section 3); the registered backward only scales the saved gradients by grad_output, so
backward costs nothing and syncs nothing. Being a custom op with a fake implementation, it is
opaque to torch.compile, which traces a training step around it with fullgraph=True. Eager
calls go through itc_apply: the same forward and backward as a plain autograd.Function, without
the custom-op dispatch (about 100 us a call, as much as the whole fused kernel at B = 64).

The op also returns the mean loss, with the gradients saved for it: the usual step
(`loss.backward()`) then costs no mean and no mean-backward op, and its backward is three
multiplications, one launch on the Triton path (FUSED_BACKWARDS; host time is most of a step at
B = 64).

Outputs (all fresh tensors; B rows, D features, W = the work dtype, fp32 or fp64):
    loss [] W             (loss_i2t + loss_t2i) / 2
    losses [2] W          (loss_i2t, loss_t2i)
    grad_image [B, D]     d loss / d image_feat (feature dtype; = d loss_i2t / d image_feat / 2)
    grad_text [B, D]      d loss / d text_feat (= d loss_t2i / d text_feat / 2)
    grad_temp [] W        d loss / d T
    grad_temp_dirs [2] W  (d loss_i2t / d T, d loss_t2i / d T)
    sims [2, B, B]        student logits against the in-batch keys (i2t, t2i), feature dtype
    terms [4] W           (ce_i2t, ce_t2i, kl_i2t, kl_t2i); kl is 0 when the teacher was skipped
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from . import streaming

__all__ = ["itc", "itc_apply", "BACKEND_IMPLS", "FUSED_BACKWARDS", "CPP_STEPS", "work_dtype", "matmul_precision",
           "float32_matmul_precision"]

# the eight outputs listed above (spelled out: custom_op infers the schema from it)
Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                torch.Tensor]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_backend_settings() -> Optional[Tuple[str, str]]:
    """torch's (CUDA, oneDNN) float32 matmul settings (2.9 on: cuBLAS follows the first), the
    two that set_float32_matmul_precision writes; None before 2.9."""
    backends = torch.backends
    if not hasattr(backends.cuda.matmul, "fp32_precision"):
        return None
    return backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision


def float32_matmul_precision() -> str:
    """torch's float32 matmul precision for CUDA products, by its legacy name ("highest" | "high" |
    "medium"). From torch 2.9 the legacy getter raises a RuntimeError once the legacy level and
    the per-backend settings disagree (``torch.backends.cuda.matmul.fp32_precision = "tf32"``
    alone, as torch's notes now advise): the CUDA setting decides then, "tf32" being "high"
    ("medium" where the legacy level says so). csrc/itc_entry.cpp keys its plans on the same state."""
    settings = _per_backend_settings()
    if settings is None:
        return torch.get_float32_matmul_precision()
    if settings[0] != "tf32":
        return "highest"
    try:
        return "medium" if torch.get_float32_matmul_precision() == "medium" else "high"
    except RuntimeError:
        return "high"


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]) -> Iterator[None]:
    """torch's float32 matmul precision ("highest" | "high" | "medium") for the block, then the
    level and settings before (process-wide while it lasts, as torch keeps them); None leaves
    them as they are, and so does a state whose legacy level torch refuses to read (a mix of
    the legacy and per-backend settings), which could not be restored."""
    if precision is None or precision == float32_matmul_precision():
        yield
        return
    settings = _per_backend_settings()
    try:
        level = torch.get_float32_matmul_precision()
    except RuntimeError:
        warnings.warn(f"precision={precision!r} not applied: torch's float32 matmul settings mix its legacy and "
                      "per-backend APIs (torch.get_float32_matmul_precision() raises)", RuntimeWarning, stacklevel=4)
        yield
        return
    torch.set_float32_matmul_precision(precision)  # level and settings together, as torch checks them
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(level)
        if settings is not None:  # as read before (the default "none" stays "none")
            torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = settings


def _torch_backend(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                   alpha, idx, idx_queue, details, grad, precision) -> Outputs:
    ids_b = None if idx is None else idx.reshape(-1)
    ids_q = None if idx_queue is None else idx_queue.reshape(-1)
    # precision= sets the products of fp32 features (cuBLAS's TF32 or not); the other dtypes' fp32
    # products take torch's setting as it is
    with matmul_precision(precision if image_feat.dtype == torch.float32 else None):
        return streaming.stream_itc(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                                    alpha, ids_b, ids_q, details=details, grad=grad)


# name -> implementation; kernels register "triton" on import (albef_fast.kernels).
BACKEND_IMPLS: Dict[str, Callable[..., Outputs]] = {"torch": _torch_backend}
# name -> the usual backward in one launch: (grad_image, grad_text, grad_temp, g_loss, temp dtype) ->
# (the three gradients scaled by g_loss; None for T without a temp dtype). kernels register "triton".
FUSED_BACKWARDS: Dict[str, Callable[..., Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]] = {}
# name -> the eager step issued from C++ with autograd in C++ (the op's arguments -> its outputs, or
# None: take the Python path). kernels register "triton" with ALBEF_FAST_LAUNCH=cpp (kernels/cpp_launch.py).
CPP_STEPS: Dict[str, Callable[..., Optional[Outputs]]] = {}


@torch.library.custom_op("albef_fast::itc", mutates_args=())
def itc(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: Optional[torch.Tensor],
    temp_value: float,
    alpha: float,
    idx: Optional[torch.Tensor],
    idx_queue: Optional[torch.Tensor],
    details: bool,
    grad: bool,
    backend: str,
    precision: str,
) -> Outputs:
    """temp (0-dim tensor) wins over temp_value (float) when given; inputs are pre-validated.
    grad=False (nothing needs a gradient) skips the student's key sums; the grads are zeros."""
    return _impl(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value,
                 alpha, idx, idx_queue, details, grad, backend, precision)


def _impl(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value, alpha,
          idx, idx_queue, details, grad, backend, precision) -> Outputs:
    t = temp if temp is not None else temp_value
    return BACKEND_IMPLS[backend](image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                                  t, alpha, idx, idx_queue, details, grad, precision)


@itc.register_fake
def _itc_fake(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value,
              alpha, idx, idx_queue, details, grad, backend, precision) -> Outputs:
    b, d = image_feat.shape
    w = work_dtype(image_feat.dtype)
    return (
        image_feat.new_empty((), dtype=w),
        image_feat.new_empty(2, dtype=w),
        image_feat.new_empty(b, d),
        text_feat.new_empty(b, d),
        image_feat.new_empty((), dtype=w),
        image_feat.new_empty(2, dtype=w),
        image_feat.new_empty(2, b, b),
        image_feat.new_empty(4, dtype=w),
    )


class _EagerITC(torch.autograd.Function):
    """The op's forward and backward for eager calls (no custom-op dispatch). Only the inputs
    that get gradients are the Function's own, the rest travel in one tuple (the engine's work
    per input counts at B = 64); momentum features or queues that require grad (they get none)
    are passed once more as `tracked`, so that the loss requires grad as it would with them as
    inputs. Old-style forward(ctx, ...): with a separate setup_context, Function.apply binds its
    arguments through inspect.signature on every call."""

    @staticmethod
    def forward(ctx, image_feat, text_feat, temp, rest, *tracked):
        inputs = (image_feat, text_feat, *rest[:4], temp, *rest[4:])
        output = _impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.n_tracked = len(tracked)
        return output

    @staticmethod
    def backward(ctx, *grads):
        grad_inputs = _backward(ctx, *grads)
        return grad_inputs[0], grad_inputs[1], grad_inputs[6], None, *(None,) * ctx.n_tracked


def itc_apply(*inputs) -> Outputs:
    """torch.ops.albef_fast.itc when compiling (traced as one opaque op), else the same
    computation through the backend's C++ step (CPP_STEPS, where registered and ready for these
    inputs) or _EagerITC. Arguments as for itc."""
    if torch.compiler.is_compiling():
        return itc(*inputs)
    cpp_step = CPP_STEPS.get(inputs[13])
    if cpp_step is not None:
        outputs = cpp_step(inputs)
        if outputs is not None:
            return outputs
    tracked = [t for t in inputs[2:6] if t.requires_grad]  # momentum features and queues
    return _EagerITC.apply(inputs[0], inputs[1], inputs[6], inputs[2:6] + inputs[7:], *tracked)


def _setup_context(ctx, inputs, output) -> None:
    temp = inputs[6]
    ctx.temp_dtype = None if temp is None else temp.dtype
    ctx.grad_inputs = (inputs[0], inputs[1]) if temp is None else (inputs[0], inputs[1], temp)  # _no_second_order
    ctx.backend = inputs[13]
    ctx.save_for_backward(*output[2:6])  # grad_image, grad_text, grad_temp, grad_temp_dirs
    ctx.mark_non_differentiable(*output[2:])  # only the losses backpropagate
    ctx.set_materialize_grads(False)  # no zero-filled grads for the outputs nothing backpropagates


def _backward(ctx, g_loss, g_losses, *unused):
    """Scale the saved gradients by grad_output. The usual case (only the mean loss
    backpropagates) is three multiplications; the saved gradients are those of the mean, so a
    direction's loss weighs 2x (d loss_i2t / d image_feat = 2 grad_image)."""
    if g_loss is None and g_losses is None:  # only sims / terms were used: nothing reaches the inputs
        return (None,) * 15
    grad_image, grad_text, grad_temp, grad_temp_dirs = ctx.saved_tensors
    fused = FUSED_BACKWARDS.get(ctx.backend) if g_losses is None else None
    if fused is not None and _plain_tensors(g_loss, grad_image):
        g_image, g_text, d_temp = fused(grad_image, grad_text, grad_temp, g_loss, ctx.temp_dtype)
        return g_image, g_text, None, None, None, None, d_temp, *(None,) * 8
    if g_losses is None:
        g_image = g_text = g_loss
    else:
        g_dirs = g_losses * 2.0 if g_loss is None else g_losses * 2.0 + g_loss
        g_image, g_text = g_dirs.unbind()
    d_temp = None
    if ctx.temp_dtype is not None:
        d_temp = _temp_grad(grad_temp, grad_temp_dirs, g_loss, g_losses)
        d_temp = d_temp if d_temp.dtype == ctx.temp_dtype else d_temp.to(ctx.temp_dtype)
    # a 0-dim factor keeps the gradient's dtype (bf16 stays bf16)
    g_image, g_text = grad_image * g_image, grad_text * g_text
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and type(grad_image) is torch.Tensor:
        g_image, g_text, d_temp = _no_second_order(ctx.grad_inputs, g_image, g_text, d_temp)
    return g_image, g_text, None, None, None, None, d_temp, *(None,) * 8


SECOND_ORDER_ERROR = (
    "albef_fast.itc_loss: its gradient has no gradient of its own with respect to the features or the "
    "temperature (second order: a gradient penalty on the features, a Hessian-vector product); the one pass "
    "keeps no graph of the logits. Use albef_fast.reference.itc_loss for such terms.")


class _SecondOrderGuard(torch.autograd.Function):
    """A 0-dim zero that depends on the op's differentiable inputs and raises when differentiated."""

    @staticmethod
    def forward(ctx, *inputs):
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(SECOND_ORDER_ERROR)


def _no_second_order(grad_inputs, *grads):
    """The gradients of a backward that records a graph (create_graph=True), each plus a guarded
    zero. The saved gradients are constants to autograd, so differentiating the gradients w.r.t.
    the features or T would silently give no second-order term (a gradient penalty would be
    wrong): it raises instead. d / d grad_output stays exact (the guard is on another path, which
    torch.autograd.grad with inputs=[grad_output] does not run); the values are unchanged."""
    if not any(t.requires_grad for t in grad_inputs):
        return grads
    zero = _SecondOrderGuard.apply(*grad_inputs)
    return tuple(None if g is None else g + zero.to(g.dtype) for g in grads)


def _plain_tensors(g_loss, grad_image) -> bool:
    """Whether the fused backward may launch on these tensors: plain tensors (not fake or traced:
    under torch.compile and opcheck the aten products are what gets traced) in a backward that
    records no graph (create_graph=True gets the aten products and their graph)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return type(g_loss) is torch.Tensor and type(grad_image) is torch.Tensor


def _temp_grad(grad_temp, grad_temp_dirs, g_loss, g_losses):
    """d / d T of g_loss * loss + g_losses . losses (either may be None: not used)."""
    if g_losses is None:
        return grad_temp * g_loss
    d_temp = torch.dot(grad_temp_dirs, g_losses.to(grad_temp_dirs.dtype))
    return d_temp if g_loss is None else d_temp + grad_temp * g_loss


itc.register_autograd(_backward, setup_context=_setup_context)

"""The fused ITC step issued from C++ (csrc/itc_launch.cpp): the default on CUDA where the extension
has it; ALBEF_FAST_LAUNCH=direct keeps the Python launches (kernels/launch.py), =jit Triton's own.

At ALBEF's B = 64 the step is host bound (benchmarks/NOTES.md): on this machine's CPU the Python
around the kernels (plan lookup, nine allocations, four launches' argument handling, the
autograd.Function) cost ~100 us a step, the kernels run ~0.1 ms on an H200. Here each plan's
first call runs the Python path (kernels/itc.py:itc_triton) with its launches recorded; the
recording becomes a C++ plan: per launch the compiled kernel (CUfunction), grid, block, shared
memory, and per parameter where its value comes from (an input, the workspace, an output, a
constant, the call's temperature or alpha). Later calls of the plan make one C++ call
(`_C.itc_step`), which allocates, launches with cuLaunchKernel and records autograd in C++; the
usual backward is one launch of the scale kernel (kernels/itc_backward.py), recorded with the plan.

A plan is left to the Python path when the recording cannot describe it: the autotuner or f16p's
chunked launches, a Triton launch hook, a kernel using scratch memory or clusters, a parameter
block the kernel's PTX does not confirm, a pointer that is none or several of the call's
tensors, or CUDA tensors with an extension built without CUDA. A call whose input alignment differs from what the kernels were compiled for takes the
Python path too (it compiles that variant). tests/cpp_launch_check.py checks with Triton's real
compiler and a recording driver that the C++ step passes each kernel the parameters the Python
path passes.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Sequence, Tuple

import torch

from . import itc, itc_backward, launch

__all__ = ["enabled", "entry", "forget", "record_plan", "step"]

# parameter kinds and sources, as csrc/itc_launch.cpp reads them
INPUT, WORKSPACE, OUTPUT, NULL, I32, I64, F32 = range(7)
_PTX_SIZES = {"u64": 8, "b64": 8, "s64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4}
_SIZES = {INPUT: 8, WORKSPACE: 8, OUTPUT: 8, NULL: 8, I32: 4, I64: 8, F32: 4}


def enabled() -> bool:
    """The extension with the C++ step, and direct launches (a compiled Triton version listed in
    kernels/launch.py; not the interpreter), unless ALBEF_FAST_LAUNCH is direct or jit. Read at
    import. The default since H200 run 8: its bit tests passed on the card, and it ran the B = 64
    step at 0.11-0.23 ms launched against 0.31-0.76 for the Python launches."""
    if os.environ.get("ALBEF_FAST_LAUNCH", "cpp") in ("direct", "jit") or not launch.direct_launch_enabled():
        return False
    from albef_fast import _extension

    return _extension.has_ops() and hasattr(_extension._EXT, "itc_step")


def _ext():
    from albef_fast import _extension

    return _extension._EXT


def step(inputs) -> Optional[Sequence[torch.Tensor]]:
    """The op's eight outputs through the C++ step when the plan of these inputs is registered,
    else None (the caller runs the Python path, which records the plan on its first call).
    inputs: as albef_fast.itc_op.itc."""
    (image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value, alpha, idx,
     idx_queue, details, grad, _, precision) = inputs
    t = temp if temp is not None else temp_value
    key, feats, image_queue, text_queue, temp_t, idx_v, idq_v = itc.prologue(
        image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, t, alpha, idx, idx_queue,
        details, grad, precision)
    plan = itc._PLANS.get(key)
    if plan is None or plan.cpp is None or plan.cpp < 0:
        return None
    temp_v = 1.0 if temp_t is not None else float(t)
    outputs = _ext().itc_step(plan.cpp, feats[0], feats[1], temp_t, feats[2], feats[3], image_queue, text_queue,
                              idx_v, idq_v, temp_v, float(alpha))
    if outputs is not None:
        _ext().itc_entry_learn(plan.cpp, feats[0], image_queue)  # itc_loss's call, if usual: here from now on
    return outputs


def entry():
    """The extension's itc_loss_entry (csrc/itc_entry.cpp): itc_loss's usual call checked and keyed
    in C++ and, once the Python path has run its C++ step (which `step` tells the entry), launched
    from there with no Python in between."""
    return _ext().itc_loss_entry


def record_plan(plan, call, records, workspace: Tuple[int, int], outputs) -> int:
    """Register the plan of one Python-path call (kernels/itc.py:itc_triton) with the C++ step:
    its id, or -1 (the plan stays on the Python path; plan.cpp_reason says why).
    call: (inputs in the C++ order: image, text, image_m, text_m, image_queue, text_queue, temp,
    idx, idx_queue (None where absent); floats (temp_value, alpha)); records: the launches
    (kernels/launch.py:RECORDING); workspace: (base address, bytes); outputs: the op's eight."""
    if outputs[0].device.type == "cuda" and not _ext().build_info().get("cuda"):
        plan.cpp_reason = "the extension was built without CUDA"
        return -1
    try:
        forward = [_launch_spec(r, call[0], call[1], workspace, outputs) for r in records]
        backward = _backward_spec(outputs, call[0][6])
    except _NotRecordable as why:
        plan.cpp_reason = str(why)
        return -1
    except Exception as err:  # noqa: BLE001  (opt-in path: a Triton whose metadata differs must not fail the step)
        plan.cpp_reason = f"recording failed: {err!r}"
        warnings.warn(f"albef_fast: ALBEF_FAST_LAUNCH=cpp left a plan on the Python path ({plan.cpp_reason})",
                      RuntimeWarning, stacklevel=2)
        return -1
    dev = outputs[0].device
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else -1)
    b, d = outputs[2].shape
    return _ext().itc_register_plan(1 if dev.type == "cuda" else 0, index, b, d, workspace[1] // 4, forward, backward)


class _NotRecordable(Exception):
    pass


def _backward_spec(outputs, temp):
    """The scale kernel's launch for this plan's saved gradients, recorded by running it once on
    them (its outputs are discarded)."""
    g = torch.ones((), device=outputs[0].device, dtype=torch.float32)  # the fp32 loss's grad_output
    temp_dtype = None if temp is None else temp.dtype
    with launch.recording() as records:  # nested in itc.py:_recorded's (this thread holds it)
        if records is None:
            raise _NotRecordable("another thread records a plan")
        products = itc_backward.scale_saved_grads(outputs[2], outputs[3], outputs[4], g, temp_dtype)
    if len(records) != 1:
        raise _NotRecordable(f"the backward made {len(records)} launches")
    inputs = (outputs[2], outputs[3], outputs[4], g)
    return _launch_spec(records[0], inputs, (), (0, 0), products)


def _launch_spec(record, inputs, floats, workspace, outputs):
    """(function, grid, threads, shared memory, [(kind, value, aligned)]) of one recorded launch."""
    prepared, tensors, call_floats, entry = record
    kernel = _recordable_kernel(prepared, call_floats, entry, floats)
    params = _params(kernel, prepared, tensors, call_floats, inputs, workspace, outputs)
    _check_abi(kernel, params)
    function = entry[1] if isinstance(entry[1], int) else 0  # 0: a test driver's stand-in
    grid = tuple(prepared._grid3)
    return function, grid, 32 * kernel.metadata.num_warps, kernel.metadata.shared, params


def _recordable_kernel(prepared, call_floats, entry, floats):
    """The compiled kernel of a recorded launch, if the C++ step can replay it: a compiled
    kernel, no clusters, scratch memory or launch attributes, and the call's floats."""
    if entry is None:
        raise _NotRecordable(f"{prepared.launcher.fn.__name__} went through JITFunction.run (no compiled kernel)")
    kernel = entry[3]
    meta = kernel.metadata
    if getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "global_scratch_size", 0) or \
            getattr(meta, "profile_scratch_size", 0) or getattr(meta, "launch_pdl", False) or \
            getattr(meta, "launch_cooperative_grid", False):
        raise _NotRecordable(f"{kernel.name}: clusters, scratch memory or launch attributes")
    if tuple(call_floats) != tuple(floats[:len(call_floats)]):
        raise _NotRecordable(f"{kernel.name}: floats {call_floats} are not the call's (temp_value, alpha)")
    return kernel


def _params(kernel, prepared, tensors, call_floats, inputs, workspace, outputs):
    """[(kind, value, aligned)] of the kernel's parameters, constexprs left out, in its order:
    pointers as the call's tensors (_pointer), ints by value, floats by their place among the
    call's floats; then the two scratch pointers."""
    values = (*tensors, *prepared.ints, *call_floats, *prepared._consts)
    signature = kernel.src.signature
    params = []
    for position, (name, value) in enumerate(zip(prepared.launcher.fn.arg_names, values)):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            params.append(_pointer(value, inputs, workspace, outputs, name))
        elif kind in ("i32", "i64"):
            params.append((I32 if kind == "i32" else I64, int(value), -1))
        elif kind == "fp32":
            params.append((F32, position - len(tensors) - len(prepared.ints), -1))
        else:
            raise _NotRecordable(f"{kernel.name}: parameter {name} of type {kind}")
    return params + [(NULL, 0, -1), (NULL, 0, -1)]  # global and profile scratch


def _pointer(tensor, inputs, workspace, outputs, name):
    ptr = tensor.data_ptr()
    found = [(INPUT, k, int(ptr % 16 == 0)) for k, t in enumerate(inputs) if t is not None and t.data_ptr() == ptr]
    found += [(OUTPUT, k, -1) for k, t in enumerate(outputs) if t is not None and t.data_ptr() == ptr]
    base, size = workspace
    if base <= ptr < base + size:
        found.append((WORKSPACE, ptr - base, -1))
    if ptr == 0 or len(found) != 1:
        raise _NotRecordable(f"{name}: its pointer is {len(found)} of the call's tensors")
    return found[0]


def _check_abi(kernel, params) -> None:
    """The parameter sizes must be the kernel entry's, as its PTX declares them."""
    ptx = kernel.asm.get("ptx", "") if hasattr(kernel, "asm") else ""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    declared = re.findall(r"\.param\s+\.(\w+)", entry.group(1)) if entry else None
    if declared is None or [_PTX_SIZES.get(t) for t in declared] != [_SIZES[p[0]] for p in params]:
        raise _NotRecordable(f"{kernel.name}: PTX parameters {declared} differ from the recorded block")


def forget() -> None:
    """Drop the registered plans (kernels/itc.py starts its plans over)."""
    _ext().itc_forget_plans()

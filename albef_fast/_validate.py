"""Argument checks shared by the public API.

Every public call runs these before it touches any state, so that a bad call raises a
ValueError / TypeError naming the argument, the expected and the received value, and changes
nothing. None of them reads a device tensor's value (no host synchronization).
"""
from __future__ import annotations

import collections.abc
import numbers
from typing import Optional, Sequence, Tuple

import torch

BACKENDS = ("torch", "triton")
PRECISIONS = ("highest", "high", "medium")
# What every path computes in: features, queues and the temperature of the loss (the Triton path
# all but float64), the EMA's parameters. float8 and complex have no kernels in any of them.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# What enqueue_ writes on every device: the CUDA op's kinds (csrc/cuda/enqueue.cu), which the CPU
# op and the fallback cover too (csrc/checks.h holds the ops to the same list)
QUEUE_DTYPES = FLOAT_DTYPES + (torch.int64, torch.int32)


def _dtype_names(dtypes) -> str:
    names = [str(t).replace("torch.", "") for t in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def tensor(name: str, value, ndim: Optional[int], floating: Optional[bool] = True) -> torch.Tensor:
    """A tensor of `ndim` dims (None: any); floating True: one of FLOAT_DTYPES, False: an
    integer (or bool) dtype, None: either (the caller checks)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype ({_dtype_names(FLOAT_DTYPES)}), got {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if value.shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {list(expected)} ({what}), got {list(value.shape)}")


def same_device(device: torch.device, **named: Optional[torch.Tensor]) -> None:
    for name, value in named.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} like the features, got {value.device}")


def same_dtype(dtype: torch.dtype, like: str, **named: torch.Tensor) -> None:
    for name, value in named.items():
        if value.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} like {like}, got {value.dtype}")


def unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    return float(value)


def count(name: str, value, least: int = 1) -> int:
    """An int >= least (numpy's integers too; a bool or a float is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {least}, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {value}")
    return int(value)


def tensors(name: str, value) -> list:
    """A list of the iterable's items (a generator such as model.parameters() too), not a bare tensor."""
    if isinstance(value, torch.Tensor) or not isinstance(value, collections.abc.Iterable):
        raise TypeError(f"{name}: expected a sequence of tensors, got {type(value).__name__}")
    return list(value)


def writable(name: str, values: Sequence[torch.Tensor]) -> None:
    """No tensor whose elements share memory, as an expand()ed one's do (a dimension of size > 1
    and stride 0: ATen's has_internal_overlap "Yes", csrc/checks.h): an in-place write to it would
    depend on the order of the writes."""
    for k, value in enumerate(values):
        if any(stride == 0 and size > 1 for size, stride in zip(value.shape, value.stride())):
            raise ValueError(f"{name}[{k}]: expected a tensor whose elements do not share memory (an in-place "
                             f"update is undefined there), got strides {list(value.stride())}; clone() it")


def ema_disjoint(params_m: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    """No momentum tensor sharing memory with another operand of the call (a pair's own p aside)."""
    _disjoint([operand for k, (p_m, p) in enumerate(zip(params_m, params))  # in the C++ check's order
               for operand in ((f"params_m[{k}]", p_m, True, k), (f"params[{k}]", p, False, k))])


def enqueue_disjoint(queues: Sequence[torch.Tensor], items: Sequence[torch.Tensor], ptr: torch.Tensor) -> None:
    """No queue (nor ptr) sharing memory with another operand of the call."""
    _disjoint([("ptr", ptr, True, None)] + [operand for k, (q, item) in enumerate(zip(queues, items))
                                             for operand in ((f"queues[{k}]", q, True, None),
                                                             (f"items[{k}]", item, False, None))])


def _disjoint(operands) -> None:
    """csrc/checks.h:check_disjoint in Python (the fallbacks' check): operands (name, tensor,
    written, pair); a written one overlapping any other raises, since what it would hold depends
    on the order of the writes. Candidates from the sorted byte extents; as ATen's overlap status,
    strided views that are not dense pass, and a pair's p_m may be its own p."""
    spans = sorted((*_extent(op[1]), k) for k, op in enumerate(operands) if op[1].numel() > 0)
    clashes = []
    for i, (_, end, k) in enumerate(spans):
        for n in range(i + 1, len(spans)):
            if spans[n][0] >= end:
                break
            a, b = operands[k], operands[spans[n][2]]
            if not (a[2] or b[2]):
                continue
            status = _overlap_status(a[1], b[1])
            own_pair = a[3] is not None and a[3] == b[3]
            if status == "partial" or (status == "full" and not own_pair):
                clashes.append(tuple(sorted((k, spans[n][2]))))
    if clashes:  # the clash of lowest operands, named whatever the addresses
        a, b = (operands[k] for k in min(clashes))
        written, other = (a, b) if a[2] else (b, a)
        raise ValueError(f"{written[0]}: shares memory with {other[0]} (the same tensor listed twice?); written "
                         "in place, what it would hold depends on the order of the writes")


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap_status(a: torch.Tensor, b: torch.Tensor) -> str:
    """ATen's get_overlap_status for two tensors whose extents intersect."""
    if a is b:
        return "full"
    if not (_dense(a) and _dense(b)):
        return "too hard"
    same = _extent(a) == _extent(b) and a.stride() == b.stride()
    return "full" if same else "partial"


def _dense(t: torch.Tensor) -> bool:
    """ATen's is_non_overlapping_and_dense: the strides, sorted, are the sizes' running products."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def temperature(value, device: torch.device) -> None:
    """temp: a positive number, or a 0-dim (or [1]) floating tensor (value checked only on the CPU).
    [1]: FSDP2's fully_shard takes no 0-dim parameter, and asks for a one-element 1-D one instead."""
    if isinstance(value, torch.Tensor):
        if value.shape not in ((), (1,)) or value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"temp: expected a 0-dim (or [1]) floating tensor ({_dtype_names(FLOAT_DTYPES)}), "
                             f"got shape {list(value.shape)} {value.dtype}")
        if value.device != device:
            raise ValueError(f"temp: expected a tensor on {device} like the features, got {value.device}")
        # Reading the value is free on the CPU; on CUDA (or while tracing) it would be a sync.
        checkable = value.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and not bool(value.detach() > 0):
            raise ValueError(f"temp: expected a positive temperature, got {float(value.detach())}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"temp: expected a float or a 0-dim (or [1]) tensor, got {type(value).__name__}")
    if not float(value) > 0.0:
        raise ValueError(f"temp: expected a positive temperature, got {value}")


def choice(name: str, value, options: Sequence[str]) -> None:
    if value is not None and value not in options:
        raise ValueError(f"{name}: expected one of {list(options)} or None, got {value!r}")


def itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
               idx, idx_queue, backend, precision) -> None:
    """All checks of albef_fast.itc_loss (SPEC section 2). The usual call passes one combined
    test (a third of the named checks' host time, which counts at B = 64); any other is walked
    through the named checks, which raise for the first problem."""
    if _itc_usual_ok(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                     idx, idx_queue, backend, precision):
        return
    b, d = tensor("image_feat", image_feat, 2).shape
    if b < 1 or d < 1:
        raise ValueError(f"image_feat: expected a non-empty [B, D] tensor, got {list(image_feat.shape)}")
    shape("text_feat", tensor("text_feat", text_feat, 2), [b, d], "[B, D] like image_feat")
    shape("image_feat_m", tensor("image_feat_m", image_feat_m, 2), [b, d], "[B, D] like image_feat")
    shape("text_feat_m", tensor("text_feat_m", text_feat_m, 2), [b, d], "[B, D] like image_feat")
    if tensor("image_queue", image_queue, 2).shape[0] != d:  # a [Q, D] queue: say which layout
        raise ValueError(f"image_queue: expected shape [{d}, Q] ([D, Q] as ALBEF stores its queues, D = {d} like "
                         f"the features), got {list(image_queue.shape)}")
    q = image_queue.shape[1]
    shape("text_queue", tensor("text_queue", text_queue, 2), [d, q], "[D, Q] like image_queue")
    device = image_feat.device
    same_device(device, text_feat=text_feat, image_feat_m=image_feat_m, text_feat_m=text_feat_m,
                image_queue=image_queue, text_queue=text_queue)
    same_dtype(image_feat.dtype, "image_feat", text_feat=text_feat, image_feat_m=image_feat_m,
               text_feat_m=text_feat_m)
    same_dtype(image_queue.dtype, "image_queue", text_queue=text_queue)
    temperature(temp, device)
    unit_interval("alpha", alpha)
    ids(idx, idx_queue, b, q, device)
    choice("backend", backend, BACKENDS)
    choice("precision", precision, PRECISIONS)


def _itc_usual_ok(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                  idx, idx_queue, backend, precision) -> bool:
    """True for a call every check of itc_inputs passes, with no ids and a float alpha; False for
    anything else (then the named checks decide)."""
    Tensor = torch.Tensor
    feats = (image_feat, text_feat, image_feat_m, text_feat_m)
    if not (all([isinstance(t, Tensor) for t in (*feats, image_queue, text_queue)])
            and idx is None and idx_queue is None and type(alpha) is float and 0.0 <= alpha <= 1.0
            and (backend is None or backend in BACKENDS) and (precision is None or precision in PRECISIONS)):
        return False
    shape, dtype, device = image_feat.shape, image_feat.dtype, image_feat.device
    queue_shape, queue_dtype = image_queue.shape, image_queue.dtype
    if not (len(shape) == 2 and shape[0] >= 1 and shape[1] >= 1 and dtype in FLOAT_DTYPES
            and queue_dtype in FLOAT_DTYPES and len(queue_shape) == 2 and queue_shape[0] == shape[1]
            and text_queue.shape == queue_shape and text_queue.dtype == queue_dtype
            and image_queue.device == device and text_queue.device == device
            and all([f.shape == shape and f.dtype == dtype and f.device == device for f in feats[1:]])):
        return False
    if type(temp) is float:
        return temp > 0.0
    if not (isinstance(temp, Tensor) and temp.dim() == 0 and temp.dtype in FLOAT_DTYPES and temp.device == device):
        return False
    # the value only where reading it is free, as temperature()
    return device.type != "cpu" or torch.compiler.is_compiling() or bool(temp.detach() > 0)


def ids(idx, idx_queue, b: int, q: int, device: torch.device) -> None:
    """idx [B] (or [B, 1]) with idx_queue [Q] (or [1, Q]), both integer, or neither."""
    if idx is None and idx_queue is None:
        return
    if idx is None or idx_queue is None:
        given, missing = ("idx", "idx_queue") if idx_queue is None else ("idx_queue", "idx")
        raise ValueError(f"{missing}: required with {given} (retrieval targets need both), got None")
    tensor("idx", idx, None, floating=False)
    tensor("idx_queue", idx_queue, None, floating=False)
    if idx.numel() != b or idx.dim() > 2 or (idx.dim() == 2 and idx.shape[1] != 1):
        raise ValueError(f"idx: expected shape [{b}] or [{b}, 1], got {list(idx.shape)}")
    if idx_queue.numel() != q or idx_queue.dim() > 2 or (idx_queue.dim() == 2 and idx_queue.shape[0] != 1):
        raise ValueError(f"idx_queue: expected shape [{q}] or [1, {q}], got {list(idx_queue.shape)}")
    same_device(device, idx=idx, idx_queue=idx_queue)


def enqueue_inputs(queues, items, ptr) -> None:
    """All checks of albef_fast.enqueue_."""
    if not isinstance(queues, (list, tuple)) or not isinstance(items, (list, tuple)):
        raise TypeError("queues, items: expected sequences of tensors")
    if len(queues) != len(items) or not queues:
        raise ValueError(f"items: expected one item per queue ({len(queues)}), got {len(items)}")
    q = tensor("queues[0]", queues[0], 2, floating=None).shape[1]
    n = tensor("items[0]", items[0], 2, floating=None).shape[0]
    if q < 1:
        raise ValueError("queues[0]: expected a queue with Q >= 1 columns, got 0")
    if n > q:
        raise ValueError(f"items: expected N <= Q = {q} rows to enqueue, got N = {n}")
    device = queues[0].device
    for k, (queue, item) in enumerate(zip(queues, items)):
        if not (isinstance(queue, torch.Tensor) and isinstance(item, torch.Tensor) and queue.dim() == 2
                and queue.shape[1] == q and item.shape == (n, queue.shape[0])
                and queue.dtype in QUEUE_DTYPES and item.dtype in QUEUE_DTYPES
                and item.is_floating_point() == queue.is_floating_point()
                and queue.device == device and item.device == device):
            _enqueue_pair_error(k, queue, item, q, n, device)  # the slow path only names the problem
    pointer(ptr, device)


def _enqueue_pair_error(k: int, queue, item, q: int, n: int, device: torch.device) -> None:
    dk = tensor(f"queues[{k}]", queue, 2, floating=None).shape[0]
    shape(f"queues[{k}]", queue, [dk, q], "[D_k, Q] with the Q of queues[0]")
    shape(f"items[{k}]", tensor(f"items[{k}]", item, 2, floating=None), [n, dk], "[N, D_k] like its queue")
    for name, value in ((f"queues[{k}]", queue), (f"items[{k}]", item)):
        if value.dtype not in QUEUE_DTYPES:
            raise TypeError(f"{name}: expected dtype {_dtype_names(QUEUE_DTYPES)}, got {value.dtype}")
    if item.is_floating_point() != queue.is_floating_point():
        raise TypeError(f"items[{k}]: dtype {item.dtype} does not fit queues[{k}] of dtype {queue.dtype}")
    same_device(device, **{f"queues[{k}]": queue, f"items[{k}]": item})


def pointer(ptr, device: torch.device) -> None:
    if not isinstance(ptr, torch.Tensor):
        raise TypeError(f"ptr: expected a 1-element int64 tensor, got {type(ptr).__name__}")
    if ptr.numel() != 1 or ptr.dtype != torch.int64:
        raise ValueError(f"ptr: expected a 1-element int64 tensor, got shape {list(ptr.shape)} {ptr.dtype}")
    if ptr.device != device:
        raise ValueError(f"ptr: expected a tensor on the queues' device {device}, got {ptr.device}")


def ema_inputs(params_m, params, momentum) -> None:
    """All checks of albef_fast.ema_update_. Every pair passes a fast test first; only a failing
    list is walked again to name the culprit (the named checks took 0.6 ms for ALBEF's 411 pairs,
    as long as the CUDA update itself)."""
    unit_interval("momentum", momentum)
    if len(params_m) != len(params):
        raise ValueError(f"params: expected one tensor per momentum tensor ({len(params_m)}), got {len(params)}")
    if _ema_pairs_ok(params_m, params):
        return
    for k, (p_m, p) in enumerate(zip(params_m, params)):
        tensor(f"params_m[{k}]", p_m, None)
        tensor(f"params[{k}]", p, None)
        if p.shape != p_m.shape or p.dtype != p_m.dtype or p.device != p_m.device:
            raise ValueError(
                f"params[{k}]: expected {list(p_m.shape)} {p_m.dtype} on {p_m.device} like params_m[{k}], "
                f"got {list(p.shape)} {p.dtype} on {p.device}"
            )


def _ema_pairs_ok(params_m, params) -> bool:
    """Every pair: two floating-point tensors of one shape, dtype and device."""
    Tensor = torch.Tensor
    return all(isinstance(p_m, Tensor) and isinstance(p, Tensor) and p_m.dtype in FLOAT_DTYPES
               and p.dtype == p_m.dtype and p.shape == p_m.shape and p.device == p_m.device
               for p_m, p in zip(params_m, params))

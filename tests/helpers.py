"""Shared test inputs, the independent float64 formulation of SPEC section 1, the EMA's
parameter-layout check (CPU and CUDA) and the choice of the state ops' implementation."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from albef_fast import _extension


def make_inputs(b=5, q=37, d=24, dtype=torch.float32, device="cpu", queue_dtype=None, retrieval=False,
                n_ids=3, seed=0) -> SimpleNamespace:
    """L2-normalized features [B, D], queues [D, Q] (normalized columns), ids with repeats."""
    g = torch.Generator().manual_seed(seed)
    feat = lambda: F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    queue = lambda: F.normalize(torch.randn(d, q, generator=g, dtype=torch.float64), dim=0)  # noqa: E731
    qd = queue_dtype or dtype
    x = SimpleNamespace(
        image_feat=feat().to(device, dtype), text_feat=feat().to(device, dtype),
        image_feat_m=feat().to(device, dtype), text_feat_m=feat().to(device, dtype),
        image_queue=queue().to(device, qd), text_queue=queue().to(device, qd),
        idx=None, idx_queue=None,
    )
    if retrieval:
        x.idx = torch.randint(0, n_ids, (b,), generator=g).to(device)
        ids_q = torch.randint(0, n_ids + 2, (q,), generator=g)
        ids_q[: q // 3] = -100  # the part of the id queue that was never written
        x.idx_queue = ids_q.view(1, q).to(device)
    return x


def oracle_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                idx: Optional[torch.Tensor] = None, idx_queue: Optional[torch.Tensor] = None):
    """SPEC section 1 written out directly in float64: (loss_ita, loss_i2t, loss_t2i, terms).

    terms: dict of the per-direction ce / kl means, from their definitions.
    """
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    out, terms = [], {}
    for name, q, q_m, k_b, queue in (
        ("i2t", image_feat, image_feat_m, text_feat_m, text_queue),
        ("t2i", text_feat, text_feat_m, image_feat_m, image_queue),
    ):
        keys = torch.cat([f64(k_b), f64(queue).T])  # [B + Q, D]
        s = f64(q) @ keys.T / temp
        with torch.no_grad():
            t_const = temp.detach() if torch.is_tensor(temp) else temp
            m = f64(q_m) @ keys.T / t_const
            b = q.shape[0]
            if idx is None:
                h = torch.zeros_like(s)
                h[torch.arange(b), torch.arange(b)] = 1.0
            else:
                ids = torch.cat([idx.view(-1), idx_queue.view(-1)])
                h = (idx.view(-1, 1) == ids.view(1, -1)).double()
                h = h / h.sum(1, keepdim=True)
            p_m = torch.exp(m - torch.logsumexp(m, 1, keepdim=True))
            target = alpha * p_m + (1 - alpha) * h
        log_p = s - torch.logsumexp(s, 1, keepdim=True)
        out.append(-(target * log_p).sum(1).mean())
        with torch.no_grad():
            terms[f"ce_{name}"] = -(h * log_p).sum(1).mean()
            terms[f"kl_{name}"] = (p_m * (torch.log(p_m) - log_p)).sum(1).mean()
            terms[f"ent_{name}"] = -(p_m * torch.log(p_m)).sum(1).mean()
    return (out[0] + out[1]) / 2, out[0], out[1], terms


def every_other_column(queue: torch.Tensor) -> torch.Tensor:
    """The queue as a view with column stride 2 (read through its strides, not copied)."""
    wide = torch.zeros(queue.shape[0], 2 * queue.shape[1] + 1, dtype=queue.dtype, device=queue.device)
    wide[:, 1::2] = queue
    return wide[:, 1::2]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_fake_driver_check(script) -> dict:
    """Run one of the fake-driver checks (tests/launch_check.py, tests/cpp_launch_check.py) in a
    child process without TRITON_INTERPRET and return its JSON summary line; skips the calling
    test where direct launches are off for the installed Triton."""
    import json
    import os
    import subprocess
    import sys

    import pytest
    import triton

    from albef_fast.kernels import launch

    if triton.__version__.rsplit(".", 1)[0] not in launch.SUPPORTED:
        pytest.skip(f"direct launches are off for Triton {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALBEF_FAST_LAUNCH")}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def ema_layouts(dtype, device):
    """(p_m, p) pairs of one shape in layouts other than contiguous, and the larger tensor the
    sliced p_m is a view of: channels_last conv weights (dense, permuted: the kernels' flat
    walk), both transposed (the same), one transposed, every other column of a larger tensor
    (the ATen path of csrc/ema_layout.h)."""
    new = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    wide = new(4, 12)
    pairs = [(new(8, 3, 5, 5).contiguous(memory_format=torch.channels_last),
              new(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)),
             (new(6, 4).T, new(6, 4).T), (new(4, 6), new(6, 4).T), (wide[:, ::2], new(4, 6))]
    return pairs, wide


def check_ema_layouts(dtype, device):
    """Every layout of ema_layouts updated in place, the bits of the same update on contiguous
    copies, the strides kept, and the larger tensor's other columns untouched."""
    import albef_fast

    pairs, wide = ema_layouts(dtype, device)
    expected = [p_m.contiguous() for p_m, _ in pairs]
    albef_fast.ema_update_(expected, [p.contiguous() for _, p in pairs], 0.995)
    strides, others = [p_m.stride() for p_m, _ in pairs], wide[:, 1::2].clone()
    albef_fast.ema_update_([p_m for p_m, _ in pairs], [p for _, p in pairs], 0.995)
    for (p_m, _), exp, stride in zip(pairs, expected, strides):
        assert torch.equal(p_m, exp) and p_m.stride() == stride
    assert torch.equal(wide[:, 1::2], others)


def use_state_ops(monkeypatch, ops: bool) -> None:
    """The state ops through the C++ extension (ops; skipped where it is not built) or the
    pure-PyTorch fallbacks."""
    if ops and not _extension.has_ops():
        pytest.skip("C++ extension not built")
    monkeypatch.setattr(_extension, "has_ops", lambda: ops)

"""The fused step issued from C++ (ALBEF_FAST_LAUNCH=cpp: csrc/itc_launch.cpp, kernels/cpp_launch.py)
and itc_loss's usual call in C++ in front of it (csrc/itc_entry.cpp).

tests/cpp_launch_check.py runs in a child process without TRITON_INTERPRET: a fake driver compiles
the kernels for sm_90, the Python path's launches are recorded by the driver and the C++ step's by
the extension (CPU tensors), and each launch's parameters must agree. tests/cpp_entry_check.py
checks the same way that the C++ entry launches what the Python path launches for each call it
takes, and takes no other. On a GPU the CUDA tests below compare the paths' results bit for bit.
"""
import pathlib

import pytest
import torch

from albef_fast import _extension

pytest.importorskip("triton")
from tests.helpers import run_fake_driver_check  # noqa: E402

CHECK = pathlib.Path(__file__).resolve().parent / "cpp_launch_check.py"
ENTRY_CHECK = pathlib.Path(__file__).resolve().parent / "cpp_entry_check.py"
HAS_STEP = _extension.has_ops() and hasattr(_extension._EXT, "itc_step")


@pytest.mark.skipif(not HAS_STEP, reason="C++ extension not built")
def test_cpp_step_passes_the_python_paths_parameters():
    result = run_fake_driver_check(CHECK)
    assert result == {"cases": 6, "launches": 13}


@pytest.mark.skipif(not HAS_STEP, reason="C++ extension not built")
def test_cpp_entry_takes_only_calls_the_python_path_has_taken():
    result = run_fake_driver_check(ENTRY_CHECK)
    per_backend = 2 if hasattr(torch.backends.cuda.matmul, "fp32_precision") else 0  # torch 2.9 on
    assert result == {"variations": 17 + per_backend, "declined": 15}


def test_cpp_step_is_the_default_unless_turned_off(monkeypatch):
    """On where direct launches are (a compiled Triton) and the extension has the step; off with
    ALBEF_FAST_LAUNCH=direct or jit."""
    from albef_fast.kernels import cpp_launch, launch

    monkeypatch.setattr(launch, "direct_launch_enabled", lambda: True)
    monkeypatch.delenv("ALBEF_FAST_LAUNCH", raising=False)
    assert cpp_launch.enabled() == HAS_STEP
    monkeypatch.setenv("ALBEF_FAST_LAUNCH", "cpp")
    assert cpp_launch.enabled() == HAS_STEP
    for off in ("direct", "jit"):
        monkeypatch.setenv("ALBEF_FAST_LAUNCH", off)
        assert not cpp_launch.enabled()
    monkeypatch.delenv("ALBEF_FAST_LAUNCH")
    monkeypatch.setattr(launch, "direct_launch_enabled", lambda: False)  # the interpreter
    assert not cpp_launch.enabled()


@pytest.mark.skipif(not HAS_STEP, reason="C++ extension not built")
def test_unknown_plan_is_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="plan"):
        _extension._EXT.itc_step(10 ** 9, x, x, None, x, x, x.t(), x.t(), None, None, 1.0, 0.4)


def _cpp_on(monkeypatch):
    """ALBEF_FAST_LAUNCH=cpp for this test. Returns (taken, hits): whether each call of the C++ step
    (from the Python path) launched, and how many itc_loss calls the C++ entry took whole."""
    from albef_fast import functional, itc_op
    from albef_fast.kernels import cpp_launch, itc

    taken, hits = [], []
    entry = cpp_launch.entry()

    def counted_step(inputs):
        outputs = cpp_launch.step(inputs)
        taken.append(outputs is not None)
        return outputs

    def counted_entry(*args):
        out = entry(*args)
        hits.extend([] if out is None else [1])
        return out

    monkeypatch.setattr(itc, "CPP", cpp_launch)
    monkeypatch.setitem(itc_op.CPP_STEPS, "triton", counted_step)
    monkeypatch.setattr(functional, "CPP_ENTRY", counted_entry)
    return taken, hits


def _cuda_inputs(dtype, retrieval, b=64, q=4096, d=256):
    """Features [B, D], [D, Q] queue views as ALBEF stores them, ids or None."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def feat(n):
        return torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1).to(dtype)

    feats = [feat(b) for _ in range(4)]
    queues = [feat(q).t(), feat(q).t()]
    idx = torch.randint(0, 50, (b,), device="cuda", generator=g) if retrieval else None
    idq = torch.randint(0, 50, (q,), device="cuda", generator=g) if retrieval else None
    return feats, queues, idx, idq


NEEDS_GPU = pytest.mark.skipif(not (HAS_STEP and torch.cuda.is_available()), reason="needs a GPU")


@NEEDS_GPU
@pytest.mark.parametrize("dtype, temp_kind, retrieval, precision", [(torch.bfloat16, "tensor", False, None),
                                                                     (torch.float32, "float", True, None),
                                                                     (torch.float32, "tensor", False, "high")])
def test_cpp_step_matches_the_python_path_on_cuda(monkeypatch, dtype, temp_kind, retrieval, precision):
    """Same bits (loss, gradients, sims) from the three paths: the Python path, the C++ step, the
    C++ entry; bf16, fp32 "highest" (f16x3) and "high" (f16s: the TF32 rows of the benchmark)."""
    import albef_fast

    taken, hits = _cpp_on(monkeypatch)
    (img, txt, img_m, txt_m), (img_q, txt_q), idx, idq = _cuda_inputs(dtype, retrieval)

    def run():
        a, t = img.detach().requires_grad_(True), txt.detach().requires_grad_(True)
        temp = torch.tensor(0.07, device="cuda", requires_grad=True) if temp_kind == "tensor" else 0.07
        out = albef_fast.itc_loss(a, t, img_m, txt_m, img_q, txt_q, temp, 0.4, idx=idx, idx_queue=idq,
                                  return_details=True, backend="triton", precision=precision)
        (out.loss * -2.0).backward()
        grads = [a.grad, t.grad] + ([temp.grad] if temp_kind == "tensor" else [])
        return [out.loss, out.sim_i2t_batch, out.ce_i2t, out.kl_t2i] + grads

    python = run()  # records and registers the plan
    cpp = run()
    entry = run()
    # the first call's plan was new; the second went through the C++ step, the third through the entry
    assert (taken, hits) == ([False, True], [1])
    for x, y, z in zip(python, cpp, entry):
        assert torch.equal(x, y) and torch.equal(x, z)


@NEEDS_GPU
def test_cpp_step_replays_from_a_cuda_graph(monkeypatch):
    """Captured (launches on the capture stream, allocations from its pool), a replay gives the
    eager C++ step's bits."""
    import albef_fast
    from albef_fast.bench.cases import graphed

    taken, hits = _cpp_on(monkeypatch)
    (img, txt, img_m, txt_m), (img_q, txt_q), _, _ = _cuda_inputs(torch.bfloat16, False, q=8192)
    last = []

    def stepper():
        # fresh leaves, and only detached outputs kept: an autograd graph (and its AccumulateGrad
        # nodes) kept alive from the default stream into the capture breaks it (H200, torch 2.11:
        # "operation would make the legacy stream depend on a capturing blocking stream")
        a, t = img.detach().requires_grad_(True), txt.detach().requires_grad_(True)
        temp = torch.tensor(0.07, device="cuda", requires_grad=True)

        def step():
            out = albef_fast.itc_loss(a, t, img_m, txt_m, img_q, txt_q, temp, 0.4, return_details=True,
                                      backend="triton")
            out.loss.backward()
            last[:] = [out.loss.detach(), out.sim_i2t_batch.detach(), out.kl_t2i.detach()]
        return step

    step = stepper()
    step()  # records the plan
    step()  # the C++ step, teaching the entry
    step()  # the entry
    eager = [x.clone() for x in last]
    replay = graphed(stepper(), torch.device("cuda"))
    replay()
    torch.cuda.synchronize()
    assert taken == [False, True] and len(hits) >= 3  # warm-up and capture went through the entry
    for x, y in zip(eager, last):
        assert torch.equal(x, y)

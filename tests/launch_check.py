"""Direct launches (kernels/launch.py) against JITFunction.run, with no GPU.

    python tests/launch_check.py   ->  one JSON line: {"cases": N, "kernels": K}

A fake Triton driver compiles the kernels for sm_90 for real and records each launcher call
(which compiled kernel, grid, stream, every argument) instead of launching. Every launch of the
fused ITC forward is issued twice, through the direct path and then through JITFunction.run
with the same arguments; from the second forward on (cache hits), the two recorded calls must
agree exactly: the direct path picks the kernel Triton's binder would (alignment, ints == 1 or
divisible by 16, dtypes) and passes it the arguments Triton would. Run by tests/test_launch.py
in a child process without TRITON_INTERPRET.
"""
import json
import os
import sys

import torch

os.environ["ALBEF_FAST_LAUNCH"] = "direct"  # the Python launches are under test (the C++ step: cpp_launch_check)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests import fake_driver  # noqa: E402
from tests.fake_driver import CALLS  # noqa: E402


def _inputs(b, q, d, dtype, offset, queue_dtype):
    """Features [B, D] (starting `offset` elements into their storage: misaligned if odd) and queues [D, Q]."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(b * d + offset, generator=g).to(dtype)[offset:].view(b, d) for _ in range(4)]
    queues = [torch.randn(d, q, generator=g).to(queue_dtype or dtype) for _ in range(2)]
    return feats, queues


def _forward(itc, feats, queues, temp, retrieval):
    b, q = feats[0].shape[0], queues[0].shape[1]
    idx = torch.arange(b) % 3 if retrieval else None
    idx_queue = torch.arange(q) % 3 if retrieval else None
    CALLS.clear()
    itc.itc_triton(*feats, *queues, temp, 0.4, idx, idx_queue, True, True, "high")
    return list(CALLS)


def _issue_both(prepared_cls):
    """Make every prepared launch go directly, then again through JITFunction.run."""
    call = prepared_cls.__call__

    def both(self, *args):
        for direct in (True, False):
            self.launcher._direct = direct
            call(self, *args)
        self.launcher._direct = True

    prepared_cls.__call__ = both


def main():
    fake_driver.install()
    from kernels import itc, launch

    _issue_both(launch.PreparedLaunch)
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = [  # (B, Q, D, dtype, feature offset, retrieval, queue dtype, ALBEF_FAST_TF32): each differs
        # from the one before in what Triton specializes on: the features' alignment, B divisible by
        # 16, Q == 1, dtypes, the queue's dtype alone; then the converted operands (f16p: 3 launches)
        (8, 40, 32, bf16, 0, False, None, "f16s"), (8, 40, 32, bf16, 1, False, None, "f16s"),
        (16, 40, 32, bf16, 0, False, None, "f16s"), (16, 1, 32, bf16, 0, False, None, "f16s"),
        (16, 1, 32, fp32, 0, True, None, "f16s"), (16, 1, 32, fp32, 0, True, bf16, "f16s"),
        (5, 33, 24, fp32, 3, False, None, "f16s"), (5, 33, 24, fp32, 0, True, None, "f16p"),
        (5, 33, 24, fp32, 0, True, None, "f16s+finish-kernel"),  # ALBEF_FAST_FINISH=kernel: 3 launches
    ]
    temp = torch.tensor(0.07)
    for case in cases:
        b, q, d, dtype, offset, retrieval, queue_dtype, mode = case
        os.environ["ALBEF_FAST_TF32"], _, finish = mode.partition("+finish-")
        os.environ["ALBEF_FAST_FINISH"] = finish or "merge"
        feats, queues = _inputs(b, q, d, dtype, offset, queue_dtype)
        _forward(itc, feats, queues, temp, retrieval)  # compiles (the direct path falls back to JIT)
        calls = _forward(itc, feats, queues, temp, retrieval)
        assert len(calls) == (6 if mode == "f16p" or finish else 4), case
        for direct, jit in zip(calls[0::2], calls[1::2]):
            assert direct == jit, (case, direct, jit)
    kernels = sum(len(launcher._kernels) for launcher in itc._LAUNCH.values())
    print(json.dumps({"cases": len(cases), "kernels": kernels}))


if __name__ == "__main__":
    main()

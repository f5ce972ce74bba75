"""The Triton kernels compile for a Hopper GPU (sm_90) on this GPU-less machine.

The interpreter runs the kernels' arithmetic but not the compiler, whose type and layout rules
are stricter; compiling ahead of time for sm_90 (Triton's own ptxas, no driver needed) catches
what would otherwise only fail on a GPU. The compile runs in a child process without
TRITON_INTERPRET (tests/triton_aot.py).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
AOT = pathlib.Path(__file__).resolve().parent / "triton_aot.py"


@pytest.mark.parametrize("flags", ["bf16", "bf16-kind-axis", "tf32-retrieval", "tf32-logits-t", "fp32-nograd",
                                   "f16s-retrieval", "f16s-kind-axis", "f16s-as-is", "f16x3-retrieval", "f16p-retrieval",
                                   "f16x3p-retrieval"])
def test_kernels_compile_for_sm90(flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(AOT), flags], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    kernels = ("split", "merge", "merge-stages", "merge-warps", "finish", "scale")
    for kernel in kernels + (("keys",) if flags.startswith(("f16p", "f16x3p")) else ()):
        shared, cubin = result[kernel]
        assert cubin > 1000, kernel
        assert shared <= 227 * 1024, (kernel, shared)  # fits Hopper's shared memory per block

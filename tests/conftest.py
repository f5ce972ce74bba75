import os

import torch

# The Triton kernels run on the CPU under the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The Python launches under test (on a GPU the C++ step is the default): tests/test_cpp_launch.py
# turns the C++ step on per test and checks it against them bit for bit.
os.environ.setdefault("ALBEF_FAST_LAUNCH", "direct")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

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


def _boolean_masks_only() -> None:
    """Under the interpreter, every load and store mask must hold booleans, as Triton 3.9's
    interpreter requires (earlier ones take an int32 block, such as `&` of a mask with a
    broadcast scalar comparison makes there): so a suite run with an earlier Triton fails where
    3.9's would (kernels/itc_split.py:_only_if)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return

    def checked(method):
        def wrapper(self, ptrs, *args):
            mask = args[0] if method.__name__ == "create_masked_load" else args[1]
            if mask.data.dtype != np.bool_:
                raise ValueError(f"{method.__name__}: mask of dtype {mask.data.dtype}, not bool")
            return method(self, ptrs, *args)
        return wrapper

    for name in ("create_masked_load", "create_masked_store"):  # (ptrs, mask, ...), (ptrs, value, mask, ...)
        if hasattr(InterpreterBuilder, name):
            setattr(InterpreterBuilder, name, checked(getattr(InterpreterBuilder, name)))


_boolean_masks_only()

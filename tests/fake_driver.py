"""A Triton driver for a machine without a GPU: kernels compile for sm_90 for real (Triton's own
ptxas), launches only record their arguments. Used to check the direct launch path
(tests/launch_check.py) and to time the host side of a step (benchmarks/host_step.py)."""
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

CALLS = []  # (launcher id, function, grid, stream, args): tensors as (address, dtype)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads): a module that is not None, else
        CompiledKernel loads it again (and makes a new launcher) on every call."""
        return object(), name, 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class _RecordingLauncher:
    def __init__(self, src, metadata):
        pass

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        # tensors by address and dtype (the real launcher, too, reads each tensor's data_ptr())
        args = tuple((a.data_ptr(), str(a.dtype)) if isinstance(a, torch.Tensor) else a for a in args)
        CALLS.append((id(self), function, (gx, gy, gz), stream, args))
        del CALLS[:-64]


class FakeDriver:
    utils = _Utils()
    launcher_cls = _RecordingLauncher

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_active_torch_device(self):
        return torch.device("cpu")


def install() -> None:
    driver.set_active(FakeDriver())

"""The torch backend at ALBEF's shapes (Q = 65536, D = 256) without a GPU: its extra memory
against SPEC's budget and the ops it issues (its host time on a GPU), on meta tensors. The
numerics are in test_itc_loss.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from albef_fast import itc_op, streaming
from tests.memory_peak import PeakBytes

Q, D = 65536, 256
BUDGET_MIB = {64: 32, 512: 64}  # SPEC section 6: extra memory at B = 64 and B = 512
CASES = ["pretrain", "retrieval", "bf16_queue", "bf16", "alpha0", "no_grad"]


def _meta_call(b: int, case: str):
    """A call of the torch backend on meta tensors, and its inputs."""
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    queue_dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    feats = [torch.empty(b, D, device="meta", dtype=dtype) for _ in range(4)]
    queues = [torch.empty(D, Q, device="meta", dtype=queue_dtype) for _ in range(2)]
    temp = torch.empty((), device="meta")
    ids = [torch.empty(b, device="meta", dtype=torch.long), torch.empty(Q, device="meta", dtype=torch.long)]
    ids = ids if case == "retrieval" else [None, None]
    alpha, grad = (0.0 if case == "alpha0" else 0.4), case != "no_grad"
    inputs = (*feats, *queues, temp)
    return (lambda: itc_op._torch_backend(*inputs, alpha, *ids, False, grad, "highest")), inputs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("b", sorted(BUDGET_MIB))
def test_extra_memory_within_budget(b, case):
    call, inputs = _meta_call(b, case)
    with PeakBytes(*inputs) as peak:
        outputs = call()
        del outputs
    assert peak.peak <= BUDGET_MIB[b] << 20, f"{peak.peak / 2**20:.1f} MiB"
    assert peak.live < 1 << 10  # nothing kept but the coefficient table


def test_peak_counter_sees_scratch():
    """The counter itself: a 4 MiB temporary counts, the inputs do not."""
    x = torch.empty(1 << 20, device="meta")
    with PeakBytes(x) as peak:
        y = x * 2
        del y
        z = x + 1  # reuses nothing: 4 MiB again, not 8 at once
    assert peak.peak == 4 << 20 and peak.live == 4 << 20
    del z


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


# Ops a call dispatches (views included), measured at session 7's change with ~10% headroom: the
# online-softmax version before it dispatched 268 and 884 (its key blocks held 16 MiB, and each
# rescaled the running states: 12 kernels a block, against 6 now).
MAX_OPS = {64: 180, 512: 270}


@pytest.mark.parametrize("b", sorted(MAX_OPS))
def test_ops_per_call(b):
    """On a GPU this path is host bound (each op costs the host ~10-30 us to issue): keep the
    number of ops down. B = 64 streams the queue in 2 chunks, B = 512 in 7."""
    call, _ = _meta_call(b, "pretrain")
    call()  # the coefficient table is made once per device
    with _OpCount() as count:
        call()
    assert count.ops <= MAX_OPS[b]


def test_chunk_rule():
    rows64, rows512 = streaming._Rows(64, 128, 0, 0), streaming._Rows(512, 1024, 0, 0)
    cuda = torch.device("cuda")
    # B = 64: 512 B of block and 128 KiB of partials a key chunk
    assert streaming._chunk_for(cuda, Q, rows64, 128 * 4, (256 + 128 * D) * 4) == 32768
    assert streaming._chunk_for(cuda, Q, rows512, 1024 * 4, (2048 + 1024 * D) * 4) == 9472  # 7 chunks
    assert streaming._chunk_for(torch.device("cpu"), Q, rows64, 512, 1 << 17) == streaming.DEFAULT_CHUNK["cpu"]
    # nothing fits: the width with the least scratch (block + partials)
    width = streaming._fewest_chunks(Q, 1 << 20, 4096, 1 << 20)
    scratch = lambda w: w * 4096 + (-(-Q // w) + 1) * (1 << 20)  # noqa: E731
    assert all(scratch(width) <= scratch(w) for w in range(256, Q + 1, 256))

"""benchmarks/queue_read_probe.py: its kernel reads every element of each program's tiles, so the
time it reports is that of the split kernel's reads of the queues."""
import pytest
import torch

pytest.importorskip("triton")
from benchmarks import queue_read_probe as probe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,block_n,reads,q,interleaved", [
    (torch.float32, 16, 2, 100, False),   # 7 tiles over 3 splits, the last one partial
    (torch.float32, 32, 1, 100, False),   # 4 tiles over 3 splits: the last split has none
    (torch.bfloat16, 32, 2, 70, False),
    (torch.float32, 16, 2, 100, True),    # tiles s, s + 3, s + 6 of 7
    (torch.float32, 64, 1, 100, True),    # 2 tiles over 3 splits: the last split has none
])
def test_each_program_gives_the_max_of_its_tiles(dtype, block_n, reads, q, interleaved):
    d, splits = 20, 3  # D not a power of two: masked rows
    img = torch.randn(d, q + 7, device=DEVICE)[:, :q].to(dtype)  # a [D, Q] view with its own row stride
    txt = torch.randn(d, q + 7, device=DEVICE)[:, :q].to(dtype)
    out = probe.read_max(img, txt, block_n, reads, splits, interleaved=interleaved).cpu()
    tiles = -(-q // block_n)
    per = -(-tiles // splits)  # tiles per split, contiguous
    for direction, queue in enumerate((txt, img)):  # i2t (direction 0) reads the text queue
        for s in range(splits):
            mine = range(s, tiles, splits) if interleaved else range(s * per, min((s + 1) * per, tiles))
            keys = torch.cat([queue[:, t * block_n:(t + 1) * block_n] for t in mine] or [queue[:, :0]], 1).float()
            expected = keys.amax().cpu() if keys.numel() else torch.tensor(float("-inf"))
            assert torch.equal(out[direction, s], expected.expand(reads)), (direction, s)


def test_case_specs_parse():
    assert probe.parse_case("bf16,64,1,8,3") == (torch.bfloat16, 64, 1, 8, 3, False)
    assert probe.parse_case("fp32,32,2,4,3,1") == (torch.float32, 32, 2, 4, 3, True)
    assert all(probe.parse_case(spec) for spec in probe.CASES.split(";"))

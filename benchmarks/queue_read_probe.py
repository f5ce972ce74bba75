"""How fast the split kernel's reads of the queues alone can go: a kernel that only streams them.

    python benchmarks/queue_read_probe.py [--batch 64] [--queue 65536] [--dim 256] [--cases ...]

The split kernel (kernels/itc_split.py) reads ALBEF's [D, Q] queues in [D, BLOCK_N] tiles: D runs
of BLOCK_N contiguous keys, Q elements apart (128 B a run for fp32 tiles of 32 keys), each program
a contiguous range of tiles, the student and teacher programs of a split (KIND_AXIS = 1)
neighbours in launch order, so that the second read may come from L2. This probe launches the
same grid over the same tiles (both directions, pipelined as the configs are) with nothing but a
running max per program, and prints its median time (do_bench, L2 flushed) and the bytes read per
second, beside the card's copy bandwidth (albef_fast.bench.measure.ceilings). A split kernel that
takes about as long as its reads here is bound by this access pattern; one that takes much
longer, by its own chain of work per tile (benchmarks/NOTES.md, session 13).

A case is "dtype,BLOCK_N,reads,warps,stages[,interleaved]": reads 2 = the student / teacher pair
per split, 1 = one program per split; the split count gives WAVES programs per SM either way.
interleaved 1: split s takes tiles s, s + S, s + 2 S, ... instead of a contiguous range, so that
the programs running at once read neighbouring tiles (128 B runs side by side in each row of the
queue) rather than ranges ~4 KB apart: if that reads faster, the split kernel could take its tiles
so (any fixed assignment is as deterministic).
"""
from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from albef_fast.kernels.itc_operands import _load_keys

# bf16's 32-key tiles read 64 B runs (fp32's: 128 B), as many runs as fp32 in 83% of its time in
# H200 run 7: do 128 B runs (64 keys) or neighbouring programs reading the other halves
# (interleaved) read them faster? (session 18)
CASES = "fp32,32,2,4,3;fp32,32,1,4,3;fp32,32,2,4,3,1;fp32,64,2,8,3;bf16,32,2,4,4;bf16,64,2,4,4;bf16,32,2,4,4,1"


@triton.jit
def _queue_read_kernel(
    # pointers
    img_queue_ptr, txt_queue_ptr, out_ptr,
    # strides and shapes
    stride_qd, stride_qj, Q, D, NUM_SPLITS,
    # constexpr
    READS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """grid (READS, NUM_SPLITS, 2 directions): out[pid] = max of its tiles of one queue [D, Q]."""
    read, pid_s, direction = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    queue_ptr = tl.where(direction == 0, txt_queue_ptr, img_queue_ptr)
    tiles = tl.cdiv(Q, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    if INTERLEAVED:  # tiles pid_s, pid_s + S, ...
        t_begin, t_end = 0, tl.cdiv(tiles - pid_s, NUM_SPLITS)
    else:  # the split kernel's: a contiguous range
        t_begin = pid_s * per_split
        t_end = tl.minimum(t_begin + per_split, tiles)
    d = tl.arange(0, BLOCK_D)
    acc = tl.full([BLOCK_D, BLOCK_N], float("-inf"), tl.float32)
    for i in tl.range(t_begin, t_end, num_stages=STAGES):  # loads in flight, as the split kernel's
        t = pid_s + i * NUM_SPLITS if INTERLEAVED else i
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        tile = _load_keys(queue_ptr, stride_qd, stride_qj, d, j, D, Q)  # the split kernel's tile load
        acc = tl.maximum(acc, tl.where((d[:, None] < D) & (j[None, :] < Q), tile.to(tl.float32), float("-inf")))
    tl.store(out_ptr + (direction * NUM_SPLITS + pid_s) * READS + read, tl.max(tl.max(acc, 1), 0))


def parse_case(spec: str):
    dtype, block_n, reads, warps, stages, *interleaved = spec.split(",")
    return ({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], int(block_n), int(reads), int(warps), int(stages),
            bool(int(interleaved[0])) if interleaved else False)


def read_max(img_queue: torch.Tensor, txt_queue: torch.Tensor, block_n: int, reads: int, splits: int,
             warps: int = 4, stages: int = 2, interleaved: bool = False) -> torch.Tensor:
    """out [2, splits, reads]: the max of each program's tiles (direction 0 reads txt_queue, as i2t does)."""
    d, q = img_queue.shape
    out = torch.empty((2, splits, reads), device=img_queue.device, dtype=torch.float32)
    _queue_read_kernel[(reads, splits, 2)](img_queue, txt_queue, out, img_queue.stride(0), img_queue.stride(1), q, d,
                                           splits, READS=reads, BLOCK_N=block_n,
                                           BLOCK_D=triton.next_power_of_2(d), STAGES=stages, INTERLEAVED=interleaved,
                                           num_warps=warps,
                                           num_stages=stages)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--waves", type=float, default=2.0, help="programs per SM (the B = 64 configs': 2)")
    p.add_argument("--cases", default=CASES, help=f"';'-separated dtype,BLOCK_N,reads,warps,stages (default {CASES})")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    from albef_fast.bench.measure import ceilings, device_name, time_ms

    dev = torch.device(args.device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    print(f"{device_name(dev)}; Q={args.queue} D={args.dim}; copy {ceilings(dev)['copy_gbps']:.0f} GB/s")
    queues = [torch.randn(args.dim, args.queue, device=dev) for _ in range(2)]
    ms = time_ms(lambda: [queue.amax() for queue in queues], dev, reps=20)[0]  # contiguous reads, torch's reduction
    _row("torch amax, both fp32 queues", None, ms, 2 * queues[0].numel() * 4)
    for spec in args.cases.split(";"):
        dtype, block_n, reads, warps, stages, interleaved = parse_case(spec)
        img_queue = torch.randn(args.dim, args.queue, device=dev).to(dtype)
        txt_queue = torch.randn(args.dim, args.queue, device=dev).to(dtype)
        splits = max(1, math.ceil(args.waves * sms / (2 * reads)))
        out = read_max(img_queue, txt_queue, block_n, reads, splits, warps, stages, interleaved)
        expected = torch.stack([txt_queue.float().amax(), img_queue.float().amax()])
        if not torch.equal(out.amax(dim=(1, 2)), expected):
            raise SystemExit(f"{spec}: the probe's max {out.amax(dim=(1, 2)).tolist()} != {expected.tolist()}")
        ms = time_ms(lambda: read_max(img_queue, txt_queue, block_n, reads, splits, warps, stages, interleaved), dev,
                     reps=20)[0]
        _row(spec, splits, ms, 2 * reads * img_queue.numel() * img_queue.element_size())


def _row(name: str, splits, ms: float, moved: int) -> None:
    split_text = f"splits {splits:4d}" if splits else " " * 11
    print(f"  {name:30s} {split_text}  {ms * 1e3:8.1f} us  {moved / 2**20:6.0f} MiB read  {moved / ms / 1e6:7.0f} GB/s",
          flush=True)


if __name__ == "__main__":
    main()

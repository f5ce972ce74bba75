"""Seeds of tests/test_random_configs.py's draw past the ones the suite runs (the interpreter, one
core): a kernel change wants a few hundred of them (benchmarks/NOTES.md, sessions 20-23).

    python tests/random_search.py START STOP [--seconds S] [--large]

Prints "ok SEED SECONDS" or "FAIL SEED CASE ERROR" per seed. --large redraws the shapes (B 17-70,
Q 64-513, D 64-160: several row blocks, splits and D blocks; 5-400 s a seed) and keeps the rest
of the seed's draw.
"""
import argparse
import os
import random
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from _pytest.monkeypatch import MonkeyPatch  # noqa: E402

from tests import test_random_configs as random_configs  # noqa: E402

_small_draw = random_configs._draw


def _large_draw(seed: int) -> dict:
    case, rnd = _small_draw(seed), random.Random(seed + 10**6)
    case.update(b=rnd.choice([17, 33, 64, 70]), q=rnd.choice([64, 129, 300, 513]), d=rnd.choice([64, 100, 160]))
    return case


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("start", type=int)
    parser.add_argument("stop", type=int)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.large:
        random_configs._draw = _large_draw
    deadline, failed = time.time() + args.seconds, 0
    for seed in range(args.start, args.stop):
        if time.time() > deadline:
            print("deadline at", seed)
            break
        patch, start = MonkeyPatch(), time.time()
        try:
            random_configs.test_random_call_matches_the_oracle(patch, seed)
            print("ok", seed, round(time.time() - start, 1), flush=True)
        except Exception as err:  # noqa: BLE001  (every failure is reported, the search goes on)
            failed += 1
            print("FAIL", seed, random_configs._draw(seed), repr(err)[:400], flush=True)
        finally:
            patch.undo()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where f16x3p (f16x3's pairs converted first) leaves the fp32 rule on a GPU: one case per call.

    python benchmarks/converted_pairs_probe.py CONFIG B Q D RETRIEVAL

Prints the errors against fp64 (loss, d image_feat, d temp) of eager fp32, f16x3 and f16x3p with
the config forced. H100 run 2 of session 8: f16x3p at B = 64, Q = 4001, D = 200 with retrieval
and its tuned B = 64 config put the loss 2.9e-3 from fp64 (eager 1e-7); f16x3 there passed, and
under the interpreter the two agree to the bit. Run several cases in parallel processes.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import albef_fast  # noqa: E402
from albef_fast import reference  # noqa: E402
from tests.helpers import make_inputs, max_err  # noqa: E402


def _errors(x, loss_fn, exact, dtype=torch.float32):
    args = [t.to(dtype) for t in (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue,
                                  x.text_queue)]
    a = args[0].clone().requires_grad_(True)
    temp = torch.tensor(0.07, device=a.device, dtype=dtype, requires_grad=True)
    loss = loss_fn(a, *args[1:], temp)
    grads = torch.autograd.grad(loss * 1.3, (a, temp))
    if exact is None:
        return loss.double(), [g.double() for g in grads]
    return [max_err(loss.double(), exact[0])] + [max_err(g.double(), e) for g, e in zip(grads, exact[1])]


def main():
    config, b, q, d, retrieval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs(b, q, d, torch.float32, device, retrieval=retrieval)
    ids = dict(idx=x.idx, idx_queue=x.idx_queue) if retrieval else {}
    eager = lambda *a: reference.itc_loss(*a[:6], a[6], 0.4, **ids)  # noqa: E731
    exact = _errors(x, eager, None, torch.float64)
    rows = [("eager", _errors(x, eager, exact))]
    os.environ["ALBEF_FAST_CONFIG"] = config
    fast = lambda *a: albef_fast.itc_loss(*a[:6], a[6], 0.4, backend="triton", precision="highest", **ids)  # noqa: E731
    for mode in ("f16x3", "f16x3p"):
        os.environ["ALBEF_FAST_FP32_DOT"] = mode
        rows.append((mode, _errors(x, fast, exact)))
    for name, errs in rows:
        print(f"{config} B={b} Q={q} D={d} retrieval={int(retrieval)} {name:7s} loss {errs[0]:.2e} "
              f"grad {errs[1]:.2e} temp {errs[2]:.2e}", flush=True)


if __name__ == "__main__":
    main()

"""pytest-benchmark suite on the CPU (not part of `make test`): `pytest benchmarks/ --benchmark-only`.

Same setup factory and providers as the CLI (albef_fast.bench.cases); the CLI is the place for
timing claims (median, peak memory, CSV); this suite tracks regressions between commits.
"""
import pytest
import torch

import albef_fast
from albef_fast import reference
from albef_fast.bench import cases

SHAPE = dict(b=64, q=16384, d=256)  # a quarter of ALBEF's queue keeps a round under a second


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    return cases.ITCCase(SHAPE["b"], SHAPE["q"], SHAPE["d"], "fp32", torch.device("cpu"))


@pytest.mark.parametrize("provider", ["eager", "albef_fast"])
@pytest.mark.parametrize("mode", cases.MODES)
def test_itc(benchmark, case, provider, mode):
    benchmark.group = f"itc {mode} B={case.b} Q={case.q} D={case.d}"
    benchmark(cases.step_fn(case, provider, mode))


@pytest.fixture(scope="module")
def params():
    shapes = cases.albef_param_shapes()[:120]  # ViT-B/16's share of ALBEF's tensors
    return [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]


@pytest.mark.parametrize("provider", ["albef_loop", "foreach_lerp", "albef_fast"])
def test_ema(benchmark, params, provider):
    benchmark.group = "ema"
    params_m, params_ = params
    fns = {"albef_loop": lambda: reference.ema_update_(params_m, params_, 0.995),
           "foreach_lerp": lambda: torch._foreach_lerp_(params_m, params_, 0.005),
           "albef_fast": lambda: albef_fast.ema_update_(params_m, params_, 0.995)}
    benchmark(fns[provider])

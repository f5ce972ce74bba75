"""MomentumUpdater and ITCLoss under a real DeepSpeed engine, on the CPU (gloo). Not collected by
pytest: DeepSpeed is not among the test requirements (its CPU accelerator compiles a C++ op at
init); tests/test_state.py checks the same logic on parameters set up as ZeRO-3 leaves them.

    python tests/deepspeed_check.py ema STAGE [in_forward]  ->  one JSON line (run per rank for 2
                                            ranks: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT)
    python tests/deepspeed_check.py temp STAGE [clamp]

ema: MomentumUpdater over 3 steps (ZeRO-3: gathered by the updater), its error against the EMA
of the gathered values per step, and whether ema_update_ refuses partitioned parameters. temp: 4 steps that drive T below 0.001 with a [1] temperature; the stored T per
step, with or without the master-copy clamp of the README. Checked with DeepSpeed 0.19.8 and
torch 2.13 (CPU) in session 30 (benchmarks/NOTES.md).
"""
import json
import os
import sys
import warnings

import torch

for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
    os.environ.setdefault(key, value)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")
import deepspeed  # noqa: E402

import albef_fast  # noqa: E402
from albef_fast import ITCLoss, MomentumUpdater  # noqa: E402


def _config(stage: int, **optimizer) -> dict:
    return {"train_batch_size": 4 * int(os.environ["WORLD_SIZE"]), "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
            "optimizer": {"type": "SGD", "params": dict(lr=0.1, **optimizer)}}


def _gathered(params):
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def check_ema(stage: int, in_forward: bool) -> dict:
    """3 steps; the momentum update after each step, or first thing in the forward (ALBEF's
    place); copy_params() before initialize, as ALBEF's constructor calls it. Against the EMA of
    the gathered values just before each update; the step whose update raised, if one did; and
    ema_update_'s refusal at ZeRO-3."""
    torch.manual_seed(0)
    enc, enc_m = (torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8)) for _ in range(2))
    updater = MomentumUpdater([(enc, enc_m)], momentum=0.5)
    updater.copy_params()
    model = torch.nn.ModuleDict(dict(enc=enc, enc_m=enc_m))

    def forward(x):
        if in_forward:
            updater.update()
        return enc(x).pow(2).mean() + enc_m(x).sum() * 0
    model.forward = forward
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(enc.parameters()), config=_config(stage))
    params, params_m = list(enc.parameters()), list(enc_m.parameters())
    errors, raised = [], None

    def ema_now():
        return [m * 0.5 + p * 0.5 for m, p in zip(_gathered(params_m), _gathered(params))]

    def error(expected):
        return max((a - b).abs().max().item() for a, b in zip(_gathered(params_m), expected))

    for step in range(3):
        expected = ema_now()  # what the in-forward update must give
        try:
            loss = engine(torch.randn(4, 512))
        except RuntimeError as err:  # ZeRO-3's prefetch inside the forward (MomentumUpdater's own error)
            raised = f"step {step}: {str(err)[:60]}"
            break
        engine.backward(loss)
        if in_forward:
            errors.append(error(expected))
        engine.step()
        if not in_forward:
            expected = ema_now()
            updater.update()
            errors.append(error(expected))
    try:
        albef_fast.ema_update_(params_m, params, 0.5)
        refused = None
    except RuntimeError as err:
        refused = str(err)[:60]
    return {"stage": stage, "in_forward": in_forward, "ema_err_per_step": errors, "update_raised": raised,
            "ema_update_refused": refused}


def check_temp(stage: int, clamp: bool) -> dict:
    torch.manual_seed(0)
    proj, itc = torch.nn.Linear(16, 16), ITCLoss(16, 32, temp=0.45)
    itc.temp = torch.nn.Parameter(itc.temp.detach().reshape(1))  # DeepSpeed takes no 0-dim parameter
    model = torch.nn.ModuleDict(dict(proj=proj, itc=itc))

    def forward(a, b):
        fa, fb = torch.nn.functional.normalize(proj(a), dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return itc(fa, fb, fa.detach(), fb, alpha=0.0).loss
    model.forward = forward
    config = _config(stage, maximize=True)
    config["optimizer"]["params"]["lr"] = 5.0  # T falls past 0.001 in one step
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    temps, losses = [], []
    for _ in range(4):
        loss = engine(a, b)
        engine.backward(loss)
        engine.step()
        if clamp and stage > 0:
            master = deepspeed.utils.safe_get_full_fp32_param(itc.temp)
            deepspeed.utils.safe_set_full_fp32_param(itc.temp, master.clamp(0.001, 0.5))
        temps.append(_gathered([itc.temp])[0].item())
        losses.append(loss.item())
    return {"stage": stage, "clamp": clamp, "stored_temp": temps, "loss": losses}


if __name__ == "__main__":
    what, stage = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    if what == "ema":
        result = check_ema(stage, "in_forward" in sys.argv[3:])
    else:
        result = check_temp(stage, "clamp" in sys.argv[3:])
    print(json.dumps(result))

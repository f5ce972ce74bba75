"""The Lightning callback, with a real Lightning Trainer on the CPU (AlphaRamp: test_schedules.py)."""
import pickle

import pytest
import torch
from torch import nn
from torch.nn.functional import normalize

import albef_fast

pl = pytest.importorskip("pytorch_lightning")
from albef_fast.integrations.lightning import ALBEFCallback  # noqa: E402


class DualEncoder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_enc, self.image_enc_m = nn.Linear(6, 8), nn.Linear(6, 8)
        self.text_enc, self.text_enc_m = nn.Linear(5, 8), nn.Linear(5, 8)
        self.model_pairs = [(self.image_enc, self.image_enc_m), (self.text_enc, self.text_enc_m)]
        self.itc = albef_fast.ITCLoss(embed_dim=8, queue_size=16)
        self.alphas = []

    def training_step(self, batch, batch_idx):
        image, text = batch
        with torch.no_grad():
            image_m, text_m = normalize(self.image_enc_m(image), dim=-1), normalize(self.text_enc_m(text), dim=-1)
        out = self.itc(normalize(self.image_enc(image), dim=-1), normalize(self.text_enc(text), dim=-1), image_m, text_m)
        self.alphas.append(self.itc.alpha)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(torch.randn(24, 6, generator=g), torch.randn(24, 5, generator=g))


def test_lightning_callback_runs_momentum_update_and_alpha_ramp():
    model = DualEncoder()
    loader = torch.utils.data.DataLoader(_data(), batch_size=4)  # 6 batches an epoch
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ALBEFCallback(momentum=0.9, alpha=0.4)])
    trainer.fit(model, loader)
    assert model.alphas == pytest.approx([0.4 * min(1.0, s / 6) for s in range(12)])
    assert not any(p.requires_grad for p in model.image_enc_m.parameters())

    manual = DualEncoder()  # the same training by hand, as ALBEF's loop does it
    updater = albef_fast.MomentumUpdater(manual.model_pairs, momentum=0.9)
    updater.copy_params()
    optimizer = manual.configure_optimizers()
    ramp, step = albef_fast.AlphaRamp(0.4, 6), 0
    for _ in range(2):
        for batch in loader:
            manual.itc.alpha = ramp(step)
            updater.update()
            manual.training_step(batch, step).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    for got, expected in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.itc.image_queue, manual.itc.image_queue)
    assert not torch.equal(model.image_enc_m.weight, model.image_enc.weight)  # the EMA lags the model


@pytest.mark.parametrize("kwargs,name", [(dict(momentum=1.5), "momentum"), (dict(alpha=1.4), "alpha"),
                                         (dict(warmup_steps=0), "warmup_steps"), (dict(momentum="0.9"), "momentum")])
def test_lightning_callback_checks_its_arguments_before_fit(kwargs, name):
    """At construction: fit would copy the online weights into the momentum models first."""
    with pytest.raises((ValueError, TypeError), match=name):
        ALBEFCallback(**kwargs)


class _Stream(torch.utils.data.IterableDataset):
    """The data as batches from an iterator without len(): Lightning's epoch length is inf."""

    def __iter__(self):
        data = _data()
        return (data[i : i + 4] for i in range(0, 24, 4))


@pytest.mark.parametrize("warmup_steps", [None, 3])
def test_lightning_callback_on_a_dataset_without_length(warmup_steps):
    """No epoch length to ramp over: warmup_steps is asked for by name (was math.ceil's
    OverflowError); given, the ramp runs as usual."""
    model = DualEncoder()
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ALBEFCallback(momentum=0.9, alpha=0.4, warmup_steps=warmup_steps)])
    loader = torch.utils.data.DataLoader(_Stream(), batch_size=None)
    if warmup_steps is None:
        with pytest.raises(ValueError, match="warmup_steps: required where the epoch length is unknown"):
            trainer.fit(model, loader)
    else:
        trainer.fit(model, loader)
        assert model.alphas == pytest.approx([0.4 * min(1.0, s / 3) for s in range(5)])


def test_lightning_callback_names_a_module_without_model_pairs():
    """Was the AttributeError of the default's lambda."""
    model = DualEncoder()
    del model.model_pairs
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ALBEFCallback()])
    with pytest.raises(ValueError, match="model_pairs: DualEncoder has no model_pairs attribute"):
        trainer.fit(model, torch.utils.data.DataLoader(_data(), batch_size=4))


def test_lightning_callback_keeps_the_restored_momentum_models_on_resume(tmp_path):
    """A fit resumed from a checkpoint: the momentum models are the checkpoint's (copy_params()
    in on_fit_start wrote the online weights over them until session 28), still frozen, and the
    resumed step is the uninterrupted run's bit for bit (the step after an epoch's end: Lightning
    restarts a loader that is not resumable at its first batch, which that step reads anyway)."""
    def trainer(steps):
        return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          callbacks=[ALBEFCallback(momentum=0.9, alpha=0.4)])

    loader = lambda: torch.utils.data.DataLoader(_data(), batch_size=4)  # noqa: E731  (6 batches an epoch)
    straight = DualEncoder()
    trainer(7).fit(straight, loader())
    first, ckpt = DualEncoder(), str(tmp_path / "epoch0.ckpt")
    run = trainer(6)
    run.fit(first, loader())
    run.save_checkpoint(ckpt)
    resumed = DualEncoder()
    trainer(7).fit(resumed, loader(), ckpt_path=ckpt)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert not any(p.requires_grad for p in resumed.image_enc_m.parameters())


class _SavingDualEncoder(DualEncoder):
    """Writes each rank's state and the momentum models' requires_grad where training ends."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self):
        frozen = not any(p.requires_grad for p in self.image_enc_m.parameters())
        torch.save({"state": self.state_dict(), "frozen": frozen}, f"{self.out_dir}/rank{self.global_rank}.pt")


def test_lightning_callback_under_ddp(tmp_path):
    """Lightning's DDP strategy, 2 CPU processes: the momentum models are frozen before DDP wraps
    the module (frozen in on_fit_start, after the wrap, they were parameters DDP waited on for
    gradients: an error at the second step until session 28); both ranks end with one state."""
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ALBEFCallback(momentum=0.9, alpha=0.4)])
    trainer.fit(_SavingDualEncoder(str(tmp_path)), torch.utils.data.DataLoader(_data(), batch_size=4))
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert all(r["frozen"] for r in ranks)
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    assert ranks[0]["state"]["itc.queue_ptr"].item() == 3 * 2 * 4 % 16  # 3 steps of 2 ranks x 4 rows


def test_lightning_callback_copies_once_per_module():
    """A second fit of the same module keeps its EMA; a fit of another module with the same
    callback copies that module's weights (a sweep reusing the callback). The fits after the first
    run no step (max_steps=0): what they leave is what setup did."""
    def fit(model, steps):
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(model, torch.utils.data.DataLoader(_data(), batch_size=4))

    callback = ALBEFCallback(momentum=0.9, alpha=0.4)
    first, second = DualEncoder(), DualEncoder()
    fit(first, 2)
    ema = first.image_enc_m.weight.detach().clone()
    assert not torch.equal(ema, first.image_enc.weight)  # the EMA lags the model
    fit(first, 0)
    assert torch.equal(first.image_enc_m.weight, ema)
    fit(second, 0)
    assert torch.equal(second.image_enc_m.weight, second.image_enc.weight)
    assert pickle.loads(pickle.dumps(callback))._copied_into is None  # as ddp_spawn sends it

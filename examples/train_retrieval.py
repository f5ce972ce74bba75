"""Train a small image-text dual encoder with albef_fast on scikit-learn's digits.

Real data that ships with a registry package: the 1797 8x8 handwritten digits of
sklearn.datasets.load_digits, each paired with a generated caption naming its digit
("a handwritten seven", "the number 7", ...). The training step is ALBEF's: momentum encoders
updated by EMA (MomentumUpdater), momentum features as teacher and queue keys, ITCLoss with
retrieval targets (idx = the digit, so captions of the same digit are positives), alpha ramped
over the first epoch (AlphaRamp). Reports image-to-text recall@1 on held-out images before and
after training (a caption counts as correct when it names the image's digit; chance is 10%).

    python examples/train_retrieval.py --epochs 15
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from torch import nn
from torch.nn.functional import normalize

import albef_fast

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten {w}", "the digit {w}", "a picture of the number {w}", "{w} written by hand",
             "an image showing a {d}", "the number {d}", "a scanned {w}", "digit {d}"]


def make_data(seed: int = 0):
    """(images [N, 64] in [0, 1], token ids [N, L], labels [N], vocabulary size)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    captions = [rng.choice(TEMPLATES).format(w=WORDS[y], d=y).split() for y in digits.target]
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for c in captions for w in c}))}  # 0 pads
    length = max(map(len, captions))
    tokens = torch.zeros(len(captions), length, dtype=torch.long)
    for i, caption in enumerate(captions):
        tokens[i, : len(caption)] = torch.tensor([vocab[w] for w in caption])
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return images, tokens, torch.tensor(digits.target), len(vocab) + 1


class DualEncoder(nn.Module):
    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, dim))
        self.embed = nn.EmbeddingBag(vocab, 64, mode="mean", padding_idx=0)
        self.text = nn.Sequential(nn.GELU(), nn.Linear(64, dim))

    def forward(self, images, tokens):
        return normalize(self.image(images), dim=-1), normalize(self.text(self.embed(tokens)), dim=-1)


@torch.no_grad()
def recall_at_1(model: DualEncoder, images, tokens, labels) -> float:
    """Image -> text: the nearest caption names the image's digit."""
    image_feat, text_feat = model(images, tokens)
    best = (image_feat @ text_feat.T).argmax(dim=1)
    return (labels[best] == labels).float().mean().item()


def train(epochs: int = 15, batch: int = 64, queue_size: int = 512, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    images, tokens, labels, vocab = make_data(seed)
    perm = torch.randperm(len(labels))
    test, fit = perm[:297], perm[297:]
    model = DualEncoder(vocab)
    model_m = copy.deepcopy(model)
    momentum = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.995)
    momentum.copy_params()
    itc = albef_fast.ITCLoss(embed_dim=32, queue_size=queue_size, temp=0.07, use_idx=True)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(itc.parameters()), lr=3e-3, weight_decay=0.02)
    steps_per_epoch = len(fit) // batch
    ramp = albef_fast.AlphaRamp(0.4, steps_per_epoch)
    before = recall_at_1(model, images[test], tokens[test], labels[test])
    log(f"image-to-text recall@1 before training: {before:.3f} (chance 0.100)")
    step, start = 0, time.time()
    for epoch in range(epochs):
        order = fit[torch.randperm(len(fit))]
        for i in range(steps_per_epoch):  # drop_last: every step enqueues a full batch
            rows = order[i * batch:(i + 1) * batch]
            momentum.update()
            with torch.no_grad():
                image_m, text_m = model_m(images[rows], tokens[rows])
            image_feat, text_feat = model(images[rows], tokens[rows])
            out = itc(image_feat, text_feat, image_m, text_m, alpha=ramp(step), idx=labels[rows])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            step += 1
        log(f"epoch {epoch + 1}: loss {out.loss.item():.3f} (ce {out.ce_i2t.item():.3f}, "
            f"kl {out.kl_i2t.item():.3f}), temp {itc.temp.item():.3f}")
    after = recall_at_1(model, images[test], tokens[test], labels[test])
    log(f"image-to-text recall@1 after {epochs} epochs ({time.time() - start:.1f} s): {after:.3f}")
    return {"before": before, "after": after, "steps": step}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(epochs=args.epochs, seed=args.seed)

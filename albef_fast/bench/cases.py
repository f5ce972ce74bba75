"""The benchmark's shared setup factory and providers (eager ALBEF, torch.compile(ALBEF), albef_fast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import albef_fast
from albef_fast import reference

# precision name -> (feature/queue dtype, torch float32 matmul precision)
PRECISIONS = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"), "bf16": (torch.bfloat16, "highest")}
PROVIDERS = ("eager", "compile", "albef_fast", "eager[graph]", "albef_fast[graph]")
MODES = ("fwd", "fwd+bwd")
SWEEP_DEFAULT = [64, 256, 512, 1024]


@dataclass
class ITCCase:
    """Inputs of one ALBEF ITC step: features [B, D] (normalized), queues [D, Q], temp Parameter."""

    b: int
    q: int
    d: int
    precision: str
    device: torch.device

    def __post_init__(self):
        dtype = PRECISIONS[self.precision][0]
        feat = lambda: F.normalize(torch.randn(self.b, self.d, device=self.device), dim=-1).to(dtype)  # noqa: E731
        queue = lambda: F.normalize(torch.randn(self.d, self.q, device=self.device), dim=0).to(dtype)  # noqa: E731
        self.image_feat, self.text_feat, self.image_feat_m, self.text_feat_m = feat(), feat(), feat(), feat()
        self.image_queue, self.text_queue = queue(), queue()
        self.temp = torch.nn.Parameter(torch.tensor(0.07, device=self.device))

    def flops(self, mode: str) -> float:
        """Minimum work: student and teacher logits (+ d q for backward), both directions."""
        products = 2 if mode == "fwd" else 3
        return 2 * products * 2.0 * self.b * (self.b + self.q) * self.d

    def bytes(self) -> float:
        """Minimum traffic: each queue read once (features are negligible next to it)."""
        return 2.0 * self.d * self.q * self.image_queue.element_size()


def _loss_fn(provider: str) -> Callable:
    if provider == "eager":
        return reference.itc_loss
    if provider == "compile":
        return torch.compile(reference.itc_loss, dynamic=False)
    return albef_fast.itc_loss


_COMPILED: Dict[str, Callable] = {}


def step_fn(case: ITCCase, provider: str, mode: str) -> Callable[[], object]:
    """A closure running one forward (and backward) of the provider on the case. "<provider>[graph]"
    replays the step captured in a CUDA graph: the device time without the host's launch cost."""
    if provider.endswith("[graph]"):
        return graphed(step_fn(case, provider[: -len("[graph]")], mode), case.device)
    fn = _COMPILED.setdefault(provider, _loss_fn(provider))
    backward = mode == "fwd+bwd"

    def step():
        a = case.image_feat.detach().requires_grad_(backward)
        b = case.text_feat.detach().requires_grad_(backward)
        loss = fn(a, b, case.image_feat_m, case.text_feat_m, case.image_queue, case.text_queue, case.temp, 0.4)
        if backward:
            loss.backward()
        return loss

    return step


def graphed(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture one call of step in a CUDA graph (after warm-up on a side stream, as capture
    requires) and return its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def albef_param_shapes():
    """ALBEF's momentum-updated parameters: ViT-B/16, vision_proj, BERT-base with 6 fusion
    (cross-attention) layers, text_proj: 411 tensors, about 209M parameters."""
    d, mlp = 768, 3072
    ln = [(d,), (d,)]
    vit = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    vit += (ln + [(3 * d, d), (3 * d,), (d, d), (d,)] + ln + [(mlp, d), (mlp,), (d, mlp), (d,)]) * 12 + ln
    proj = [(256, d), (256,)]
    self_attn = [(d, d), (d,)] * 3 + [(d, d), (d,)] + ln
    ffn = [(mlp, d), (mlp,), (d, mlp), (d,)] + ln
    bert = [(30522, d), (512, d), (2, d)] + ln
    bert += (self_attn + ffn) * 6 + (self_attn + self_attn + ffn) * 6
    return vit + proj + bert + proj

"""Low-rank weight offsets on the denoiser's attention projections (the tuning encoder's LoRA), as ComfyUI weight
wrappers that stay differentiable."""

from __future__ import annotations

import re

from torch import Tensor
from torch.nn import Module

ATTENTION_PROJECTIONS = {  # the tuning encoder's LoRA targets, by option
    "attention q/k/v/out": ("attn1", "attn2"), "attention q/k/v": ("attn1", "attn2"), "cross-attention k/v": ("attn2",),
}
PROJECTION = re.compile(r"(?:^|\.)(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")  # a BasicTransformerBlock's


class Offsets:
    """The weight offsets' current factors, shared by their wrappers: replacing a factor (pretraining predicts new
    ones for every image) needs no reload, and `enabled` turns them all off for the dual path's reference pass."""

    def __init__(self) -> None:
        self.enabled = True
        self.scale = 1.0
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # weight key → (up [out, r], down [r, in])


class LoraDelta:
    """A weight wrapper: W + scale·up@down (docs/COMFYUI.md §2.5), differentiable in up and down."""

    def __init__(self, key: str, offsets: Offsets):
        self.key, self.offsets = key, offsets

    def __call__(self, weight: Tensor) -> Tensor:
        factors = self.offsets.factors.get(self.key)
        if not self.offsets.enabled or factors is None:
            return weight
        up, down = factors
        return weight + (self.offsets.scale * (up @ down)).to(weight)


def attention_targets(diffusion_model: Module, kind: str) -> list[tuple[str, int, int]]:
    """The projections of `kind` as (weight key, out, in)."""
    if kind not in ATTENTION_PROJECTIONS:
        raise ValueError(f"targets must be one of {', '.join(ATTENTION_PROJECTIONS)}, got {kind!r}.")
    projections = {"to_k", "to_v"} if kind == "cross-attention k/v" else {"to_q", "to_k", "to_v"}
    if kind == "attention q/k/v/out":
        projections.add("to_out.0")
    targets = []
    for name, module in diffusion_model.named_modules():
        found = PROJECTION.search(name)
        if found and found.group(1) in ATTENTION_PROJECTIONS[kind] and found.group(2) in projections:
            out_features, in_features = module.weight.shape
            targets.append((f"diffusion_model.{name}.weight", int(out_features), int(in_features)))
    return targets

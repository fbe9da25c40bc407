"""CatVersion (Zhao et al., arXiv 2311.14631; docs/METHODS.md §5; official code RoyZhao926/CatVersion).

The concept is a residual in the text encoder's "feature-dense" space: for each of the last self-attention layers
feeding the UNet, learned key and value vectors are concatenated to K and V after their projections (per head),
so every token can attend to them. Only those vectors train — 3 layers × 1 token × (key, value) × 768 = 4608
numbers on SD 1.5 — and the training prompt is the bare class word. The layers count back from the layer whose
output conditions the UNet, so CLIP skip and SDXL's penultimate layer move them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..concept import Arch, Concept, Method, cpu_float
from ..host import Host

Residuals = dict[str, dict[int, tuple[Tensor, Tensor]]]  # encoder key → layer → (keys [t, d], values [t, d])


@dataclass(frozen=True)
class Options:
    learning_rate: float = 5e-3  # per sample; × batch (official base_lr with scale_lr: 1e-2 at batch 2)
    steps: int = 1000            # max_steps 1001 in the official config
    flip_p: float = 0.5          # the official data loader flips
    num_layers: int = 3          # the last three self-attention layers (9, 10, 11 of SD 1.5's twelve)
    tokens: int = 1              # residual key/value tokens per layer (official prefix_length = 1)
    mask_bias: float = 0.0       # logit bias of the residual keys; 1 reproduces the official code's quirk
    init_scale: float = 1.0      # residuals start as N(0, init_scale²); the official code uses randn
    weight_decay: float = 1e-2   # torch AdamW's default, as the official configure_optimizers


def patched_layers(cond_layer: int, num_layers: int) -> list[int]:
    """The `num_layers` layers ending at the conditioning layer (0-based): SD 1.5 → [9, 10, 11]."""
    if not 1 <= num_layers <= cond_layer + 1:
        raise ValueError(f"num_layers must be between 1 and {cond_layer + 1} (the conditioning layer is "
                         f"{cond_layer}), got {num_layers}.")
    return list(range(cond_layer - num_layers + 1, cond_layer + 1))


def training_prompts(prompts: Sequence[str], per_image: bool, class_word: str) -> list[str]:
    """CatVersion trains on the bare class word; captions keep their text with the class word in the slot."""
    if per_image:
        return [p.replace("{}", class_word) for p in prompts]
    return [class_word]


def tensor_key(encoder: str, layer: int, part: str) -> str:
    return f"catversion.{encoder}.{layer}.{part}"


def residuals_of(concept: Concept) -> Residuals:
    """The (keys, values) per encoder and layer of a CatVersion concept, from its tensors."""
    out: Residuals = {}
    for key, layers in concept.state["layers"].items():
        out[key] = {int(i): (concept.tensors[tensor_key(key, i, "keys")], concept.tensors[tensor_key(key, i, "values")])
                    for i in layers}
    return out


class CatVersion:
    name: Method = "catversion"

    def __init__(self, host: Host, class_word: str, options: Options = Options(), seed: int = 0):
        if not class_word.strip():
            raise ValueError("init_word is empty; CatVersion needs the class word ('dog', 'teapot') as its prompt.")
        self.options, self.class_word = options, class_word.strip()
        g = torch.Generator().manual_seed(seed)
        self.residuals: Residuals = {}
        for key, encoder in host.encoders.items():
            self.residuals[key] = {
                i: tuple(torch.nn.Parameter((torch.randn(options.tokens, encoder.width, generator=g) *
                                             options.init_scale).to(host.device)) for _ in range(2))  # type: ignore[misc]
                for i in patched_layers(encoder.cond_layer, options.num_layers)}
        host.patch_self_attention(self.residuals, options.mask_bias)

    def vectors(self) -> dict[str, Tensor]:
        return {}  # no token: the residual acts on every token of the prompt

    def parameters(self) -> list[Tensor]:
        return [t for layers in self.residuals.values() for pair in layers.values() for t in pair]

    def regularizer(self) -> Tensor | None:
        return None

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=self.options.weight_decay)

    def report(self) -> list[str]:
        layers = ", ".join(f"clip_{k} layers {min(v)}–{max(v)}" for k, v in self.residuals.items())
        count = sum(t.numel() for t in self.parameters())
        return [f"Residual keys and values on {layers}: {count} numbers trained. Prompt with the class word "
                f"'{self.class_word}' through CatVersion Residual."]

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        o = self.options
        tensors = {tensor_key(k, i, part): cpu_float(t) for k, layers in self.residuals.items()
                   for i, pair in layers.items() for part, t in zip(("keys", "values"), pair, strict=True)}
        state = {"layers": {k: sorted(v) for k, v in self.residuals.items()}, "tokens": o.tokens,
                 "mask_bias": o.mask_bias, "class_word": self.class_word, "init_scale": o.init_scale}
        return Concept(name=name, method="catversion", arch=arch, vectors={}, state=state, tensors=tensors,
                       provenance=dict(provenance))


def build(host: Host, init_word: str, num_vectors: int, options: Options, seed: int = 0) -> CatVersion:
    if num_vectors:
        raise ValueError("vectors must be 0 for CatVersion: it learns residual keys and values, not token vectors.")
    return CatVersion(host, init_word, options, seed)

"""Textual Inversion (Gal et al. 2022, arXiv 2208.01618; docs/METHODS.md §2).

The new token vectors are the only parameters: the vocabulary table never gets a gradient (official TI passes
only the placeholder to AdamW; diffusers instead trains the whole table and restores the other rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..concept import ENCODER_NAMES, Arch, Concept, Method, cpu_float
from ..host import Host
from .base import init_vectors


@dataclass(frozen=True)
class Options:
    learning_rate: float = 5e-3  # per sample; the loop scales it by batch × accumulation (official TI, §2b/e)
    steps: int = 3000            # the diffusers README for SD; the paper trained 5000
    weight_decay: float = 1e-2   # AdamW's, in official TI and diffusers
    flip_p: float = 0.5          # horizontal flips, official TI and diffusers


class TextualInversion:
    name: Method = "ti"

    def __init__(self, init: Mapping[str, Tensor], options: Options = Options()):
        self.options = options
        self._vectors = {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in init.items()}

    def vectors(self) -> dict[str, Tensor]:
        return dict(self._vectors)

    def parameters(self) -> list[Tensor]:
        return list(self._vectors.values())

    def regularizer(self) -> Tensor | None:
        return None

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=self.options.weight_decay)

    def report(self) -> list[str]:
        norms = ", ".join(f"{float(n):.3f} ({ENCODER_NAMES[k]})" for k, v in self._vectors.items()
                          for n in v.detach().norm(dim=-1))
        return [f"Vector norms: {norms}."]

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        return Concept(name=name, method="ti", arch=arch, vectors={k: cpu_float(v) for k, v in self._vectors.items()},
                       provenance=dict(provenance))


def build(host: Host, init_word: str, num_vectors: int, options: Options, seed: int = 0) -> TextualInversion:
    """TI starts from the init word's rows; nothing random, so `seed` is unused."""
    return TextualInversion(init_vectors(host, init_word, num_vectors), options)

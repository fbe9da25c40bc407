"""Tuning a tuning encoder's prediction for ≤ 12 steps (docs/METHODS.md §6): the token embedding and the LoRA offsets.

The parameters start at the encoder's prediction — or, without encoder weights, at the class word's rows and
zero offsets (up = 0, down random, as LoRA initialises), which makes this a fast LoRA + embedding tuner. The
offsets act on the UNet through the host's differentiable weight wrappers. Two parts of DATE (docs/METHODS.md §6.2)
can each be switched off for ablation: the dual path (`blend` < 1: every attention branch of the UNet is
blend·(soft embedding, W + ΔW) + (1 − blend)·(nearest hard token, W)) and the nearest-token contrastive term
(`contrastive` > 0). Choices the paper does not report (learning rate, blend, weights, targets) are this pack's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from ..concept import Arch, Concept, Method, cpu_float
from ..host import Host
from ..tuning_encoder import CONTRASTIVE_K, CONTRASTIVE_TEMPERATURE, check_mechanisms, contrastive_loss, hard_rows
from .base import init_vectors

# Steps the tuner needs without encoder weights, at its defaults: toy world, the pairs kept out of pretraining and the
# benchmark (bench/toyworld/spot_check.py --encoder none, one seed): identity 0.69 / 0.83 / 0.90 after 100 / 400 /
# 1000 steps, the asked size 1.00 / 0.71 / 0.59 and position 1.00 / 0.97 / 0.54 — likeness by 100, and past 400 the
# prompt loses its say; on the benchmark's concepts 12 steps reach 0.09 (README)
NO_WEIGHTS_NEED = "up to 100 steps (fewer were not measured), not 12"
# The tuning rate per step from a pretrained encoder's prediction, chosen on the toy world's pairs kept out of both
# pretraining and the benchmark (bench/toyworld/spot_check.py, 12 steps, 144 images): identity 0.55 / 0.62 / 0.72
# and the asked size obeyed 0.99 / 0.90 / 0.83 at 1e-3 / 3e-3 / 1e-2. Options.learning_rate stays the no-weights
# default.
PRETRAINED_LEARNING_RATE = 1e-2
# Samples a tuning step when the images are captioned, chosen on the same held-out pairs (12 steps, 3 seeds): identity
# 0.63 / 0.76 / 0.88 / 0.84 with 1 / 4 / 8 / 16 (README). Uncaptioned, more samples than images trade the prompt's
# position and size for likeness (8: identity 0.81 but position 0.69), so the default there is one per image.
CAPTIONED_SAMPLES = 8
Targets = Literal["attention q/k/v/out", "attention q/k/v", "cross-attention k/v"]


@dataclass(frozen=True)
class Options:
    learning_rate: float = 1e-3   # per step, without encoder weights (the paper's tuning lr is not reported)
    steps: int = 12               # "12 or fewer training steps" (DATE, Fig. 1)
    flip_p: float = 0.0           # one image: its flip would be a second concept view the paper does not use
    rank: int = 4                 # LoRA rank without encoder weights (with them, the encoder's rank)
    targets: Targets = "attention q/k/v/out"  # the default; E4T offsets q/k/v only
    blend: float = 0.8            # α of the dual path; 1 = off (the paper's α is not reported; README: how chosen)
    offset_penalty: float = 1e-4  # λ·‖e − E[class]‖², E4T's tuning-time default
    contrastive: float = 0.01     # weight of the nearest-token contrastive term; 0 = off (this pack's, not the paper's)
    contrastive_k: int = CONTRASTIVE_K                        # its positives: the k nearest vocabulary rows
    contrastive_temperature: float = CONTRASTIVE_TEMPERATURE  # its τ
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_mechanisms(self.blend, self.contrastive, self.contrastive_k, self.contrastive_temperature)


def samples_per_step(batch_size: int, images: int, captioned: bool) -> int:
    """The samples of one tuning step: `batch_size`, or (0) `CAPTIONED_SAMPLES` when the images are captioned and
    one per image otherwise."""
    return batch_size or (max(images, CAPTIONED_SAMPLES) if captioned else images)


def passes_per_step(samples: int, images: int) -> tuple[int, int]:
    """(samples per pass, passes): a step's samples run as passes over the images whose gradients are averaged, so
    memory stays that of one image set (8 samples at once at 1024 px would not fit most cards)."""
    per_pass = min(samples, images)
    return per_pass, -(-samples // per_pass)


def lora_key(weight_key: str) -> str:
    """`diffusion_model.<module>.weight` → the stock LoRA prefix `diffusion_model.<module>` (ComfyUI reads it)."""
    return weight_key.removesuffix(".weight")


class TunedPrediction:
    """The tuning encoder's tunable state: embeddings per encoder and (up, down) per target layer."""

    name: Method = "tuning_encoder"

    def __init__(self, host: Host, class_word: str, class_embeddings: Mapping[str, Tensor],
                 embeddings: Mapping[str, Tensor], targets: Sequence[tuple[str, int, int]], ups: Sequence[Tensor],
                 downs: Sequence[Tensor], options: Options = Options(), encoder: str | None = None):
        self.options, self.class_word, self.encoder = options, class_word, encoder
        self.class_embeddings = {k: v.detach().float().to(host.device) for k, v in class_embeddings.items()}
        self.embeddings = {k: torch.nn.Parameter(v.detach().float().clone().to(host.device))
                           for k, v in embeddings.items()}
        self.targets = list(targets)
        self.ups = [torch.nn.Parameter(u.detach().float().clone().to(host.device)) for u in ups]
        self.downs = [torch.nn.Parameter(d.detach().float().clone().to(host.device)) for d in downs]
        self.rank = self.downs[0].shape[0] if self.downs else options.rank
        host.wrap_unet_weights({key: (up, down) for (key, _, _), up, down in
                                zip(self.targets, self.ups, self.downs, strict=True)}, scale=1.0)
        needs_tables = options.blend < 1 or options.contrastive > 0
        self.tables = {k: host.vocabulary(k) for k in self.embeddings} if needs_tables else {}
        if options.blend < 1:
            host.set_dual_path(options.blend, self.hard_tokens)

    def hard_tokens(self) -> dict[str, Tensor]:
        """The dual path's hard prompt: each embedding row replaced by its nearest vocabulary row."""
        return hard_rows(self.embeddings, self.tables)

    def vectors(self) -> dict[str, Tensor]:
        return dict(self.embeddings)

    def parameters(self) -> list[Tensor]:
        return [*self.embeddings.values(), *self.ups, *self.downs]

    def regularizer(self) -> Tensor | None:
        o, terms = self.options, []
        if o.offset_penalty:
            terms += [o.offset_penalty * ((e - self.class_embeddings[k]) ** 2).sum()
                      for k, e in self.embeddings.items()]
        if o.contrastive:  # each row on its own: the concept's rows are not other concepts to push apart
            terms += [o.contrastive * contrastive_loss(row[None], self.tables[k], o.contrastive_k,
                                                       o.contrastive_temperature) / len(e)
                      for k, e in self.embeddings.items() for row in e]
        return sum(terms) if terms else None  # type: ignore[return-value]

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=self.options.weight_decay)

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The offsets as a stock LoRA file's tensors: W' = W + (alpha / rank)·up@down with alpha = rank."""
        out = {}
        for (key, _, _), up, down in zip(self.targets, self.ups, self.downs, strict=True):
            prefix = lora_key(key)
            out[f"{prefix}.lora_up.weight"] = cpu_float(up)
            out[f"{prefix}.lora_down.weight"] = cpu_float(down)
            out[f"{prefix}.alpha"] = torch.tensor(float(self.rank))
        return out

    def report(self) -> list[str]:
        numbers = sum(u.numel() + d.numel() for u, d in zip(self.ups, self.downs, strict=True))
        start = (f"Started from the encoder {self.encoder}." if self.encoder else
                 f"No encoder weights: started from the class word '{self.class_word}' and zero offsets, so this "
                 f"was a plain LoRA + embedding tuner, which needs {NO_WEIGHTS_NEED}; "
                 "the method's 12 steps are meant to start from pretrained weights (tools/pretrain_encoder.py).")
        return [start, f"LoRA rank {self.rank} on {len(self.targets)} attention projections ({numbers} numbers)."]

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        o = self.options
        state = {"class_word": self.class_word, "rank": self.rank, "targets": o.targets, "layers": len(self.targets),
                 "blend": o.blend, "contrastive": o.contrastive, "contrastive_k": o.contrastive_k,
                 "contrastive_temperature": o.contrastive_temperature, "encoder": self.encoder}
        return Concept(name=name, method="tuning_encoder", arch=arch, state=state, provenance=dict(provenance),
                       vectors={k: cpu_float(v) for k, v in self.embeddings.items()},
                       tensors={f"lora.{k}": v for k, v in self.lora_state_dict().items()})


def build(host: Host, init_word: str, num_vectors: int, options: Options, seed: int = 0) -> TunedPrediction:
    """Without encoder weights: the class word's rows, zero offsets (up = 0) and a seeded random down."""
    class_embeddings = init_vectors(host, init_word, num_vectors)
    targets = host.unet_targets(options.targets)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.zeros(out, options.rank) for _, out, _ in targets]
    downs = [torch.randn(options.rank, i, generator=g) / i ** 0.5 for _, _, i in targets]
    return TunedPrediction(host, init_word.strip(), class_embeddings, class_embeddings, targets, ups, downs, options)

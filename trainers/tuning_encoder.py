"""The domain-agnostic tuning encoder (Arar et al., arXiv 2307.06925, after E4T, arXiv 2302.12228; docs/METHODS.md §6).

From one image of a concept it predicts (1) a token embedding near the class word's and (2) rank-r LoRA offsets
for the UNet's attention projections; a few tuning steps then refine both. No official code or weights exist, so
the architecture below is this pack's reading of the paper, with docs/METHODS.md §6's recommended choices:

- features: the CLIP vision encoder's penultimate hidden states (projected per token, then averaged, as the
  unofficial E4T does) and the UNet encoder's block outputs on the noisy latent (spatially averaged);
- trunk: an MLP over both;
- embedding head: e = E[class word] + s·Δ with s = 0.1 (E4T's `domain_embed_scale`);
- hypernetwork head: per target layer a learned pair (up Bᴸ [out, r], down Aᴸ [r, in]) and a predicted scale
  vector sᴸ ∈ Rʳ, so ΔWᴸ = Bᴸ·diag(sᴸ)·Aᴸ — predicting r numbers per layer keeps the head small.
Both heads start at zero, so an untrained encoder predicts exactly the class word and no offsets.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .atomic import write_safetensors

EMBED_SCALE = 0.1  # E4T's domain_embed_scale: the predicted offset is small next to the class word's row


@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder was built for; stored with its weights so they load only into a matching model.

    Args:
        vision_width (`int`): width of the CLIP vision encoder's hidden states.
        unet_width (`int`): total channels of the UNet input-block outputs used as features.
        text_widths (`Mapping[str, int]`): width of each text encoder's token embedding (`l`, `g`, `h`).
        targets (`Sequence[tuple[str, int, int]]`): the LoRA target layers: (state-dict key, out, in).
        rank (`int`, defaults to 4): rank r of the offsets.
        hidden (`int`, defaults to 256): width of the trunk.
    """

    vision_width: int
    unet_width: int
    text_widths: Mapping[str, int]
    targets: Sequence[tuple[str, int, int]]
    rank: int = 4
    hidden: int = 256

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": [list(t) for t in self.targets]})

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        record = json.loads(text)
        return cls(**{**record, "targets": [tuple(t) for t in record["targets"]]})


@dataclass
class Prediction:
    embeddings: dict[str, Tensor]   # per encoder [B, n, d]
    up: list[Tensor]                # per target [B, out, r]
    down: list[Tensor]              # per target [r, in] (shared by the batch)
    offsets: dict[str, Tensor]      # per encoder [B, d]: the predicted Δ, for its L2 penalty


class TuningEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, seed: int = 0):
        super().__init__()
        self.config = c = config
        with torch.random.fork_rng(devices=[]):  # every initial weight from `seed`, not the global stream
            torch.manual_seed(seed)
            self.vision = nn.Sequential(nn.LayerNorm(c.vision_width), nn.Linear(c.vision_width, c.hidden))
            self.unet = nn.Sequential(nn.LayerNorm(c.unet_width), nn.Linear(c.unet_width, c.hidden))
            self.trunk = nn.Sequential(nn.GELU(), nn.Linear(2 * c.hidden, c.hidden), nn.GELU(),
                                       nn.Linear(c.hidden, c.hidden))
            self.embedding_heads = nn.ModuleDict({k: nn.Linear(c.hidden, w) for k, w in c.text_widths.items()})
            self.scale_head = nn.Linear(c.hidden, len(c.targets) * c.rank)
            self.lora_down = nn.ParameterList(nn.Parameter(torch.randn(c.rank, i) / i ** 0.5) for _, _, i in c.targets)
            self.lora_up = nn.ParameterList(nn.Parameter(torch.randn(o, c.rank) / c.rank ** 0.5)
                                            for _, o, _ in c.targets)
        heads: list[nn.Linear] = [*self.embedding_heads.values(), self.scale_head]  # type: ignore[list-item]
        for head in heads:  # zero heads: an untrained encoder predicts the class word and no offsets
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, vision: Tensor, unet: Tensor, class_embeddings: Mapping[str, Tensor]) -> Prediction:
        """
        Args:
            vision (`Tensor`): [B, T, vision_width] CLIP vision penultimate hidden states.
            unet (`Tensor`): [B, unet_width] spatially averaged UNet input-block outputs.
            class_embeddings (`Mapping[str, Tensor]`): per encoder the class word's rows, [n, d] for the whole
                batch or [B, n, d] per image.
        """
        h = self.trunk(torch.cat([self.vision(vision).mean(dim=1), self.unet(unet)], dim=-1))       # [B, hidden]
        offsets = {k: head(h) for k, head in self.embedding_heads.items()}                           # [B, d]
        embeddings = {k: _batched(class_embeddings[k]) + EMBED_SCALE * offsets[k][:, None] for k in offsets}
        scales = self.scale_head(h).view(len(h), len(self.config.targets), self.config.rank)         # [B, L, r]
        up = [b[None] * scales[:, i, None, :] for i, b in enumerate(self.lora_up)]                  # [B, out, r]
        return Prediction(embeddings, up, list(self.lora_down), offsets)


def _batched(rows: Tensor) -> Tensor:
    return rows if rows.dim() == 3 else rows[None]


def nearest_tokens(embeddings: Tensor, table: Tensor, k: int = 1) -> Tensor:
    """Ids [N, k] of the vocabulary rows most cosine-similar to each of `embeddings` [N, d]."""
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(table.to(embeddings), dim=-1).T
    return similarity.topk(k, dim=-1).indices


def contrastive_loss(embeddings: Tensor, table: Tensor, k: int = 3, temperature: float = 0.07) -> Tensor:
    """The nearest-CLIP-token contrastive term (docs/METHODS.md §6.2, this pack's formula; k and τ are not the paper's).

    For each predicted embedding e_i [N, d]: its k nearest vocabulary rows are positives, the other embeddings of
    the batch negatives; L = −(1/k) Σ_p log[exp(cos(e_i, p)/τ) / (exp(cos(e_i, p)/τ) + Σ_{j≠i} exp(cos(e_i, e_j)/τ))].
    It pulls each embedding toward real words and away from the other concepts; a batch of one gives 0.
    """
    e = F.normalize(embeddings, dim=-1)
    vocabulary = F.normalize(table.to(embeddings), dim=-1)
    with torch.no_grad():
        ids = (e @ vocabulary.T).topk(k, dim=-1).indices                                         # [N, k]
    positives = (e[:, None, :] * vocabulary[ids]).sum(-1) / temperature                           # [N, k]
    pairs = e @ e.T / temperature                                                                 # [N, N]
    others = pairs.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), float("-inf"))
    negatives = torch.logsumexp(others, dim=-1, keepdim=True).expand_as(positives)               # [N, k]
    return -(positives - torch.logaddexp(positives, negatives)).mean()


ENCODER_KEY = "concept_forge_encoder"


def save_encoder(encoder: TuningEncoder, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
                 ) -> Path:
    """Encoder weights as safetensors with the config as JSON metadata, written atomically."""
    return write_safetensors(encoder.state_dict(), path, {**(metadata or {}), ENCODER_KEY: encoder.config.to_json()})


def load_encoder(path: str | os.PathLike[str]) -> TuningEncoder:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if ENCODER_KEY not in metadata:
            raise ValueError(f"{Path(path).name} is not a Concept Forge tuning encoder (no {ENCODER_KEY} metadata).")
        encoder = TuningEncoder(EncoderConfig.from_json(metadata[ENCODER_KEY]))
        encoder.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return encoder


def mismatches(config: EncoderConfig, expected: EncoderConfig) -> list[str]:
    """How an encoder's config differs from what this model needs (widths, LoRA targets)."""
    found = []
    for field in ("vision_width", "unet_width", "text_widths"):
        if getattr(config, field) != getattr(expected, field):
            found.append(f"{field} {getattr(config, field)} (the model needs {getattr(expected, field)})")
    if list(config.targets) != list(expected.targets):
        found.append(f"{len(config.targets)} LoRA targets (the model has {len(expected.targets)} of this kind)")
    return found

"""The domain-agnostic tuning encoder (Arar et al., arXiv 2307.06925, after E4T, arXiv 2302.12228; docs/METHODS.md §6).

From one image of a concept it predicts (1) a token embedding near the class word's and (2) rank-r LoRA offsets
for the UNet's attention projections; a few tuning steps then refine both. No official code or weights exist, so
the architecture below is this pack's reading of the paper, with docs/METHODS.md §6's recommended choices:

- features: the CLIP vision encoder's penultimate hidden states (projected per token, then averaged, as the
  unofficial E4T does) and the UNet encoder's block outputs on the noisy latent (spatially averaged);
- trunk: an MLP over both, giving a feature h per image;
- embedding head: e = E[class word] + s·Δ with s = 0.1 (E4T's `domain_embed_scale`);
- hypernetwork head (`EncoderConfig.hypernetwork`):
  - "offsets" (DATE's hypernetwork; the default): the factors themselves, per image. A shared bottleneck
    c = Linear(h) [code] feeds, per target layer L, upᴸ = head_upᴸ(c) [out, r] and downᴸ = baseᴸ + head_downᴸ(c)
    [r, in], baseᴸ learned; the bottleneck keeps the heads at code·r·(out + in) numbers per layer;
  - "scales" (the ablation, and encoders saved before "offsets" existed): per layer a learned pair (Bᴸ [out, r],
    Aᴸ [r, in]) and a predicted scale vector sᴸ ∈ Rʳ, so ΔWᴸ = Bᴸ·diag(sᴸ)·Aᴸ.
  Either way ΔWᴸ = upᴸ·downᴸ.
All heads start at zero, so an untrained encoder predicts exactly the class word and no offsets.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .atomic import write_safetensors

EMBED_SCALE = 0.1  # E4T's domain_embed_scale: the predicted offset is small next to the class word's row
Hypernetwork = Literal["offsets", "scales"]
HYPERNETWORKS: tuple[Hypernetwork, ...] = ("offsets", "scales")


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
        hypernetwork (`Hypernetwork`, defaults to `"offsets"`): what the hypernetwork head predicts (module
            docstring); files without the field were written by the "scales" encoder and load as such.
        code (`int`, defaults to 64): width of the "offsets" head's shared bottleneck (this pack's choice).
    """

    vision_width: int
    unet_width: int
    text_widths: Mapping[str, int]
    targets: Sequence[tuple[str, int, int]]
    rank: int = 4
    hidden: int = 256
    hypernetwork: Hypernetwork = "offsets"
    code: int = 64

    def __post_init__(self) -> None:
        if self.hypernetwork not in HYPERNETWORKS:
            raise ValueError(f"hypernetwork must be one of {', '.join(HYPERNETWORKS)}, got {self.hypernetwork!r}.")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": [list(t) for t in self.targets]})

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        record = {"hypernetwork": "scales", **json.loads(text)}  # older files: the scales head
        return cls(**{**record, "targets": [tuple(t) for t in record["targets"]]})


@dataclass
class Prediction:
    embeddings: dict[str, Tensor]   # per encoder [B, n, d]
    up: list[Tensor]                # per target [B, out, r]
    down: list[Tensor]              # per target [B, r, in]
    offsets: dict[str, Tensor]      # per encoder [B, d]: the predicted Δ, for its L2 penalty


def _zero(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class TuningEncoder(nn.Module):
    made_for: str | None = None  # the checkpoint it was pretrained on, when its file says
    vision_name: str | None = None  # the CLIP vision model it was pretrained with, when its file says
    vision_signature: list[float] | None = None  # that model's `vision_signature`, when its file has it

    def __init__(self, config: EncoderConfig, seed: int = 0):
        super().__init__()
        self.config = c = config
        with torch.random.fork_rng(devices=[]):  # every initial weight from `seed`, not the global stream
            torch.manual_seed(seed)
            self.vision = nn.Sequential(nn.LayerNorm(c.vision_width), nn.Linear(c.vision_width, c.hidden))
            self.unet = nn.Sequential(nn.LayerNorm(c.unet_width), nn.Linear(c.unet_width, c.hidden))
            self.trunk = nn.Sequential(nn.GELU(), nn.Linear(2 * c.hidden, c.hidden), nn.GELU(),
                                       nn.Linear(c.hidden, c.hidden))
            # zero heads: an untrained encoder predicts the class word and no offsets
            self.embedding_heads = nn.ModuleDict({k: _zero(nn.Linear(c.hidden, w)) for k, w in c.text_widths.items()})
            if c.hypernetwork == "offsets":
                self.bottleneck = nn.Linear(c.hidden, c.code)
                self.up_heads = nn.ModuleList(_zero(nn.Linear(c.code, o * c.rank)) for _, o, _ in c.targets)
                self.down_heads = nn.ModuleList(_zero(nn.Linear(c.code, c.rank * i)) for _, _, i in c.targets)
                self.base_down = nn.ParameterList(nn.Parameter(torch.randn(c.rank, i) / i ** 0.5)
                                                  for _, _, i in c.targets)
            else:
                self.scale_head = _zero(nn.Linear(c.hidden, len(c.targets) * c.rank))
                self.lora_down = nn.ParameterList(nn.Parameter(torch.randn(c.rank, i) / i ** 0.5)
                                                  for _, _, i in c.targets)
                self.lora_up = nn.ParameterList(nn.Parameter(torch.randn(o, c.rank) / c.rank ** 0.5)
                                                for _, o, _ in c.targets)

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
        up, down = self._offset_factors(h) if self.config.hypernetwork == "offsets" else self._scaled_factors(h)
        return Prediction(embeddings, up, down, offsets)

    def _offset_factors(self, h: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per image and layer (up [B, out, r], down [B, r, in]) predicted through the shared bottleneck."""
        code, r = self.bottleneck(h), self.config.rank                                                    # [B, code]
        up = [head(code).view(len(h), -1, r) for head in self.up_heads]
        down = [base + head(code).view(len(h), r, -1) for head, base in zip(self.down_heads, self.base_down,
                                                                              strict=True)]
        return up, down

    def _scaled_factors(self, h: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Learned (B, A) per layer, B's columns scaled per image: up [B, out, r], down (A) expanded to [B, r, in]."""
        scales = self.scale_head(h).view(len(h), len(self.config.targets), self.config.rank)        # [B, L, r]
        up = [b[None] * scales[:, i, None, :] for i, b in enumerate(self.lora_up)]
        down = [a.expand(len(h), -1, -1) for a in self.lora_down]
        return up, down


def _batched(rows: Tensor) -> Tensor:
    return rows if rows.dim() == 3 else rows[None]


CONTRASTIVE_K = 3              # positives per embedding: its nearest vocabulary rows (this pack's choice)
CONTRASTIVE_TEMPERATURE = 0.07  # τ, CLIP's initial temperature (this pack's choice)


def nearest_tokens(embeddings: Tensor, table: Tensor, k: int = 1) -> Tensor:
    """Ids [N, k] of the vocabulary rows most cosine-similar to each of `embeddings` [N, d]."""
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(table.to(embeddings), dim=-1).T
    return similarity.topk(k, dim=-1).indices


def contrastive_loss(embeddings: Tensor, table: Tensor, k: int = CONTRASTIVE_K,
                     temperature: float = CONTRASTIVE_TEMPERATURE,
                     negatives: int | None = None) -> Tensor:
    """The nearest-CLIP-token contrastive term (docs/METHODS.md §6.2, this pack's formula; k, τ and the negatives
    are not the paper's).

    For each predicted embedding e_i of `embeddings` [N, d], P_i = its k nearest rows of `table` [V, d] (cosine,
    found without gradient) are the positives; the negatives are Q_i, the other vocabulary rows (all of them, or
    with `negatives` = n the n most similar, the hardest), and the other embeddings e_j of the batch (other
    concepts):
    L = −(1/(N·k)) Σ_i Σ_{p∈P_i} log[exp(cos(e_i, p)/τ) / (exp(cos(e_i, p)/τ) + Σ_{q∈Q_i} exp(cos(e_i, q)/τ)
                                                            + Σ_{j≠i} exp(cos(e_i, e_j)/τ))].
    It pulls each embedding toward real words — toward its nearest ones rather than any nearby — and away from
    the other concepts; thanks to the vocabulary negatives a batch of one (tuning) has a loss too.
    """
    e = F.normalize(embeddings, dim=-1)
    similarity = e @ F.normalize(table.to(embeddings), dim=-1).T / temperature                    # [N, V]
    with torch.no_grad():
        ids = similarity.topk(k, dim=-1).indices                                                  # [N, k]
    positives = similarity.gather(1, ids)                                                         # [N, k]
    rest = similarity.scatter(1, ids, float("-inf"))                                              # [N, V]
    if negatives is not None:
        rest = rest.topk(min(negatives, rest.shape[1] - k), dim=-1).values                        # [N, n]
    parts = [rest]
    if len(e) > 1:
        pairs = e @ e.T / temperature                                                             # [N, N]
        parts.append(pairs.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), float("-inf")))
    negative = torch.logsumexp(torch.cat(parts, dim=1), dim=-1, keepdim=True).expand_as(positives)  # [N, k]
    return -(positives - torch.logaddexp(positives, negative)).mean()


def hard_rows(vectors: Mapping[str, Tensor], tables: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The dual path's hard prompt: each vector row replaced by its nearest vocabulary row (no gradient)."""
    return {k: tables[k][nearest_tokens(v.detach(), tables[k])[:, 0]].to(v) for k, v in vectors.items()}


def check_mechanisms(blend: float, contrastive: float, k: int = CONTRASTIVE_K,
                     temperature: float = CONTRASTIVE_TEMPERATURE) -> None:
    """The dual path's α is a blend (0..1; 1 = off), the contrastive weight a weight (≥ 0; 0 = off), its k a
    count of positives (1..64) and its τ a temperature (> 0)."""
    if not 0 <= blend <= 1:
        raise ValueError(f"blend (the dual path's α) must be in [0, 1], got {blend}.")
    if not contrastive >= 0:
        raise ValueError(f"contrastive must be at least 0, got {contrastive}.")
    if not (isinstance(k, int) and 1 <= k <= 64):
        raise ValueError(f"contrastive_k must be a whole number from 1 to 64, got {k}.")
    if not temperature > 0:
        raise ValueError(f"contrastive_temperature must be above 0, got {temperature}.")


# -- which CLIP vision model an encoder reads -----------------------------------------------------------------------
# Two vision models can be equally wide (ViT-L/14 and a fine-tuned ViT-L, or two toy towers padded to a ViT-L) and an
# encoder fed another model's features predicts garbage without any error. Its file keeps a signature of the model
# it was pretrained with: the features of a fixed image, projected onto a few fixed directions. The same model in
# another precision gives nearly the same signature (cosine > 0.999); another model an unrelated one.
SIGNATURE_SIZE = 16
SAME_VISION = 0.99  # the least cosine between two signatures of one model


def signature_image(size: int = 64) -> Tensor:
    """The fixed image signatures are computed from: IMAGE [1, size, size, 3] of ramps and stripes in 0..1."""
    ramp = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    return torch.stack([x, y, 0.5 + 0.5 * torch.sin(12 * (x + 2 * y))], dim=-1)[None]


def vision_signature(features: Tensor) -> list[float]:
    """A vision model's signature from its features of `signature_image()` ([1, T, W] penultimate hidden states):
    the mean token projected onto SIGNATURE_SIZE seeded Gaussian directions, unit length."""
    mean = features.detach().float().mean(dim=(0, 1)).cpu()                                          # [W]
    directions = torch.randn(len(mean), SIGNATURE_SIZE, generator=torch.Generator().manual_seed(0))
    return [round(float(v), 6) for v in F.normalize(mean @ directions, dim=0)]


def same_vision(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and float(torch.tensor(a) @ torch.tensor(b)) >= SAME_VISION


ENCODER_KEY = "concept_forge_encoder"
VISION_KEYS = ("clip_vision", "clip_vision_signature")  # metadata: its name and `vision_signature`, as JSON


def save_encoder(encoder: TuningEncoder, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
                 ) -> Path:
    """Encoder weights as safetensors with the config as JSON metadata, written atomically."""
    return write_safetensors(encoder.state_dict(), path, {**(metadata or {}), ENCODER_KEY: encoder.config.to_json()})


def load_encoder(path: str | os.PathLike[str]) -> TuningEncoder:
    """Read an encoder file, or refuse it with a ValueError that says why.

    Files are hostile until parsed: the config must build an encoder whose every tensor the file holds, with the
    same shape (checked on the meta device, so a forged config cannot make us allocate what the file does not
    hold), finite; the optional records must be of their kind.
    """
    name = Path(path).name
    try:
        return _read_encoder(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not a usable Concept Forge tuning encoder: its metadata is not JSON ({e}).") from e
    except Exception as e:
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{name} is not a usable Concept Forge tuning encoder: {reason}") from e


def _read_encoder(path: str | os.PathLike[str]) -> TuningEncoder:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if ENCODER_KEY not in metadata:
            raise ValueError(f"it has no {ENCODER_KEY} metadata.")
        config = EncoderConfig.from_json(metadata[ENCODER_KEY])
        if len(config.targets) > len(f.keys()):  # each target has tensors of its own: a forged count stops here
            raise ValueError("its config names more LoRA targets than it holds tensors.")
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in TuningEncoder(config).state_dict().items()}
        held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if held != shapes:
            raise ValueError("its tensors are not the ones its config describes.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ValueError("its weights are not all finite floating-point numbers.")
    encoder = TuningEncoder(config)
    encoder.load_state_dict(tensors)
    encoder.made_for = _text(metadata, "checkpoint")  # what it was pretrained on, for refusals
    encoder.vision_name = _text(metadata, VISION_KEYS[0])
    if VISION_KEYS[1] in metadata:
        signature = json.loads(metadata[VISION_KEYS[1]])
        if not (isinstance(signature, list) and len(signature) == SIGNATURE_SIZE and
                all(isinstance(v, (int, float)) and math.isfinite(v) for v in signature)):
            raise ValueError(f"its {VISION_KEYS[1]} is not {SIGNATURE_SIZE} numbers.")
        encoder.vision_signature = [float(v) for v in signature]
    return encoder


def _text(metadata: Mapping[str, str], key: str) -> str | None:
    """A name from the metadata, as shown in messages: control characters out, at most 200 characters."""
    value = metadata.get(key)
    return None if value is None else "".join(c for c in value if c.isprintable())[:200]


def vision_metadata(name: str, features: Tensor) -> dict[str, str]:
    """The metadata that records the CLIP vision model an encoder is pretrained with (`load_encoder` reads it)."""
    return {VISION_KEYS[0]: name, VISION_KEYS[1]: json.dumps(vision_signature(features))}


def vision_problem(encoder: TuningEncoder, signature: Sequence[float]) -> str | None:
    """Why the vision model of `signature` is not the one `encoder` was pretrained with, if it is not (files
    without a signature were written before signatures existed and pass)."""
    if encoder.vision_signature is None or same_vision(encoder.vision_signature, signature):
        return None
    named = f", {encoder.vision_name}" if encoder.vision_name else ""
    return f"the CLIP vision model wired to clip_vision is not the one it was pretrained with{named}"


def mismatches(config: EncoderConfig, expected: EncoderConfig) -> list[str]:
    """How an encoder's config differs from what this model needs (widths, LoRA targets)."""
    found = []
    for field in ("vision_width", "unet_width", "text_widths"):
        if getattr(config, field) != getattr(expected, field):
            found.append(f"{field} {getattr(config, field)} (the model needs {getattr(expected, field)})")
    if list(config.targets) != list(expected.targets):
        found.append(f"{len(config.targets)} LoRA targets (the model has {len(expected.targets)} of this kind)")
    return found

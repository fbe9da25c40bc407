"""A `Host` on tiny torch modules: the trainers' test double for ComfyUI's CLIP, MODEL and VAE.

A word-level tokenizer, a small causal transformer per text encoder, a fixed random "VAE" and a small
cross-attention denoiser with SD's noise schedule. Deterministic from a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from concept_forge.trainers.host import TextEncoder
from torch import Tensor

WORDS = ("a photo of the my one clean dirty dark cool close-up bright cropped good nice small weird large "
         "rendering rendition painting picture in style dog cat toy teddy bear red blue on beach").split()
SLOT = object()  # marks the concept's place in a prepared prompt
MAX_LEN = 16


def _words(text: str) -> list[str]:
    return re.findall(r"[\w\-]+|\{\}", text.lower())


class TinyLayer(nn.Module):
    """A pre-norm causal transformer layer whose self-attention can take residual keys and values (CatVersion)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.residual: tuple[Tensor, Tensor, float] | None = None

    def attention(self, x: Tensor) -> Tensor:
        b, length, width = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        mask = torch.full((length, length), float("-inf")).triu(1)
        if self.residual is not None:
            keys, values, bias = self.residual
            k = torch.cat([k, keys.expand(b, -1, -1)], 1)
            v = torch.cat([v, values.expand(b, -1, -1)], 1)
            mask = torch.cat([mask, torch.full((length, len(keys)), bias)], 1)

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, length, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    def __init__(self, width: int, layers: int = 2, heads: int = 2):
        super().__init__()
        self.token_embedding = nn.Embedding(len(WORDS) + 3, width)  # + start, end, unknown
        self.position = nn.Parameter(torch.randn(MAX_LEN, width) * 0.02)
        self.layers = nn.ModuleList(TinyLayer(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, embeds: Tensor) -> Tensor:
        x = embeds + self.position
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


class TinyDenoiser(nn.Module):
    """ε-prediction from (x_t, t, context): a conv stem, one cross-attention, a conv head."""

    def __init__(self, context_dim: int, channels: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(4, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(context_dim, channels)
        self.v = nn.Linear(context_dim, channels)
        self.head = nn.Conv2d(channels, 4, 3, padding=1)
        self.offsets: dict[str, tuple[Tensor, Tensor]] = {}  # "q.weight" … → (up [out, r], down [r, in])

    def project(self, name: str, x: Tensor) -> Tensor:
        """The projection `name` with its weight offset W + up@down, when one is set (the tuning encoder's LoRA)."""
        layer = getattr(self, name)
        up, down = self.offsets.get(f"{name}.weight", (None, None))
        return layer(x) if up is None else F.linear(x, layer.weight + up @ down, layer.bias)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        h = F.silu(self.stem(x) + self.time(t[:, None].float() / 1000)[:, :, None, None])
        b, c, hh, ww = h.shape
        q = self.project("q", h.flatten(2).transpose(1, 2))                     # [B, hw, c]
        attn = F.scaled_dot_product_attention(q, self.project("k", context), self.project("v", context))
        h = h + attn.transpose(1, 2).reshape(b, c, hh, ww)
        return self.head(F.silu(h))


@dataclass
class TinyCond:
    context: Tensor  # [B, MAX_LEN, sum of widths]


class TinyHost:
    """`trainers.host.Host` on tiny modules. `arch` "sd1" has one encoder `l`; "sdxl" has `l` and `g`."""

    num_timesteps = 1000

    def __init__(self, arch: str = "sd1", seed: int = 0, widths: Mapping[str, int] | None = None):
        torch.manual_seed(seed)
        self.arch = arch
        self.device = torch.device("cpu")
        widths = widths or ({"l": 16} if arch == "sd1" else {"l": 16, "g": 24})
        self.text = nn.ModuleDict({k: TinyTextEncoder(w) for k, w in widths.items()})
        self.encoders = {k: TextEncoder(k, w, 2, 1) for k, w in widths.items()}
        self.vae = nn.Conv2d(3, 4, 8, stride=8)
        self.unet = TinyDenoiser(sum(widths.values()))
        for module in (self.text, self.vae, self.unet):
            module.requires_grad_(False).eval()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # SD's scaled-linear schedule
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.encode_calls = 0

    # -- tokens -------------------------------------------------------------------------------------------
    def _id(self, word: str) -> int:
        return WORDS.index(word) + 3 if word in WORDS else 2

    def token_ids(self, key: str, text: str) -> list[int]:
        return [self._id(w) for w in _words(text)]

    def vocabulary(self, key: str) -> Tensor:
        return self.text[key].token_embedding.weight

    def prepare_prompt(self, text: str, num_vectors: int) -> list[Any]:
        return [SLOT if w == "{}" else self._id(w) for w in _words(text)]

    # -- model --------------------------------------------------------------------------------------------
    def patch_self_attention(self, residuals: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
                             mask_bias: float) -> None:
        for key, layers in residuals.items():
            for i, (keys, values) in layers.items():
                self.text[key].layers[i].residual = (keys, values, mask_bias)

    def unet_targets(self, kind: str) -> list[tuple[str, int, int]]:
        """The tiny denoiser's one cross-attention's projections, whatever the kind."""
        return [(f"{name}.weight", *getattr(self.unet, name).weight.shape) for name in ("q", "k", "v")]

    def wrap_unet_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
        self.unet.offsets.update({k: (scale * up, down) for k, (up, down) in offsets.items()})

    def set_dual_path(self, alpha: float, hard_vectors: Any) -> None:
        """Recorded, not run: the tiny denoiser has no attention blocks (the dual path's tests are ComfyUI's)."""
        self.dual_path = (alpha, hard_vectors)

    def encode(self, prompts: Sequence[list[Any]], vectors: Mapping[str, Tensor]) -> TinyCond:
        outs = []
        for key, encoder in self.text.items():
            table = encoder.token_embedding.weight
            rows = []
            for prompt in prompts:
                parts = [table[[0]]]  # start token
                for item in prompt:
                    if item is SLOT:
                        parts.append(vectors[key])
                    else:
                        parts.append(table[[item]])
                seq = torch.cat(parts + [table[[1]]])
                pad = table[[1]].expand(MAX_LEN - len(seq), -1)  # pad with the end token, as CLIP-L does
                rows.append(torch.cat([seq, pad]))
            outs.append(encoder(torch.stack(rows)))
        return TinyCond(torch.cat(outs, dim=-1))

    def encode_images(self, images: Tensor) -> Tensor:
        self.encode_calls += len(images)
        return self.vae(images.permute(0, 3, 1, 2) * 2 - 1)

    def loss(self, latents: Tensor, cond: TinyCond, noise: Tensor, timesteps: Tensor,
             mask: Tensor | None = None) -> Tensor:
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        err = (self.unet(noisy, timesteps, cond.context) - noise) ** 2                # [B, C, h, w]
        if mask is None:
            return err.mean(dim=(1, 2, 3))
        weights = mask[:, None].expand_as(err)
        return (err * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


def tiny_images(n: int = 4, size: int = 32, seed: int = 0) -> Tensor:
    """Images of one 'concept': a bright square on noise, [n, size, size, 3] in 0..1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, size, size, 3, generator=g) * 0.3
    images[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = torch.tensor([0.9, 0.2, 0.1])
    return images

"""The interface the trainers see of a text-to-image model (docs/DESIGN.md, "The host interface").

`nodes/host/` implements it on ComfyUI's CLIP, MODEL and VAE; the unit tests implement it on tiny torch
modules. Everything model-specific — tokenisation, which layer conditions the UNet, sigma versus timestep,
ε- versus v-prediction — stays behind it, so a method and the loop are plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from .concept import Arch, EncoderKey


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of the model.

    Args:
        key (`EncoderKey`): `l` (CLIP-L), `g` (OpenCLIP-bigG) or `h` (OpenCLIP-H).
        width (`int`): the token-embedding width d.
        num_layers (`int`): transformer layers.
        cond_layer (`int`): 0-based index of the layer whose output conditions the UNet (CLIP skip and SDXL's
            penultimate layer move it).
    """

    key: EncoderKey
    width: int
    num_layers: int
    cond_layer: int


class Host(Protocol):
    arch: Arch
    device: torch.device                    # where trainable parameters live and random draws are made
    encoders: Mapping[str, TextEncoder]     # in the model's order
    num_timesteps: int                      # size of the discrete noise schedule (1000 for SD)

    def token_ids(self, key: str, text: str) -> list[int]:
        """The vocabulary ids `text` tokenises to, without start and end tokens."""

    def vocabulary(self, key: str) -> Tensor:
        """The frozen token-embedding table [V, d] of encoder `key` (any dtype; never written to)."""

    def prepare_prompt(self, text: str, num_vectors: int) -> Any:
        """Tokenise a prompt once; `{}` marks the concept's slot of `num_vectors` tokens, filled by `encode`."""

    def encode(self, prompts: Sequence[Any], vectors: Mapping[str, Tensor]) -> Any:
        """Conditioning for a batch of prepared prompts with `vectors[key]` [n, d] in each slot.

        Differentiable in `vectors`. With `vectors` empty the slot must not occur in the prompts.
        """

    def encode_images(self, images: Tensor) -> Tensor:
        """[N, H, W, 3] images in 0..1 → latents [N, C, h, w] in the diffusion model's scale."""

    def patch_self_attention(self, residuals: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
                             mask_bias: float) -> None:
        """From now on, layer i of encoder `key` concatenates `residuals[key][i]` = (keys [t, d], values [t, d])
        to its self-attention's K and V (after the projections), every query seeing them with logit bias
        `mask_bias`. The tensors are used as given, so gradients reach them (CatVersion, docs/METHODS.md §5)."""

    def unet_targets(self, kind: str) -> list[tuple[str, int, int]]:
        """The UNet's attention projections of `kind` as (weight key, out, in) (tuning encoder, docs/METHODS.md §6)."""

    def wrap_unet_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
        """From now on, weight `key` is W + scale·up@down for `offsets[key]` = (up [out, r], down [r, in]),
        differentiably. Calling it again with the same keys swaps the factors."""

    def set_dual_path(self, alpha: float, hard_vectors: Callable[[], Mapping[str, Tensor]] | None) -> None:
        """From now on, `loss` runs every attention branch of the denoiser twice and returns α·soft + (1 − α)·hard
        per branch (DATE's dual path, docs/METHODS.md §6.2): soft = as configured (the prompt's vectors, weights
        with their offsets), hard = the weights without offsets and, for cross-attention, the same prompts with
        `hard_vectors()` ({key: [n, d]}, e.g. the nearest real tokens) in the slot. Gradients flow through the
        soft branch only. α = 1 (with `hard_vectors` None) turns it off.

        Raises:
            ValueError: α outside [0, 1], α < 1 without `hard_vectors`, or a denoiser without the dual path.
        """

    def image_features(self, images: Tensor) -> Tensor:
        """[N, H, W, 3] images → the CLIP vision encoder's penultimate hidden states [N, T, width]."""

    def unet_features(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The UNet encoder's block outputs on the noisy latents, spatially averaged and concatenated [N, C]."""

    def loss(self, latents: Tensor, cond: Any, noise: Tensor, timesteps: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample diffusion loss [B] at discrete `timesteps` with ε `noise` (ε- or v-target by model type).

        `mask` [B, h, w] weights the latent pixels (1 = counted); None counts every pixel.
        """

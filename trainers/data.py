"""Training images: channel fixes, the resize/crop policy and masks. Plain torch.

Policy: every image is resized so that its shorter side equals the training resolution (bicubic, antialiased),
then centre-cropped to a square. Images of any size can therefore be mixed. Grayscale images are repeated to
RGB and an alpha channel is dropped, as ComfyUI's VAE Encode does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def to_rgb(image: Tensor) -> Tensor:
    """[H, W, C] with C in 1..4 → [H, W, 3] float in 0..1."""
    if image.dim() != 3:
        raise ValueError(f"images: expected [H, W, C] images, got shape {tuple(image.shape)}.")
    channels = image.shape[-1]
    if channels in (1, 2):  # gray, gray + alpha
        image = image[..., :1].expand(*image.shape[:2], 3)
    elif channels == 4:  # RGBA
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"images: {channels} colour channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    return image.float().clamp(0, 1)


def square_resize(image: Tensor, resolution: int, mode: str = "bicubic") -> Tensor:
    """[C, H, W] → [C, resolution, resolution]: the centred square of side min(H, W), resized to `resolution`.

    The same picture as resizing the shorter side and then cropping, but cropped first, so memory is bounded by
    the output: a 1 × 5000 image resized whole to 2048 px on its short side would need 251 GB.
    """
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[..., top:top + side, left:left + side]
    if side != resolution:
        antialias = mode in ("bicubic", "bilinear")
        image = F.interpolate(image[None], size=(resolution, resolution), mode=mode, antialias=antialias,
                              **({} if mode == "nearest" else {"align_corners": False}))[0]
    return image


def prepare_images(images: Tensor | Sequence[Tensor], resolution: int) -> Tensor:
    """ComfyUI IMAGE batch [N, H, W, C] (or a list of [H, W, C]) → [N, resolution, resolution, 3] in 0..1."""
    items = list(images)
    if not items:
        raise ValueError("images: the batch is empty; connect 3–5 images of the concept.")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution: {resolution} must be a positive multiple of 8 (the VAE downscales by 8).")
    out = [square_resize(to_rgb(im).permute(2, 0, 1), resolution).clamp(0, 1).permute(1, 2, 0) for im in items]
    return torch.stack(out)


def prepare_masks(masks: Tensor | Sequence[Tensor], num_images: int, resolution: int) -> Tensor:
    """ComfyUI MASK [N or 1, H, W] or a list of [H, W] of any sizes (1 = the concept's region) → [N, resolution,
    resolution] in 0..1."""
    items = [masks] if isinstance(masks, Tensor) and masks.dim() == 2 else list(masks)
    if any(m.dim() != 2 for m in items) or len(items) not in (1, num_images):
        shapes = [tuple(m.shape) for m in items]
        raise ValueError(f"mask: got {len(items)} mask(s) of shapes {shapes[:4]} for {num_images} images; give one "
                         "mask per image or one for all.")
    resized = torch.stack([square_resize(m[None].float(), resolution, mode="bilinear")[0] for m in items])
    resized = resized.clamp(0, 1).expand(num_images, -1, -1)
    if bool((resized.flatten(1).sum(1) == 0).any()):
        raise ValueError("mask: a mask is empty (all black), so its image would teach nothing; white marks the "
                         "concept's region.")
    return resized.contiguous()

"""What every denoiser side does alike: one call of ComfyUI's apply_model as its sampler makes it, and a squared
error averaged per sample over the latent pixels a mask keeps."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor


def apply_model(model: Any, noisy: Tensor, sigma: Tensor, cross_attn: Tensor, options: Mapping[str, Any],
                extra: Mapping[str, Any]) -> Tensor:
    """x0 predicted by the patched model at σ (ComfyUI's apply_model takes σ and returns x0)."""
    options = {**options, "cond_or_uncond": [0] * len(noisy), "sigmas": sigma}
    return model.model.apply_model(noisy, sigma, c_crossattn=cross_attn, transformer_options=options, **extra)


def per_sample(err: Tensor, mask: Tensor | None) -> Tensor:
    """[B, C, ...] squared errors → [B]: the mean over every pixel, or over those `mask` [B, ...] weights."""
    dims = tuple(range(1, err.dim()))
    if mask is None:
        return err.mean(dim=dims)
    weights = mask[:, None].to(err).expand_as(err)
    return (err * weights).sum(dim=dims) / weights.sum(dim=dims)

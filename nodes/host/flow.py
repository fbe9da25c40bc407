"""The denoiser side of the flow-matching families (SD 3.5, Flux.1, Lumina 2): ComfyUI's CONST sampling, where the
noisy latent is x_t = σ·ε + (1 − σ)·x0 and the network predicts the velocity v = ε − x0 (docs/COMFYUI.md §2;
model_sampling.CONST).

Time is drawn as SD 3's rectified-flow training draws it: t logit-normal (Esser et al. 2024, arXiv 2403.03206,
§3.1 and Table 1: "rf/lognorm(0.00, 1.00)"; diffusers' SD3 DreamBooth defaults to the same `logit_normal`), then
the model's own shift maps t to σ (ModelSamplingDiscreteFlow for SD 3.5, ModelSamplingFlux for Flux.1). Black
Forest Labs published no training recipe for Flux.1; it gets the same draws through its own shift. The shared loop
draws an index i in [0, num_timesteps); it is read as the quantile (i + ½)/num_timesteps of that distribution, so
the loop stays the same for every family.

A family differs in the inputs its network takes beside the conditioning (`INPUTS`) and in what autograd and
checkpointing need of it (`PREPARE`). A batch whose prompts have different token counts is predicted one prompt at a
time, each conditioning as long as its own prompt, as at inference (Lumina 2 reads its caption's length; T5's
padding makes template prompts equally long on SD 3.5 and Flux.1).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import comfy.model_sampling
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...trainers.concept import Arch
from . import flux_blocks
from .denoise import apply_model, per_sample
from .text_side import ComfyCond

LOGIT_NORMAL = (0.0, 1.0)   # mean and standard deviation of logit(t)
TIME_BINS = 1000
UNET_ONLY = "weight offsets and block features are implemented for the UNet families (SD 1.x, SD 2.x, SDXL) only."
FLUX_GUIDANCE = 3.5         # what ComfyUI feeds Flux dev's guidance embedding by default (Flux.extra_conds)


def _sd3_inputs(cond: ComfyCond, batch: int) -> dict[str, Tensor]:
    return {"y": cond.pooled}  # type: ignore[dict-item]


def _flux_inputs(cond: ComfyCond, batch: int) -> dict[str, Tensor]:
    # schnell has no guidance embedding and ignores it, as at inference
    return {"y": cond.pooled, "guidance": cond.cross_attn.new_full((batch,), FLUX_GUIDANCE)}  # type: ignore[dict-item]


def _lumina2_inputs(cond: ComfyCond, batch: int) -> dict[str, Any]:
    # what Lumina2.extra_conds sends for one caption: its token count (its mask is all ones, so it is not sent)
    return {"num_tokens": cond.cross_attn.shape[1]}


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _lumina2_prepare(model: Any, gradient_checkpointing: bool) -> Callable[[], None]:
    if gradient_checkpointing:  # NextDiT's blocks add out of place: plain checkpoints recompute them exactly
        network = model.model.diffusion_model
        for stack in ("noise_refiner", "context_refiner", "layers"):
            for i, block in enumerate(getattr(network, stack)):
                model.add_object_patch(f"diffusion_model.{stack}.{i}.forward", _checkpointed(block.forward))
    return flux_blocks.differentiable_rope("comfy.ldm.lumina.model")


def _sd3_prepare(model: Any, gradient_checkpointing: bool) -> Callable[[], None]:
    if gradient_checkpointing:
        model.add_object_patch("diffusion_model.use_checkpoint", True)  # MMDiT's own switch, per joint block
    return lambda: None


def _flux_prepare(model: Any, gradient_checkpointing: bool) -> Callable[[], None]:
    flux_blocks.patch_for_autograd(model, gradient_checkpointing)
    return flux_blocks.differentiable_rope()


INPUTS: dict[Arch, Callable[[ComfyCond, int], dict[str, Any]]] = {"sd3": _sd3_inputs, "flux": _flux_inputs,
                                                                  "lumina2": _lumina2_inputs}
PREPARE: dict[Arch, Callable[[Any, bool], Callable[[], None]]] = {"sd3": _sd3_prepare, "flux": _flux_prepare,
                                                                  "lumina2": _lumina2_prepare}


def _one_prompt(cond: ComfyCond, i: int) -> ComfyCond:
    """Sample i's conditioning at its own prompt's length (the batch pads shorter prompts to the longest)."""
    length = cond.lengths[i]
    pooled = None if cond.pooled is None else cond.pooled[i:i + 1]
    return ComfyCond(cond.cross_attn[i:i + 1, :length], pooled, cond.prompts[i:i + 1], [length])


class FlowDiT:
    """The denoiser side on a clone of the user's MODEL, for a model that samples with CONST (flow matching).
    `close()` undoes what the family needed beyond object patches (Flux's RoPE on ComfyUI 0.8).

    Raises:
        ValueError: when the model is not a flow-matching model of a family this pack trains.
    """

    def __init__(self, model: Any, arch: Arch, dtype: torch.dtype | None, gradient_checkpointing: bool):
        self.model, self.arch = model, arch
        self.sampling = model.get_model_object("model_sampling")
        if not isinstance(self.sampling, comfy.model_sampling.CONST) or arch not in INPUTS:
            raise ValueError(f"this model samples with {type(self.sampling).__name__}, not flow matching.")
        self.v_prediction = False
        self.num_timesteps = TIME_BINS
        if dtype is not None:
            model.set_model_compute_dtype(dtype)
        self.close = PREPARE[arch](model, gradient_checkpointing)

    @property
    def transformer_options(self) -> dict[str, Any]:
        return self.model.model_options.get("transformer_options", {})

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """σ for the loop's time indices: logit-normal quantiles, shifted as the model samples."""
        quantile = (timesteps.float() + 0.5) / self.num_timesteps
        mean, std = LOGIT_NORMAL
        t = torch.sigmoid(mean + std * math.sqrt(2.0) * torch.erfinv(2 * quantile - 1))
        return self.sampling.sigma(t * getattr(self.sampling, "multiplier", 1.0))

    def latents_in(self, latents: Tensor) -> Tensor:
        return self.model.model.process_latent_in(latents)

    def predict(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor,
                transformer_options: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The noisy latent x_t, σ, and the network's x0 prediction (apply_model returns x_t − σ·v̂)."""
        options = self.transformer_options if transformer_options is None else transformer_options
        sigma = self.sigmas(timesteps).to(latents)
        noisy = self.sampling.noise_scaling(sigma, noise, latents)
        if len(set(cond.lengths)) == 1:
            denoised = self._apply(noisy, sigma, cond, options)
        else:
            denoised = torch.cat([self._apply(noisy[i:i + 1], sigma[i:i + 1], _one_prompt(cond, i), options)
                                  for i in range(len(noisy))])
        return noisy, sigma, denoised

    def _apply(self, noisy: Tensor, sigma: Tensor, cond: ComfyCond, options: Mapping[str, Any]) -> Tensor:
        extra = INPUTS[self.arch](cond, len(noisy))
        return apply_model(self.model, noisy, sigma, cond.cross_attn, options, extra)

    def loss(self, latents: Tensor, noisy: Tensor, sigma: Tensor, denoised: Tensor, noise: Tensor,
             mask: Tensor | None = None) -> Tensor:
        """Per-sample velocity loss ‖v̂ − (ε − x0)‖², the objective these models were trained with."""
        velocity = (noisy - denoised) / sigma.view(-1, *[1] * (noisy.dim() - 1))
        return per_sample((velocity.float() - (noise.float() - latents.float())) ** 2, mask)

    # -- what only the UNet families offer (the Tuning Encoder's offsets and features; Learn Concept refuses first) --
    def weight_targets(self, kind: str) -> list[tuple[str, int, int]]:
        raise ValueError(UNET_ONLY)

    def wrap_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> bool:
        raise ValueError(UNET_ONLY)

    def enable_dual_path(self) -> bool:
        raise ValueError("Tuning Encoder: the dual path (blend < 1) runs on the UNet families' attention modules (SD "
                         "1.x, SD 2.x, SDXL) only; set blend to 1 for this model.")

    def block_features(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor) -> Tensor:
        raise ValueError(UNET_ONLY)

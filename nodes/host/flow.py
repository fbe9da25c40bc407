"""The denoiser side of the flow-matching families (SD 3.5): ComfyUI's CONST sampling, where the noisy latent is
x_t = σ·ε + (1 − σ)·x0 and the network predicts the velocity v = ε − x0 (docs/COMFYUI.md §2; model_sampling.CONST).

Time is drawn as the family's trainers draw it: SD 3's rectified-flow training samples t logit-normally
(Esser et al. 2024, arXiv 2403.03206, §3.1 and Table 1: "rf/lognorm(0.00, 1.00)"; diffusers' SD3 DreamBooth
defaults to the same `logit_normal`), then the model's own shift maps t to σ (ModelSamplingDiscreteFlow.sigma).
The shared loop draws an index i in [0, num_timesteps); it is read as the quantile (i + ½)/num_timesteps of that
distribution, so the loop stays the same for every family.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import comfy.model_sampling
import torch
from torch import Tensor

from .text_side import ComfyCond

LOGIT_NORMAL = (0.0, 1.0)   # mean and standard deviation of logit(t)
TIME_BINS = 1000


class FlowDiT:
    """The denoiser side on a clone of the user's MODEL, for a model that samples with CONST (flow matching).

    Raises:
        ValueError: when the model is not a flow-matching model, or gradient checkpointing is asked of a network
            that has no switch for it.
    """

    def __init__(self, model: Any, dtype: torch.dtype | None, gradient_checkpointing: bool):
        self.model = model
        self.sampling = model.get_model_object("model_sampling")
        if not isinstance(self.sampling, comfy.model_sampling.CONST):
            raise ValueError(f"this model samples with {type(self.sampling).__name__}, not flow matching.")
        self.v_prediction = False
        self.num_timesteps = TIME_BINS
        if dtype is not None:
            model.set_model_compute_dtype(dtype)
        if gradient_checkpointing:
            network = model.model.diffusion_model
            if not hasattr(network, "use_checkpoint"):
                raise ValueError(f"gradient checkpointing is not available for {type(network).__name__}; turn it "
                                 "off.")
            model.add_object_patch("diffusion_model.use_checkpoint", True)  # MMDiT's own switch, per joint block

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
        extra = {} if cond.pooled is None else {"y": cond.pooled}
        options = {**options, "cond_or_uncond": [0] * len(latents), "sigmas": sigma}
        denoised = self.model.model.apply_model(noisy, sigma, c_crossattn=cond.cross_attn,
                                                transformer_options=options, **extra)
        return noisy, sigma, denoised

    def loss(self, latents: Tensor, noisy: Tensor, sigma: Tensor, denoised: Tensor, noise: Tensor,
             mask: Tensor | None = None) -> Tensor:
        """Per-sample velocity loss ‖v̂ − (ε − x0)‖², the objective these models were trained with."""
        velocity = (noisy - denoised) / sigma.view(-1, *[1] * (noisy.dim() - 1))
        err = (velocity.float() - (noise.float() - latents.float())) ** 2
        dims = tuple(range(1, err.dim()))
        if mask is None:
            return err.mean(dim=dims)
        weights = mask[:, None].to(err).expand_as(err)
        return (err * weights).sum(dim=dims) / weights.sum(dim=dims)

    # -- what only the UNet families offer (the Tuning Encoder's offsets and features) -------------------------
    def weight_targets(self, kind: str) -> list[tuple[str, int, int]]:
        raise ValueError("weight offsets are implemented for the UNet families (SD 1.x, SD 2.x, SDXL) only.")

    def wrap_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> bool:
        return bool(self.weight_targets(""))

    @contextlib.contextmanager
    def without_offsets(self) -> Iterator[None]:
        yield

    def block_features(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor) -> Tensor:
        self.weight_targets("")
        raise AssertionError("unreachable")

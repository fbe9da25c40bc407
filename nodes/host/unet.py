"""The denoiser side of the UNet families (SD 1.x, SD 2.x, SDXL): discrete timesteps, the ε or v loss derived from
ComfyUI's x0 prediction, SDXL's ADM vector, gradient checkpointing, the weight offsets and the dual path over the
attention modules (docs/COMFYUI.md §2)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import comfy.model_sampling
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...trainers.concept import Arch
from .denoise import apply_model, per_sample
from .text_side import ComfyCond
from .weight_offsets import Offsets, attention_targets, patch_dual_path, wrap_weights


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: Any, **kwargs: Any) -> Tensor:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


class DiscreteUNet:
    """The denoiser side on a clone of the user's MODEL; patches go to the clone, which the host loads.

    Raises:
        ValueError: when the model does not sample with a discrete ε or v schedule.
    """

    def __init__(self, model: Any, arch: Arch, dtype: torch.dtype | None, gradient_checkpointing: bool):
        self.model = model
        self.sampling = model.get_model_object("model_sampling")
        if not isinstance(self.sampling, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
                self.sampling, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)):
            raise ValueError(f"Only ε- and v-prediction models with a discrete schedule can be trained, this one "
                             f"samples with {type(self.sampling).__name__}.")
        self.v_prediction = isinstance(self.sampling, comfy.model_sampling.V_PREDICTION)
        self.num_timesteps = len(self.sampling.sigmas)
        self.offsets = Offsets()
        self._dual_path = False
        self._adm_sizes: dict[tuple[int, int], Tensor] = {}
        if dtype is not None:
            model.set_model_compute_dtype(dtype)
        if gradient_checkpointing:
            # ComfyUI's UNet runs a block by iterating over its layers (forward_timestep_embed), never through
            # the block's own forward: the layers are what must be wrapped
            unet = model.model.diffusion_model
            blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)] + \
                     [("middle_block", unet.middle_block)] + \
                     [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
            for prefix, block in blocks:
                for j in range(len(block)):
                    name = f"diffusion_model.{prefix}.{j}.forward"
                    model.add_object_patch(name, _checkpointed(model.get_model_object(name)))

    def close(self) -> None:
        """Nothing beyond object patches, which go with the clone."""

    @property
    def transformer_options(self) -> dict[str, Any]:
        return self.model.model_options.get("transformer_options", {})

    def weight_targets(self, kind: str) -> list[tuple[str, int, int]]:
        return attention_targets(self.model.model.diffusion_model, kind)

    def wrap_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> bool:
        """Install or swap the offsets; True when new wrappers were added (they take effect on the next load)."""
        new = offsets.keys() - self.offsets.factors.keys()
        wrap_weights(self.model, new, self.offsets)
        self.offsets.factors.update(offsets)
        self.offsets.scale = scale
        return bool(new)

    def enable_dual_path(self) -> bool:
        """Wrap every attention module's forward in a `DualPathAttention`, once; True when it did (the object
        patches take effect on the next load). A prediction runs the dual path when its transformer_options carry
        `weight_offsets.DUAL_PATH`."""
        if self._dual_path:
            return False
        patch_dual_path(self.model, self.offsets)
        self._dual_path = True
        return True

    def latents_in(self, latents: Tensor) -> Tensor:
        return self.model.model.process_latent_in(latents)

    def predict(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor,
                transformer_options: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The noisy latent x0 + σ·ε, σ, and the UNet's x0 prediction at the discrete `timesteps`."""
        options = self.transformer_options if transformer_options is None else transformer_options
        sigma = self.sampling.sigma(timesteps.float())                               # [B]
        noisy = self.sampling.noise_scaling(sigma, noise, latents)
        extra = {}
        if cond.pooled is not None:
            extra["y"] = self._adm(cond.pooled, latents.shape[-2] * 8, latents.shape[-1] * 8)
        return noisy, sigma, apply_model(self.model, noisy, sigma, cond.cross_attn, options, extra)

    def loss(self, latents: Tensor, noisy: Tensor, sigma: Tensor, denoised: Tensor, noise: Tensor,
             mask: Tensor | None = None) -> Tensor:
        """Per-sample ε loss (v loss for v-prediction models) from an x0 prediction."""
        eps = (noisy - denoised) / sigma.view(-1, 1, 1, 1)
        loss = per_sample((eps.float() - noise.float()) ** 2, mask)
        if self.v_prediction:
            # v − v̂ = (σ² + σ_d²)^½ / σ_d · (ε − ε̂): the v-MSE is the ε-MSE reweighted per sample
            sd = float(self.sampling.sigma_data)
            loss = loss * (sigma.float() ** 2 + sd ** 2) / sd ** 2
        return loss

    def block_features(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The encoder blocks' outputs, spatially averaged and concatenated [N, C], without any offsets."""
        blocks: list[Tensor] = []

        def capture(h: Tensor, transformer_options: Any) -> Tensor:
            blocks.append(h.float().mean(dim=(-2, -1)))                                    # [B, C]
            return h

        options = self.transformer_options
        patches = {**options.get("patches", {})}
        patches["input_block_patch"] = [*patches.get("input_block_patch", []), capture]
        with self.offsets.disabled():
            self.predict(latents, cond, noise, timesteps, {**options, "patches": patches})
        return torch.cat(blocks, dim=-1)

    def _adm(self, pooled: Tensor, height: int, width: int) -> Tensor:
        """SDXL's ADM vector y = [pooled, size embeddings]: the size part is computed once per size and kept on
        the device (encode_adm builds it on the CPU, which would cost a round trip every step)."""
        sizes = self._adm_sizes.get((height, width))
        if sizes is None:
            probe = torch.zeros(1, pooled.shape[-1])
            full = self.model.model.encode_adm(pooled_output=probe, width=width, height=height, crop_w=0, crop_h=0,
                                               target_width=width, target_height=height)
            sizes = self._adm_sizes[(height, width)] = full[:, pooled.shape[-1]:].to(pooled)
        return torch.cat([pooled, sizes.expand(len(pooled), -1)], dim=1)

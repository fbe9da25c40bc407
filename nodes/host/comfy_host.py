"""The ComfyUI host adapter: `trainers.host.Host` on ComfyUI's CLIP, MODEL and VAE, made of a text side
(`text_side.TextSide`) and a denoiser side (`unet.DiscreteUNet` for the UNet families, `flow.FlowDiT` for the
flow-matching ones) that this class loads, unloads and joins.

Every pitfall of training inside ComfyUI (docs/COMFYUI.md §10) is handled in this package and nowhere else:
- the caller trains inside `torch.inference_mode(False)` and `torch.enable_grad()` (§10.1);
- CLIP and MODEL are cloned; only the clones are patched, and `close()` unloads them so the user's objects
  come back untouched (§10.5);
- the clone's CLIP layers get an out-of-place forward so autograd can pass through them (§10.3, §1.9);
- weights loaded under inference mode get an ordinary copy once, so autograd can save them (§10.2, §2.8);
- `apply_model` takes sigma and returns x0: ε (or v) is derived from it (§10.6, §2.2); SDXL gets its ADM `y`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import comfy.model_management as mm
import comfy.model_sampling
import torch
from torch import Tensor

from ...trainers.concept import Arch
from .flow import FlowDiT
from .text_side import ComfyCond, TextSide
from .unet import DiscreteUNet
from .weight_offsets import DUAL_PATH

PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _saveable_weights(root: torch.nn.Module) -> None:
    """Give every inference-tensor parameter an ordinary copy, once (docs/COMFYUI.md §10.2, §2.8).

    Weights loaded under ComfyUI's inference mode cannot be saved for the backward pass. Copying them once is
    what ComfyUI itself does whenever it moves a model to the GPU outside inference mode; the values are unchanged,
    so every other user of the model computes exactly as before. The alternative — identity weight wrappers —
    would copy every weight at every forward and keep the copies for the backward pass.
    """
    import comfy.utils

    for name, p in list(root.named_parameters()):
        if p.is_inference():
            comfy.utils.set_attr_param(root, name, p.clone())


class ComfyHost:
    """`trainers.host.Host` on ComfyUI objects. Use as a context manager inside `inference_mode(False)`.

    Args:
        model, clip, vae: the user's MODEL, CLIP and VAE; only clones are patched.
        arch (`Arch`): from `detect_arch`.
        precision (`str`, defaults to `"auto"`): the UNet's compute dtype; "auto" keeps ComfyUI's choice.
        gradient_checkpointing (`bool`, defaults to `False`): recompute UNet blocks in the backward pass.
        clip_vision (*optional*): a CLIP_VISION, for `image_features`.
    """

    def __init__(self, model: Any, clip: Any, vae: Any, arch: Arch, precision: str = "auto",
                 gradient_checkpointing: bool = False, clip_vision: Any = None):
        self.arch = arch
        self.vae = vae
        self.clip_vision = clip_vision
        self._dual_path: tuple[float, Callable[[], Mapping[str, Tensor]]] | None = None
        self.model = model.clone()
        self.clip = clip.clone()
        self.device = self.model.load_device
        self.clip.patcher.load_device = self.device  # the text encoder trains beside the UNet
        flow = isinstance(self.model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        side = FlowDiT if flow else DiscreteUNet
        self.denoiser: FlowDiT | DiscreteUNet = side(self.model, arch, PRECISIONS[precision], gradient_checkpointing)
        try:
            self.text = TextSide(self.clip, arch)
        except BaseException:
            self.denoiser.close()  # what the denoiser side changed beyond its clone (Flux's RoPE) goes back
            raise
        self.num_timesteps = self.denoiser.num_timesteps
        self.v_prediction = self.denoiser.v_prediction
        self.encoders = self.text.encoders
        self._loaded = False

    # -- loading ------------------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._loaded:
            # like ComfyUI's Train LoRA: evict everything else and load both models whole
            mm.load_models_gpu([self.clip.patcher, self.model], memory_required=1e20, force_full_load=True)
            _saveable_weights(self.clip.cond_stage_model)
            _saveable_weights(self.model.model)
            self._loaded = True

    def close(self) -> None:
        """Unload the patched clones so the next user of these models gets them unpatched."""
        self.denoiser.close()
        for patcher in (self.clip.patcher, self.model):
            for i in reversed(range(len(mm.current_loaded_models))):
                if mm.current_loaded_models[i].model is patcher:
                    mm.current_loaded_models.pop(i).model_unload()
            for module in patcher.model.modules():  # the weight wrappers outlive a full unload otherwise
                if hasattr(module, "weight_function"):
                    module.weight_function, module.bias_function = [], []
        self._loaded = False

    def __enter__(self) -> ComfyHost:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- Host: the text side ------------------------------------------------------------------------------------
    def token_ids(self, key: str, text: str) -> list[int]:
        return self.text.token_ids(key, text)

    def vocabulary(self, key: str) -> Tensor:
        return self.text.vocabulary(key)

    def prepare_prompt(self, text: str, num_vectors: int = 0) -> dict[str, list[list[Any]]]:
        return self.text.prepare_prompt(text, num_vectors)

    def encode(self, prompts: Sequence[Mapping[str, list[list[Any]]]], vectors: Mapping[str, Tensor]) -> ComfyCond:
        self._ensure_loaded()
        return self.text.encode(prompts, vectors)

    def patch_self_attention(self, residuals: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
                             mask_bias: float) -> None:
        self.text.patch_self_attention(residuals, mask_bias)
        self._loaded = False  # object patches are applied when the model loads

    # -- Host: the denoiser side --------------------------------------------------------------------------------
    def unet_targets(self, kind: str) -> list[tuple[str, int, int]]:
        return self.denoiser.weight_targets(kind)

    def wrap_unet_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
        if self.denoiser.wrap_weights(offsets, scale):
            self._loaded = False  # new wrappers are installed when the model loads

    def set_dual_path(self, alpha: float, hard_vectors: Callable[[], Mapping[str, Tensor]] | None) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"the dual path's α (blend) must be within [0, 1], got {alpha}.")
        if alpha == 1:
            self._dual_path = None
            return
        if hard_vectors is None:
            raise ValueError("the dual path (blend < 1) needs the hard prompt's vectors.")
        if self.denoiser.enable_dual_path():
            self._loaded = False  # the attention wrappers are object patches, applied when the model loads
        self._dual_path = (alpha, hard_vectors)

    @torch.no_grad()
    def unet_features(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        empty = self.encode([self.prepare_prompt("", 0)] * len(latents), {})
        return self.denoiser.block_features(latents, empty, noise, timesteps)

    def loss(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor,
             mask: Tensor | None = None) -> Tensor:
        self._ensure_loaded()
        noisy, sigma, denoised = self.denoiser.predict(latents, cond, noise, timesteps, self._dual_path_options(cond))
        return self.denoiser.loss(latents, noisy, sigma, denoised, noise, mask)

    def _dual_path_options(self, cond: ComfyCond) -> dict[str, Any] | None:
        """transformer_options that run this prediction's attention through the dual path, with the hard prompt's
        cross-attention tensor (the same prompts, the hard vectors in the slot; no gradient); None when it is off."""
        if self._dual_path is None:
            return None
        alpha, hard_vectors = self._dual_path
        with torch.no_grad():
            hard = self.encode(cond.prompts, hard_vectors()).cross_attn
        return {**self.denoiser.transformer_options, DUAL_PATH: (alpha, hard)}

    # -- images -------------------------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        if self.clip_vision is None:
            raise ValueError("image features need a CLIP vision model; connect a CLIP_VISION.")
        with torch.no_grad():
            features = self.clip_vision.encode_image(images[..., :3], crop=True)["penultimate_hidden_states"]
        self._loaded = False  # the vision model may have pushed ours out of memory
        return features.to(self.device, torch.float32)

    def encode_images(self, images: Tensor) -> Tensor:
        with torch.no_grad():  # the VAE's weights are inference tensors and need no gradient
            latents = self.vae.encode(images[..., :3])
        self._loaded = False  # the VAE may have pushed our models out of memory
        return self.denoiser.latents_in(latents).to(self.device)

    @torch.no_grad()
    def sample(self, prompt: str, vectors: Mapping[str, Tensor], size: int, seed: int = 0, steps: int = 12,
               cfg: float = 5.0) -> Tensor:
        """A quick image of `prompt` ({} = the concept) with the current vectors and patches, for previews.

        Returns an IMAGE [1, size, size, 3] in 0..1, sampled by ComfyUI's own KSampler (euler, 12 steps).
        """
        import comfy.sample

        n = next(iter(vectors.values())).shape[0] if vectors else 0

        def conditioning(text: str, vecs: Mapping[str, Tensor]) -> list[list[Any]]:
            cond = self.encode([self.prepare_prompt(text, n if "{}" in text else 0)], vecs)
            extra = {} if cond.pooled is None else {"pooled_output": cond.pooled, "width": size, "height": size}
            return [[cond.cross_attn, {**extra, **self.text.conditioning_extras(cond)}]]

        channels = self.model.model.latent_format.latent_channels
        latent = torch.zeros(1, channels, size // 8, size // 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        samples = comfy.sample.sample(self.model, noise, steps, cfg, "euler", "normal", conditioning(prompt, vectors),
                                      conditioning("", {}), latent, seed=seed, disable_pbar=True)
        image = self.vae.decode(samples)
        self._loaded = False  # sampling and decoding may have moved our models
        return image[:1]

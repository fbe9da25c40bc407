"""The toy world's tiny models, built from ComfyUI's own classes (docs/COMFYUI.md §8.2), and their weight files.

Importing this module imports ComfyUI from $COMFYUI_PATH, on the GPU when torch sees one (the build takes
minutes there) and otherwise with `args.cpu = True` (set before comfy.model_management looks for a GPU); in fp32
on both, so that results do not depend on where they were computed.

- CLIP: `comfy.sd.CLIP(ClipTarget(SD1Tokenizer, SD1ClipModel))` with a 64-wide, 3-layer `clip_l_model_config`
  and the real bundled tokenizer and 49408-row vocabulary.
- VAE: `comfy.sd.VAE` (AutoencoderKL) from a small ddconfig; downscale 8, 4 latent channels, so a 64×64 image
  is a 4×8×8 latent. Its latents are rescaled so that SD1.5's `latent_format` scale (0.18215) gives unit std.
- UNet: `comfy.supported_models.SD15` with a small unet_config → `BaseModel` in a `ModelPatcher`.

`load_clip`, `load_vae` and `load_model` build the models under `torch.inference_mode()`, as ComfyUI's loader
nodes do, so the pack's host adapter meets the same inference tensors as in a real graph:

    clip, vae, model = load_clip(), load_vae(), load_model()
    with ComfyHost(model, clip, vae, "sd1") as host: ...
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "sd.py")):
    raise ImportError(f"no ComfyUI at COMFYUI_PATH={COMFYUI_PATH!r}; set it to a ComfyUI >= 0.3.64 checkout")
if COMFYUI_PATH not in sys.path:
    sys.path.insert(0, COMFYUI_PATH)
from comfy.cli_args import args as _comfy_args  # noqa: E402

if "comfy.model_management" not in sys.modules:        # a process that set ComfyUI up already keeps its choices
    _comfy_args.cpu = not torch.cuda.is_available()
    _comfy_args.force_fp32 = _comfy_args.fp32_vae = True   # on a GPU too: ComfyUI would otherwise pick a bf16 VAE
import comfy.clip_model  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402

from .world import RES  # noqa: E402

DEVICE = mm.get_torch_device()                 # where the build trains
WEIGHTS = Path(__file__).resolve().parent / "weights"
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
                   projection_dim=64)
CONTEXT = TEXT_CONFIG["hidden_size"]
UNET_CONFIG = dict(use_checkpoint=False, image_size=RES // 8, in_channels=4, out_channels=4, model_channels=64,
                   num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1], context_dim=CONTEXT, use_spatial_transformer=True,
                   use_linear_in_transformer=True, legacy=False, adm_in_channels=None,
                   use_temporal_attention=False, use_temporal_resblock=False)
UNET_HEADS = 4          # SD15's default of 8 heads would leave 8 channels per head at 64 channels
VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=RES, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TOKEN_TABLE_STD = 0.1   # random rows; with 64 dims their norms (~0.8) are comparable to a trained word's
TOKEN_TABLE_KEY = "clip_l.transformer.text_model.embeddings.token_embedding.weight"


def _initialise(module: torch.nn.Module, seed: int) -> None:
    """comfy.ops skips reset_parameters, so tiny models hold uninitialised memory: fill them deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("token_embedding.weight"):
                value = torch.randn(p.shape, generator=g) * TOKEN_TABLE_STD
            elif name.endswith("position_embedding.weight"):
                value = torch.randn(p.shape, generator=g) * 0.02
            elif p.dim() >= 2:
                value = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())   # fan-in scaled
            elif name.endswith("weight"):   # 1-D weights are norm scales
                value = torch.ones(p.shape)
            else:
                value = torch.zeros(p.shape)
            p.copy_(value.to(p.dtype))


def _load_into(module: torch.nn.Module, path: Path) -> None:
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.endswith("logit_scale")]
    if missing or unexpected:
        raise RuntimeError(f"{path.name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _build(make: Callable[[], Any], module_of: Callable[[Any], torch.nn.Module], path: Path | None,
           seed: int, inference: bool) -> Any:
    """Construct with `make`, then fill the weights from `path` (or a seeded init when path is None)."""
    context = torch.inference_mode() if inference else torch.inference_mode(False)
    logging.disable(logging.WARNING)   # an empty VAE state dict makes ComfyUI list every key as missing
    try:
        with context:
            obj = make()
            module = module_of(obj)
            if path is None:
                _initialise(module, seed)
            else:
                _load_into(module, path)
    finally:
        logging.disable(logging.NOTSET)
    return obj


def load_clip(path: Path | None = WEIGHTS / "clip.safetensors", embedding_directory: str | None = None,
              inference: bool = True, seed: int = 0) -> Any:
    """The tiny SD1 CLIP (fp32). path=None gives the seeded random initialisation the build starts from."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    return _build(lambda: comfy.sd.CLIP(target, embedding_directory=[embedding_directory] if embedding_directory
                                        else None,
                                        model_options={"clip_l_model_config": TEXT_CONFIG, "dtype": torch.float32}),
                  lambda clip: clip.cond_stage_model, path, seed, inference)


def load_vae(path: Path | None = WEIGHTS / "vae.safetensors", inference: bool = True, seed: int = 0) -> Any:
    vae = _build(lambda: comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": dict(VAE_DDCONFIG)}}),
                 lambda v: v.first_stage_model, path, seed, inference)
    vae.first_stage_model.float()
    return vae


def load_model(path: Path | None = WEIGHTS / "unet.safetensors", inference: bool = True, seed: int = 0) -> Any:
    """The tiny SD1.5 UNet as ComfyUI's MODEL: a BaseModel (eps prediction) in a ModelPatcher."""
    def make() -> Any:
        config = comfy.supported_models.SD15(dict(UNET_CONFIG))
        config.unet_config.update(num_heads=UNET_HEADS, num_head_channels=-1)
        config.set_inference_dtype(torch.float32, None)
        return config.get_model({})
    base = _build(make, lambda m: m.diffusion_model, path, seed, inference)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def save_weights(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(path))


# -- the build's differentiable text path -------------------------------------------------------------------------
def token_ids(clip: Any, text: str) -> list[int]:
    """The 77 token ids that `clip.tokenize(text)` produces (start, words, end, end-padding)."""
    batches = clip.tokenize(text)["l"]
    if len(batches) != 1:
        raise ValueError(f"text: {text!r} needs {len(batches)} 77-token batches; captions must fit in one")
    return [int(t) for t, _ in batches[0]]


def _out_of_place(layer: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """CLIPLayer.forward without its in-place residual adds, which break autograd (docs/COMFYUI.md §1.9)."""
    def forward(x: torch.Tensor, mask: torch.Tensor | None = None, optimized_attention: Any = None) -> torch.Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def make_trainable(clip: Any) -> None:
    """Let gradients pass through this CLIP's own modules (a build-only CLIP, never a user's)."""
    for layer in clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers:
        layer.forward = _out_of_place(layer)


def encode_ids(clip: Any, ids: torch.Tensor) -> torch.Tensor:
    """[B, 77] ids -> the conditioning [B, 77, D], as SDClipModel's default ("last" layer) computes it."""
    return clip.cond_stage_model.clip_l.transformer.text_model(ids, dtype=torch.float32)[0]

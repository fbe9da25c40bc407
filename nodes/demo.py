"""A small random-weight checkpoint in the SD 1.5 layout, and demo images, for runs without real weights.

The stock Load Checkpoint reads the file through its real code path, and it is as small as that loader allows:
the UNet has SD 1.5's width (320 channels, 768-wide context), which ComfyUI needs to detect SD 1.5, but a single
resolution level; the VAE is a TAESD (the tiny autoencoder ComfyUI recognises by its keys, 2.4 M parameters in
place of 84 M); the text encoder is SD 1.5's full CLIP-L, since ComfyUI builds it at a fixed size. Nothing it
draws is meaningful; it exists so the example workflows, the headless runner and the server tests run on a CPU.
The runner keeps it in its demo folder (nodes/headless.py: `demo_folder()`), so it is built once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ..trainers.atomic import write_safetensors

DEMO_CHECKPOINT = "concept_forge_demo_sd15.safetensors"
DEMO_IMAGES = tuple(f"concept_forge_demo_{i}.png" for i in range(1, 5))
DEMO_EMBEDDING = "concept_forge_demo.safetensors"  # a random SD 1.5 embedding for Load Concept
UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
            transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
            use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
            use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)



def _random_state(module: torch.nn.Module, prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Deterministic random weights (ComfyUI's modules skip initialisation): norms 1, biases 0, the rest small."""
    out = {}
    for name, value in module.state_dict().items():
        if name.endswith(("bias", "vae_shift")):
            tensor = torch.zeros(value.shape)
        elif value.dim() < 2:
            tensor = torch.ones(value.shape)
        else:
            fan_in = max(1, value[0].numel())
            tensor = torch.randn(value.shape, generator=generator) / fan_in ** 0.5
        out[prefix + name] = tensor.to(torch.float16)
    return out


def write_demo_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (about 300 MB, fp16) unless it is already there."""
    import comfy.sd1_clip  # here, so the names above import without ComfyUI
    import comfy.supported_models
    import comfy.taesd.taesd

    path = Path(path)
    if path.exists():
        return path
    g = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15(UNET)
    with torch.device("meta"):  # shapes only; the weights are drawn below
        unet = config.get_model({}).diffusion_model
        clip = comfy.sd1_clip.SD1ClipModel()
        vae = comfy.taesd.taesd.TAESD()
    state = _random_state(unet, "model.diffusion_model.", g)
    clip_state = _random_state(clip, "", g)
    clip_state["clip_l.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update(config.process_clip_state_dict_for_saving(clip_state))
    state.update(_random_state(vae, "first_stage_model.", g))
    return write_safetensors(state, path)


def write_demo_embedding(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """A random two-vector SD 1.5 embedding in kohya's layout, as a downloaded one would be (kept if there)."""
    path = Path(folder) / DEMO_EMBEDDING
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(seed)) * 0.5
    save_file({"emb_params": vectors}, str(path))
    return path


def write_demo_images(folder: str | os.PathLike[str], size: int = 64) -> list[Path]:
    """Four pictures of one made-up 'concept': a red star on a pale background, moved and scaled a little
    (kept where they are already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i, name in enumerate(DEMO_IMAGES):
        cx, cy, r = 0.45 + 0.05 * (i % 2), 0.5 - 0.05 * (i // 2), 0.28 + 0.03 * i
        angle = np.arctan2(yy - cy, xx - cx)
        radius = np.hypot(xx - cx, yy - cy)
        star = radius < r * (0.65 + 0.35 * np.cos(5 * angle))
        image = np.stack([0.85 - 0.1 * yy, 0.85 - 0.05 * xx, 0.8 * np.ones_like(xx)], -1)
        image[star] = (0.85, 0.12, 0.1)
        path = folder / name
        if not path.exists():
            Image.fromarray((image * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths

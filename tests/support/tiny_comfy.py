"""Tiny models built from ComfyUI's own classes (docs/COMFYUI.md §8.2) for the ComfyUI test tiers.

Importing this module imports ComfyUI from $COMFYUI_PATH with `args.cpu = True` (before
comfy.model_management, which would otherwise look for a GPU). Models are built under
`torch.inference_mode()`, as ComfyUI's loaders run, so their weights are inference tensors
(the pitfall the host adapter must handle) and are initialised deterministically
(comfy.ops skips reset_parameters, which leaves uninitialised memory).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

COMFYUI_PATH = os.environ["COMFYUI_PATH"]  # checked by comfy_tier.comfyui_problem
sys.path.insert(0, COMFYUI_PATH)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.clip_vision  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.sd2_clip  # noqa: E402
import folder_paths  # noqa: E402
from concept_forge.nodes.demo_families import (  # noqa: E402
    TE_G,
    TE_L,
    initialise,
    small_clip,
    small_model,
)

TE_H = dict(hidden_size=40, intermediate_size=80, num_attention_heads=2, num_hidden_layers=3, projection_dim=40)
CLIPS = {
    "sd1": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": TE_L}),
    "sd2": (comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel,
            {"clip_h_model_config": TE_H}),
    "sdxl": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
             {"clip_l_model_config": TE_L, "clip_g_model_config": TE_G}),
}
CONTEXT = {"sd1": 32, "sd2": 40, "sdxl": 32 + 48}
FLOW_ARCHS = ("sd3", "flux", "lumina2")  # the demo's small models of these families (nodes/demo_families.py)


def tiny_clip(arch: str = "sd1", embedding_directory: str | None = None, dtype: torch.dtype = torch.float32,
              seed: int = 0):
    if arch in FLOW_ARCHS:
        return small_clip(arch, embedding_directory, dtype, seed)
    tokenizer, model, options = CLIPS[arch]
    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model),
                             embedding_directory=[embedding_directory] if embedding_directory else None,
                             model_options={**options, "dtype": dtype})
        initialise(clip.cond_stage_model, seed)
    return clip


def tiny_model(arch: str = "sd1", v_prediction: bool = False, seed: int = 1):
    if arch in FLOW_ARCHS:
        return small_model(arch, seed)
    unet = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
                num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1], context_dim=CONTEXT[arch], use_spatial_transformer=True,
                use_linear_in_transformer=arch != "sd1", legacy=False, adm_in_channels=None,
                use_temporal_attention=False, use_temporal_resblock=False)
    config_class = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                    "sdxl": comfy.supported_models.SDXL}[arch]
    if arch == "sdxl":
        # the ADM vector: clip_g's pooled output and 6 size embeddings of 256
        unet.update(adm_in_channels=TE_G["hidden_size"] + 6 * 256, num_classes="sequential")
    config = config_class(unet)
    config.unet_config.update(num_heads=2, num_head_channels=-1)  # SD2's 64-channel heads do not fit 32 channels
    config.set_inference_dtype(torch.float32, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model_class = comfy.model_base.SDXL if arch == "sdxl" else comfy.model_base.BaseModel
    with torch.inference_mode():
        base = model_class(config, model_type=model_type)
        initialise(base, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_vae(seed: int = 2, latent_channels: int = 4):
    ddconfig = dict(double_z=True, z_channels=latent_channels, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    logging.disable(logging.WARNING)  # an empty state dict makes ComfyUI list every key as missing
    try:
        with torch.inference_mode():
            vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": latent_channels, "ddconfig": ddconfig}})
    finally:
        logging.disable(logging.NOTSET)
    with torch.inference_mode():
        initialise(vae.first_stage_model, seed)
    return vae


def tiny_clip_vision(folder, seed: int = 3):
    """A CLIP_VISION from ComfyUI's ClipVisionModel with a 32-wide, 3-layer ViT (its config written to `folder`)."""
    import json

    config = dict(hidden_act="quick_gelu", hidden_size=32, image_size=224, intermediate_size=64, layer_norm_eps=1e-5,
                  model_type="clip_vision_model", num_attention_heads=2, num_channels=3, num_hidden_layers=3,
                  patch_size=14, projection_dim=16)
    path = os.path.join(folder, f"tiny_clip_vision.{os.getpid()}.json")  # processes of one run each write theirs
    with open(path, "w") as f:
        json.dump(config, f)
    with torch.inference_mode():
        vision = comfy.clip_vision.ClipVisionModel(path)
        initialise(vision.model, seed)
    return vision


def tiny_images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[n, size, size, 3] in 0..1: a red square on noise, as a ComfyUI IMAGE batch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, size, size, 3, generator=g) * 0.3
    images[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = torch.tensor([0.9, 0.2, 0.1])
    return images


def use_model_folders(root) -> None:
    """Point ComfyUI's embeddings and concepts folders into `root` (a test's tmp_path)."""
    from concept_forge.nodes.paths import register_model_folders

    folder_paths.models_dir = str(root)
    embeddings = os.path.join(root, "embeddings")
    os.makedirs(embeddings, exist_ok=True)
    folder_paths.folder_names_and_paths["embeddings"] = ([embeddings], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths.pop("concepts", None)
    folder_paths.filename_list_cache.clear()
    register_model_folders()

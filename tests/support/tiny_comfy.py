"""Tiny models built from ComfyUI's own classes (docs/COMFYUI.md §8.2) for the ComfyUI test tiers.

Importing this module imports ComfyUI from $COMFYUI_PATH with `args.cpu = True` (before
comfy.model_management, which would otherwise look for a GPU). Models are built under
`torch.inference_mode()`, as ComfyUI's loaders run, so their weights are inference tensors
(the pitfall the host adapter must handle) and are initialised deterministically
(comfy.ops skips reset_parameters, which leaves uninitialised memory).
"""

from __future__ import annotations

import functools
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
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.lumina2  # noqa: E402
import comfy.text_encoders.sd2_clip  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
import folder_paths  # noqa: E402

TE_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)
TE_G = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=3, projection_dim=16)
TE_H = dict(hidden_size=40, intermediate_size=80, num_attention_heads=2, num_hidden_layers=3, projection_dim=40)
CLIPS = {
    "sd1": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": TE_L}),
    "sd2": (comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel,
            {"clip_h_model_config": TE_H}),
    "sdxl": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
             {"clip_l_model_config": TE_L, "clip_g_model_config": TE_G}),
}
# SD 3.5's T5 must keep T5-XXL's width and vocabulary (SD3ClipModel pads CLIP to 4096 and joins T5's tokens); only
# its depth and heads shrink. The table alone is 32128 × 4096 floats (0.5 GB).
T5 = dict(d_ff=32, d_kv=8, num_heads=2, num_layers=2)
CLIPS["sd3"] = (comfy.text_encoders.sd3_clip.SD3Tokenizer, comfy.text_encoders.sd3_clip.sd3_clip(),
                {"clip_l_model_config": TE_L, "clip_g_model_config": TE_G, "t5xxl_model_config": T5})
# Flux.1's T5 has no fixed width downstream: it shrinks whole (the table stays T5's 32128 rows)
T5_FLUX = dict(d_model=24, d_ff=32, d_kv=8, num_heads=2, num_layers=2)
CLIPS["flux"] = (comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(),
                 {"clip_l_model_config": TE_L, "t5xxl_model_config": T5_FLUX})
# Lumina 2's Gemma-2 shrinks whole (head_dim stays Gemma's 256: a class attribute); its SentencePiece vocabulary is
# trained here with Gemma's settings: no normalisation, every space kept, no leading space added
GEMMA = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1)
CLIPS["lumina2"] = (comfy.text_encoders.lumina2.LuminaTokenizer, comfy.text_encoders.lumina2.te(),
                    {"gemma2_2b_model_config": GEMMA})
CONTEXT = {"sd1": 32, "sd2": 40, "sdxl": 32 + 48}
# MMDiT: hidden 64·depth with `depth` heads, context from T5's 4096; y = [CLIP-L pooled (32) | CLIP-G pooled (48)]
SD3_DIT = dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2, input_size=None,
               adm_in_channels=32 + 48, num_patches=64, pos_embed_max_size=8, qk_norm="rms",
               x_block_self_attn_layers=[],
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                 "out_features": 128}})


def initialise(module: torch.nn.Module, seed: int, table_std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("token_embedding.weight"):
                value = torch.randn(p.shape, generator=g) * table_std
            elif p.dim() >= 2:
                value = torch.randn(p.shape, generator=g) * 0.1 / max(1.0, p.shape[1] / 16) ** 0.5
                if ".attn2.to_" in name:  # make the text matter: a random UNet otherwise all but ignores it
                    value *= 6
            elif name.endswith("weight"):  # 1-D weights are norm scales (GroupNorm "out.0" included)
                value = torch.ones(p.shape)
            else:
                value = torch.zeros(p.shape)
            p.copy_(value.to(p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("pos_embed"):  # MMDiT's, made with torch.empty and not a parameter
                b.copy_(torch.randn(b.shape, generator=g).to(b.dtype) * 0.02)


@functools.cache
def gemma_tokenizer_model() -> bytes:
    """A SentencePiece model (Gemma's special ids: pad 0, eos 1, bos 2, unk 3) over the words the tests prompt."""
    import io

    import sentencepiece
    from concept_forge.nodes.host.text_side import LUMINA2_SYSTEM_PROMPT
    from concept_forge.trainers.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES

    lines = [LUMINA2_SYSTEM_PROMPT + " <Prompt Start>", "dog cat red square on the beach in a room", "small blue"]
    lines += [t.format("dog") for t in (*OBJECT_TEMPLATES, *STYLE_TEMPLATES)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=GEMMA["vocab_size"], model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
    return model.getvalue()


def tokenizer_data(arch: str) -> dict:
    if arch != "lumina2":
        return {}
    return {"spiece_model": torch.frombuffer(bytearray(gemma_tokenizer_model()), dtype=torch.uint8)}


def tiny_clip(arch: str = "sd1", embedding_directory: str | None = None, dtype: torch.dtype = torch.float32,
              seed: int = 0):
    tokenizer, model, options = CLIPS[arch]
    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model),
                             embedding_directory=[embedding_directory] if embedding_directory else None,
                             tokenizer_data=tokenizer_data(arch), model_options={**options, "dtype": dtype})
        initialise(clip.cond_stage_model, seed)
    return clip


def tiny_model(arch: str = "sd1", v_prediction: bool = False, seed: int = 1):
    if arch in FLOW_MODELS:
        return FLOW_MODELS[arch](seed)
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


def tiny_sd3_model(seed: int = 1):
    """An MMDiT in ComfyUI's SD3 model class (flow matching, shift 3), as load_diffusion_model builds it."""
    config = comfy.supported_models.SD3(dict(SD3_DIT))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        base = config.get_model({})
        initialise(base, seed)
        # make the text matter (as the UNet's attn2 above): 4096 inputs would otherwise shrink its weights to nothing
        base.diffusion_model.context_embedder.weight.mul_(16)
        base.diffusion_model.y_embedder.mlp[0].weight.mul_(4)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_flux_model(seed: int = 1):
    """A Flux.1 dev transformer (guidance embedding, ModelSamplingFlux) in ComfyUI's classes. ComfyUI's detection
    fixes 24 heads and 3072 wide, so the tiny one is built from its config directly."""
    import dataclasses

    import comfy.ldm.flux.model

    config = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TE_L["hidden_size"],
                  context_in_dim=T5_FLUX["d_model"], hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
                  depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                  guidance_embed=True)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []  # ComfyUI 0.8 has it and no default
    flux = comfy.supported_models.Flux(config)
    flux.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        base = flux.get_model({})
        initialise(base, seed)
        base.diffusion_model.txt_in.weight.mul_(4)  # make the text matter, as for the UNets' attn2
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_lumina2_model(seed: int = 1):
    """A Lumina 2 NextDiT (flow matching, shift 6) in ComfyUI's classes; detection fixes its width at 2304, so the
    tiny one is built from its config directly."""
    config = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=GEMMA["hidden_size"],
                  n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[8, 12, 12],
                  axes_lens=[300, 512, 512], multiple_of=16)
    lumina = comfy.supported_models.Lumina2(config)
    lumina.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        base = lumina.get_model({})
        initialise(base, seed)
        base.diffusion_model.cap_embedder[1].weight.mul_(4)  # make the text matter, as for the UNets' attn2
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


FLOW_MODELS = {"sd3": tiny_sd3_model, "flux": tiny_flux_model, "lumina2": tiny_lumina2_model}


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

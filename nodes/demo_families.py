"""Small random-weight models of the flow-matching families (SD 3.5, Flux.1, Lumina 2) in ComfyUI's own classes, for
the example workflows' `--demo` runs and for the tests.

ComfyUI's loaders build these families at their published sizes whatever a file holds (Flux 24 heads of 128, Lumina
2's NextDiT 2304 wide, T5-XXL and Gemma-2-2B from fixed configs; docs/FAMILIES.md §5), so no small file goes through
them. A demo keeps the stock graph (Load Diffusion Model, the CLIP loaders, Load VAE); only the building changes:
inside `family_demo_loaders()`, `comfy.sd.load_diffusion_model` and `comfy.sd.load_clip` build a family's small
model from that family's demo file, and load every other file as always. The VAE is ComfyUI's TAEF1 / TAESD3, built
by the stock Load VAE from random weights in `vae_approx`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..trainers.atomic import write_safetensors
from ..trainers.concept import Arch

FAMILY_DEMO_FILES: dict[Arch, str] = {"sd3": "concept_forge_demo_sd35.safetensors",
                                      "flux": "concept_forge_demo_flux.safetensors",
                                      "lumina2": "concept_forge_demo_lumina2.safetensors"}
FAMILY_VAES: dict[Arch, str] = {"sd3": "taesd3", "flux": "taef1", "lumina2": "taef1"}  # Lumina 2 uses Flux's VAE

TE_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)
TE_G = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=3, projection_dim=16)
# SD 3.5's T5 must keep T5-XXL's width and vocabulary (SD3ClipModel pads CLIP to 4096 and joins T5's tokens); only
# its depth and heads shrink. The table alone is 32128 × 4096 floats (0.5 GB).
T5 = dict(d_ff=32, d_kv=8, num_heads=2, num_layers=2)
# Flux.1's T5 has no fixed width downstream: it shrinks whole (the table stays T5's 32128 rows)
T5_FLUX = dict(d_model=24, d_ff=32, d_kv=8, num_heads=2, num_layers=2)
# Lumina 2's Gemma-2 shrinks whole (head_dim stays Gemma's 256: a class attribute); its SentencePiece vocabulary is
# trained here with Gemma's settings: no normalisation, every space kept, no leading space added
GEMMA = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1)
# MMDiT: hidden 64·depth with `depth` heads, context from T5's 4096; y = [CLIP-L pooled (32) | CLIP-G pooled (48)]
SD3_DIT = dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2, input_size=None,
               adm_in_channels=32 + 48, num_patches=64, pos_embed_max_size=8, qk_norm="rms",
               x_block_self_attn_layers=[],
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                 "out_features": 128}})
FLUX_DIT = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TE_L["hidden_size"],
                context_in_dim=T5_FLUX["d_model"], hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
                depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=True)
LUMINA2_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=GEMMA["hidden_size"],
                   n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[8, 12, 12],
                   axes_lens=[300, 512, 512], multiple_of=16)


def initialise(module: torch.nn.Module, seed: int, table_std: float = 0.1) -> None:
    """Deterministic random weights (comfy.ops skips reset_parameters, which leaves uninitialised memory)."""
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
    """A SentencePiece model (Gemma's special ids: pad 0, eos 1, bos 2, unk 3) over the words the templates use."""
    import sentencepiece

    from ..trainers.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from .host.text_side import LUMINA2_SYSTEM_PROMPT

    lines = [LUMINA2_SYSTEM_PROMPT + " <Prompt Start>", "dog cat red square on the beach in a room", "small blue"]
    lines += [t.format("dog") for t in (*OBJECT_TEMPLATES, *STYLE_TEMPLATES)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=GEMMA["vocab_size"], model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
    return model.getvalue()


def _clip_target(arch: Arch) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """ComfyUI's tokenizer and text model classes for `arch`, their small configs, and the tokenizer's data."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.lumina2
    import comfy.text_encoders.sd3_clip

    if arch == "sd3":
        return (comfy.text_encoders.sd3_clip.SD3Tokenizer, comfy.text_encoders.sd3_clip.sd3_clip(),
                {"clip_l_model_config": TE_L, "clip_g_model_config": TE_G, "t5xxl_model_config": T5}, {})
    if arch == "flux":
        return (comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(),
                {"clip_l_model_config": TE_L, "t5xxl_model_config": T5_FLUX}, {})
    spiece = torch.frombuffer(bytearray(gemma_tokenizer_model()), dtype=torch.uint8)
    return (comfy.text_encoders.lumina2.LuminaTokenizer, comfy.text_encoders.lumina2.te(),
            {"gemma2_2b_model_config": GEMMA}, {"spiece_model": spiece})


def small_clip(arch: Arch, embedding_directory: str | list[str] | None = None, dtype: torch.dtype = torch.float32,
               seed: int = 0, state: dict[str, torch.Tensor] | None = None) -> Any:
    """A CLIP of `arch`'s text encoders at small sizes: random from `seed`, or holding `state`."""
    import comfy.sd
    import comfy.supported_models_base

    tokenizer, model, options, tokenizer_data = _clip_target(arch)
    if isinstance(embedding_directory, str):
        embedding_directory = [embedding_directory]
    with torch.inference_mode():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model),
                             embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             model_options={**options, "dtype": dtype})
        if state is None:
            initialise(clip.cond_stage_model, seed)
        else:
            _load_floats(clip.cond_stage_model, state)
    return clip


def small_model(arch: Arch, seed: int = 1, state: dict[str, torch.Tensor] | None = None) -> Any:
    """A MODEL (ModelPatcher) of `arch`'s transformer at a small size: random from `seed`, or holding `state`."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if arch == "sd3":
        config = comfy.supported_models.SD3(dict(SD3_DIT))
    elif arch == "flux":
        flux = dict(FLUX_DIT)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            flux["txt_ids_dims"] = []  # ComfyUI 0.8 has it and no default
        config = comfy.supported_models.Flux(flux)
    else:
        config = comfy.supported_models.Lumina2(dict(LUMINA2_DIT))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        base = config.get_model({})
        if state is None:
            initialise(base, seed)
            _make_the_text_matter(base.diffusion_model, arch)
        else:
            _load_floats(base, state)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _load_floats(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`state` into `module`: every floating-point tensor must be there (a demo file keeps only those; integer
    buffers such as CLIP's position ids are built by the module itself)."""
    expected = {k for k, v in module.state_dict().items() if v.is_floating_point()}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"this demo file lacks {len(missing)} tensors ({missing[0]}, ...); delete the demo folder "
                         "(--clean-demo) so the next run rebuilds it.")
    module.load_state_dict(state, strict=False)


def _make_the_text_matter(network: torch.nn.Module, arch: Arch) -> None:
    # as the UNets' attn2 in `initialise`: small random projections of the text would all but drown it
    if arch == "sd3":
        network.context_embedder.weight.mul_(16)  # 4096 inputs shrink its weights to nothing otherwise
        network.y_embedder.mlp[0].weight.mul_(4)
    elif arch == "flux":
        network.txt_in.weight.mul_(4)
    else:
        network.cap_embedder[1].weight.mul_(4)


def write_family_demo(folder: str | os.PathLike[str], arch: Arch, seed: int = 0) -> Path:
    """`arch`'s demo file in `folder` (the transformer under `model.`, the text encoders under `clip.`, fp16), unless
    it is there already."""
    path = Path(folder) / FAMILY_DEMO_FILES[arch]
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model, clip = small_model(arch, seed + 1), small_clip(arch, seed=seed)
    # floating-point tensors only, as _load_floats reads them back
    state = {f"model.{k}": v.half() for k, v in model.model.state_dict().items() if v.is_floating_point()}
    state.update({f"clip.{k}": v.half() for k, v in clip.cond_stage_model.state_dict().items()
                  if v.is_floating_point()})
    return write_safetensors(state, path)


def write_demo_vaes(folder: str | os.PathLike[str], seed: int = 0) -> None:
    """Random TAEF1 and TAESD3 weights in `folder` (vae_approx), which the stock Load VAE offers as taef1/taesd3."""
    import comfy.taesd.taesd

    g = torch.Generator().manual_seed(seed)
    for name in sorted(set(FAMILY_VAES.values())):
        autoencoder = comfy.taesd.taesd.TAESD(latent_channels=16)
        for part in ("encoder", "decoder"):
            path = Path(folder) / f"{name}_{part}.safetensors"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            module = getattr(autoencoder, f"taesd_{part}")
            state = {k: torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5 if v.dim() > 1 else
                     torch.zeros(v.shape) for k, v in module.state_dict().items()}
            write_safetensors({k: v.half() for k, v in state.items()}, path)


def demo_family(prompt: dict[str, Any]) -> Arch | None:
    """The flow family whose text encoders an API prompt loads (by its CLIP loaders), or None."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "TripleCLIPLoader":
            return "sd3"
        clip_type = inputs.get("type")
        if kind in ("CLIPLoader", "DualCLIPLoader") and isinstance(clip_type, str) and clip_type in FAMILY_DEMO_FILES:
            return clip_type  # type: ignore[return-value]  # ComfyUI's CLIP types are named as our families
    return None


def demo_file_overrides(arch: Arch) -> dict[str, dict[str, Any]]:
    """Every stock loader of a family workflow pointed at the family's demo file, and Load VAE at its TAESD."""
    file = FAMILY_DEMO_FILES[arch]
    return {"UNETLoader": {"unet_name": file}, "CLIPLoader": {"clip_name": file},
            "DualCLIPLoader": {"clip_name1": file, "clip_name2": file},
            "TripleCLIPLoader": {"clip_name1": file, "clip_name2": file, "clip_name3": file},
            "VAELoader": {"vae_name": FAMILY_VAES[arch]}}


def _family_of(path: Any) -> Arch | None:
    name = os.path.basename(str(path))
    return next((arch for arch, file in FAMILY_DEMO_FILES.items() if file == name), None)


def _part(path: Any, prefix: str) -> dict[str, torch.Tensor]:
    import comfy.utils

    state = comfy.utils.load_torch_file(str(path))
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


@contextlib.contextmanager
def family_demo_loaders() -> Iterator[None]:
    """While open, the stock loaders build a family's small model from its demo file; other files load as always."""
    import comfy.sd

    load_diffusion_model, load_clip = comfy.sd.load_diffusion_model, comfy.sd.load_clip

    def diffusion_model(unet_path: Any, *args: Any, **kwargs: Any) -> Any:
        arch = _family_of(unet_path)
        if arch is None:
            return load_diffusion_model(unet_path, *args, **kwargs)
        return small_model(arch, state=_part(unet_path, "model."))

    def clip(ckpt_paths: Any, embedding_directory: Any = None, *args: Any, **kwargs: Any) -> Any:
        arches = {_family_of(p) for p in ckpt_paths}
        if arches == {None}:
            return load_clip(ckpt_paths, embedding_directory, *args, **kwargs)
        if len(arches) != 1:
            raise ValueError("a demo family's file was loaded beside another file; pick the demo file in every slot "
                             "of the CLIP loader.")
        (arch,) = arches
        return small_clip(arch, embedding_directory, state=_part(ckpt_paths[0], "clip."))

    comfy.sd.load_diffusion_model, comfy.sd.load_clip = diffusion_model, clip
    try:
        yield
    finally:
        comfy.sd.load_diffusion_model, comfy.sd.load_clip = load_diffusion_model, load_clip

"""The ComfyUI host adapter: `trainers.host.Host` on ComfyUI's CLIP, MODEL and VAE.

Every pitfall of training inside ComfyUI (docs/COMFYUI.md §10) is handled here and nowhere else:
- the caller trains inside `torch.inference_mode(False)` and `torch.enable_grad()` (§10.1);
- CLIP and MODEL are cloned; only the clones are patched, and `close()` unloads them so the user's objects
  come back untouched (§10.5);
- the clone's CLIP layers get an out-of-place forward so autograd can pass through them (§10.3, §1.9);
- weights loaded under inference mode get an ordinary copy once, so autograd can save them (§10.2, §2.8);
- `apply_model` takes sigma and returns x0: ε (or v) is derived from it (§10.6, §2.2); SDXL gets its ADM `y`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import comfy.model_management as mm
import comfy.model_sampling
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..trainers.concept import ARCH_LABELS, Arch
from ..trainers.host import TextEncoder
from .residual_attention import ResidualAttention, ResidualEntry

CLIP_ARCHS: dict[str, Arch] = {"SD1ClipModel": "sd1", "SD2ClipModel": "sd2", "SDXLClipModel": "sdxl"}
MODEL_ARCHS: dict[str, Arch] = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                                "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}  # the distilled SDXLs share its CLIP
ENCODER_KEYS: dict[Arch, tuple[str, ...]] = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SLOT_NAME = "concept_forge_slot"


def clip_arch(clip: Any) -> Arch | None:
    return CLIP_ARCHS.get(type(clip.cond_stage_model).__name__)


def model_arch(model: Any) -> Arch | None:
    return MODEL_ARCHS.get(type(model.model.model_config).__name__)


def conditioning_layers(clip: Any) -> dict[str, int]:
    """Per text encoder, the 0-based layer whose output conditions the UNet: the model's default (last, or
    penultimate for SD 2.x/SDXL), or CLIP Set Last Layer's choice — as CLIP.encode_from_tokens sets it."""
    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    layers = {}
    for key in ENCODER_KEYS[clip_arch(clip)]:  # type: ignore[index]
        sub = getattr(model, f"clip_{key}")
        layers[key] = sub.num_layers - 1 if sub.layer == "last" else sub.layer_idx % sub.num_layers
    return layers


def describe_clip(clip: Any) -> str:
    arch = clip_arch(clip)
    return ARCH_LABELS[arch] if arch else type(clip.cond_stage_model).__name__


def detect_arch(model: Any, clip: Any, node: str) -> Arch:
    """The architecture shared by MODEL and CLIP, or a clear error naming the node."""
    if clip is None or model is None:
        raise ValueError(f"{node}: the {'CLIP' if clip is None else 'MODEL'} input is empty; connect the outputs "
                         "of Load Checkpoint.")
    c_arch, m_arch = clip_arch(clip), model_arch(model)
    supported = "SD 1.x, SD 2.x and SDXL"
    if c_arch is None:
        raise ValueError(f"{node}: this CLIP ({type(clip.cond_stage_model).__name__}) is not supported; Concept "
                         f"Forge trains {supported} checkpoints.")
    if m_arch is None:
        raise ValueError(f"{node}: this MODEL ({type(model.model.model_config).__name__}) is not supported; "
                         f"Concept Forge trains {supported} checkpoints.")
    if model.model.concat_keys:
        raise ValueError(f"{node}: this is an inpainting or edit model; learn the concept on the base checkpoint "
                         "(concepts carry over to its inpainting variant).")
    if c_arch != m_arch:
        raise ValueError(f"{node}: the CLIP is {ARCH_LABELS[c_arch]} but the MODEL is {ARCH_LABELS[m_arch]}; "
                         "connect both from the same checkpoint.")
    return c_arch


# -- tokenizer lookups ------------------------------------------------------------------------------------------
Lookup = Callable[[str, str], "Tensor | None"]  # (encoder key, embedding name) → [n, d] vectors or None


def tokenizer_with_lookup(tokenizer: Any, keys: Sequence[str], lookup: Lookup) -> Any:
    """A copy of a ComfyUI tokenizer on which `embedding:<name>` asks `lookup` before the embedding folders.

    The copy is shallow except for the per-encoder sub-tokenizers, which get the override; `CLIP.clone()` shares
    its tokenizer, so the original is never touched (docs/COMFYUI.md §1.6-2). Lookups stack: an earlier override
    stays the fallback of a later one.
    """
    tokenizer = copy.copy(tokenizer)
    for key in keys:
        sub = copy.copy(getattr(tokenizer, f"clip_{key}"))
        sub._try_get_embedding = _lookup_first(key, lookup, sub._try_get_embedding)
        if sub.embedding_directory is None:  # ComfyUI only parses "embedding:" when a folder list exists
            sub.embedding_directory = []
        setattr(tokenizer, f"clip_{key}", sub)
    return tokenizer


TryGet = Callable[[str], tuple[Any, str]]  # SDTokenizer._try_get_embedding: name → (vectors or None, leftover)


def _lookup_first(key: str, lookup: Lookup, fallback: TryGet) -> TryGet:
    def try_get_embedding(embedding_name: str) -> tuple[Any, str]:
        words = embedding_name.split()
        if not words:
            return fallback(embedding_name)
        name, leftover = words[0], " ".join(words[1:])
        # as ComfyUI does: a trailing comma is not part of the name and goes back to the prompt
        for candidate in dict.fromkeys((name, name.rstrip(","))):
            found = lookup(key, _strip_extension(candidate))
            if found is not None:
                rest = name[len(candidate):]
                return found, f"{rest} {leftover}".strip() if rest else leftover
        return fallback(embedding_name)
    return try_get_embedding


def _strip_extension(name: str) -> str:
    for ext in (".safetensors", ".pt", ".bin"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


# -- the host ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    row: int  # which of the concept's vectors goes here


@dataclass
class ComfyCond:
    cross_attn: Tensor      # [B, L, D]
    pooled: Tensor | None   # [B, P]: SDXL's clip_g pooled output, for the ADM vector
    prompts: Sequence[Any]  # the prepared prompts, so a reference path can encode them again


ATTENTION_PROJECTIONS = {  # the tuning encoder's LoRA targets, by option
    "attention q/k/v/out": ("attn1", "attn2"), "attention q/k/v": ("attn1", "attn2"), "cross-attention k/v": ("attn2",),
}


PROJECTION = re.compile(r"(?:^|\.)(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")  # a BasicTransformerBlock's


class Offsets:
    """The weight offsets' current factors, shared by their wrappers: replacing a factor (pretraining predicts new
    ones for every image) needs no reload, and `enabled` turns them all off for the dual path's reference pass."""

    def __init__(self) -> None:
        self.enabled = True
        self.scale = 1.0
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # weight key → (up [out, r], down [r, in])


class LoraDelta:
    """A weight wrapper: W + scale·up@down (docs/COMFYUI.md §2.5), differentiable in up and down."""

    def __init__(self, key: str, offsets: Offsets):
        self.key, self.offsets = key, offsets

    def __call__(self, weight: Tensor) -> Tensor:
        factors = self.offsets.factors.get(self.key)
        if not self.offsets.enabled or factors is None:
            return weight
        up, down = factors
        return weight + (self.offsets.scale * (up @ down)).to(weight)


def _out_of_place_layer_forward(layer: torch.nn.Module) -> Callable[..., Tensor]:
    """CLIPLayer.forward without its in-place residual adds, which autograd cannot pass (docs/COMFYUI.md §1.9)."""
    def forward(x: Tensor, mask: Tensor | None = None, optimized_attention: Any = None) -> Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: Any, **kwargs: Any) -> Tensor:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


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
        self._offsets = Offsets()
        self._reference: tuple[float, Callable[[], Mapping[str, Tensor]]] | None = None
        self.model = model.clone()
        self.clip = clip.clone()
        self.device = self.model.load_device
        self.clip.patcher.load_device = self.device  # the text encoder trains beside the UNet
        self.num_timesteps = len(self.model.get_model_object("model_sampling").sigmas)
        self._sampling = self.model.get_model_object("model_sampling")
        if not isinstance(self._sampling, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(
                self._sampling, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)):
            raise ValueError(f"Only ε- and v-prediction models with a discrete schedule can be trained, this one "
                             f"samples with {type(self._sampling).__name__}.")
        self.v_prediction = isinstance(self._sampling, comfy.model_sampling.V_PREDICTION)
        self._patch_clip()
        self._patch_unet(PRECISIONS[precision], gradient_checkpointing)
        self.encoders = self._text_encoders()
        self._tokenizer = self.clip.tokenizer
        self._adm_sizes: dict[tuple[int, int], Tensor] = {}
        self._loaded = False

    # -- setup and teardown ------------------------------------------------------------------------------------
    def _sub(self, key: str) -> Any:
        return getattr(self.clip.cond_stage_model, f"clip_{key}")

    def _patch_clip(self) -> None:
        patcher = self.clip.patcher
        for key in ENCODER_KEYS[self.arch]:
            for i, layer in enumerate(self._sub(key).transformer.text_model.encoder.layers):
                patcher.add_object_patch(f"clip_{key}.transformer.text_model.encoder.layers.{i}.forward",
                                         _out_of_place_layer_forward(layer))

    def _patch_unet(self, dtype: torch.dtype | None, gradient_checkpointing: bool) -> None:
        base = self.model.model
        if dtype is not None:
            self.model.set_model_compute_dtype(dtype)
        if gradient_checkpointing:
            # ComfyUI's UNet runs a block by iterating over its layers (forward_timestep_embed), never through
            # the block's own forward: the layers are what must be wrapped
            unet = base.diffusion_model
            blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)] + \
                     [("middle_block", unet.middle_block)] + \
                     [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
            for prefix, block in blocks:
                for j in range(len(block)):
                    name = f"diffusion_model.{prefix}.{j}.forward"
                    self.model.add_object_patch(name, _checkpointed(self.model.get_model_object(name)))

    def _text_encoders(self) -> dict[str, TextEncoder]:
        encoders = {}
        for key, layer in conditioning_layers(self.clip).items():
            sub = self._sub(key)
            width = sub.transformer.get_input_embeddings().weight.shape[1]
            encoders[key] = TextEncoder(key, width, sub.num_layers, layer)  # type: ignore[arg-type]
        return encoders

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            # like ComfyUI's Train LoRA: evict everything else and load both models whole
            mm.load_models_gpu([self.clip.patcher, self.model], memory_required=1e20, force_full_load=True)
            _saveable_weights(self.clip.cond_stage_model)
            _saveable_weights(self.model.model)
            self._loaded = True

    def close(self) -> None:
        """Unload the patched clones so the next user of these models gets them unpatched."""
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

    # -- Host ---------------------------------------------------------------------------------------------------
    def token_ids(self, key: str, text: str) -> list[int]:
        return list(getattr(self._tokenizer, f"clip_{key}").tokenizer(text)["input_ids"][1:-1])

    def vocabulary(self, key: str) -> Tensor:
        return self._sub(key).transformer.get_input_embeddings().weight

    def patch_self_attention(self, residuals: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
                             mask_bias: float) -> None:
        for key, layers in residuals.items():
            for i, (keys, values) in layers.items():
                attention = self._sub(key).transformer.text_model.encoder.layers[i].self_attn
                entry = ResidualEntry(keys, values, mask_bias, None)
                self.clip.patcher.add_object_patch(f"clip_{key}.transformer.text_model.encoder.layers.{i}.self_attn"
                                                   ".forward", ResidualAttention(attention, [entry]))
        self._loaded = False  # object patches are applied when the model loads

    def prepare_prompt(self, text: str, num_vectors: int = 0) -> dict[str, list[list[Any]]]:
        """Tokenise once with a marker in the `{}` slot; `encode` swaps the marker rows for the vectors."""
        markers = {k: torch.zeros(num_vectors, e.width) for k, e in self.encoders.items()}
        tokenizer = tokenizer_with_lookup(self._tokenizer, list(self.encoders),
                                          lambda key, name: markers[key] if name == SLOT_NAME else None)
        if "{}" in text and not num_vectors:
            raise ValueError(f"prompt {text!r} has a concept slot but the method injects no vectors.")
        tokens = tokenizer.tokenize_with_weights(text.replace("{}", f" embedding:{SLOT_NAME} "), disable_weights=True)
        prepared = {}
        for key in self.encoders:
            storage = markers[key].untyped_storage().data_ptr()
            width = self.encoders[key].width
            prepared[key] = [[_Slot(item.storage_offset() // width)
                              if torch.is_tensor(item) and item.untyped_storage().data_ptr() == storage else item
                              for item, _weight in chunk] for chunk in tokens[key]]
        return prepared

    def encode(self, prompts: Sequence[Mapping[str, list[list[Any]]]], vectors: Mapping[str, Tensor]) -> ComfyCond:
        self._ensure_loaded()
        conditioning_layers(self.clip)  # sets the layer options, as CLIP.encode_from_tokens does
        outputs = {}
        for key in self.encoders:
            chunks = [[vectors[key][item.row] if isinstance(item, _Slot) else item for item in chunk]
                      for prompt in prompts for chunk in prompt[key]]
            outputs[key] = self._sub(key).encode(chunks)[:2]                         # [chunks, 77, d], pooled
        if self.arch == "sdxl":
            (l_out, _), (g_out, pooled) = outputs["l"], outputs["g"]
            cut = min(l_out.shape[1], g_out.shape[1])
            hidden = torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1)
        else:
            hidden, pooled = next(iter(outputs.values()))
            pooled = None
        counts = [len(prompt[next(iter(self.encoders))]) for prompt in prompts]
        return ComfyCond(*_batch_prompts(hidden, pooled, counts), prompts)

    def unet_targets(self, kind: str) -> list[tuple[str, int, int]]:
        if kind not in ATTENTION_PROJECTIONS:
            raise ValueError(f"targets must be one of {', '.join(ATTENTION_PROJECTIONS)}, got {kind!r}.")
        projections = {"to_k", "to_v"} if kind == "cross-attention k/v" else {"to_q", "to_k", "to_v"}
        if kind == "attention q/k/v/out":
            projections.add("to_out.0")
        targets = []
        for name, module in self.model.model.diffusion_model.named_modules():
            found = PROJECTION.search(name)
            if found and found.group(1) in ATTENTION_PROJECTIONS[kind] and found.group(2) in projections:
                out_features, in_features = module.weight.shape
                targets.append((f"diffusion_model.{name}.weight", int(out_features), int(in_features)))
        return targets

    def wrap_unet_weights(self, offsets: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
        for key in offsets.keys() - self._offsets.factors.keys():
            self.model.add_weight_wrapper(key, LoraDelta(key, self._offsets))
            self._loaded = False  # new wrappers are installed when the model loads
        self._offsets.factors.update(offsets)
        self._offsets.scale = scale

    def set_reference(self, blend: float, vectors: Callable[[], Mapping[str, Tensor]]) -> None:
        self._reference = (blend, vectors)

    def image_features(self, images: Tensor) -> Tensor:
        if self.clip_vision is None:
            raise ValueError("image features need a CLIP vision model; connect a CLIP_VISION.")
        with torch.no_grad():
            features = self.clip_vision.encode_image(images[..., :3], crop=True)["penultimate_hidden_states"]
        self._loaded = False  # the vision model may have pushed ours out of memory
        return features.to(self.device, torch.float32)

    @torch.no_grad()
    def unet_features(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        self._ensure_loaded()
        blocks: list[Tensor] = []

        def capture(h: Tensor, transformer_options: Any) -> Tensor:
            blocks.append(h.float().mean(dim=(-2, -1)))                                    # [B, C]
            return h

        empty = self.encode([self.prepare_prompt("", 0)] * len(latents), {})
        options = self.model.model_options.get("transformer_options", {})
        patches = {**options.get("patches", {})}
        patches["input_block_patch"] = [*patches.get("input_block_patch", []), capture]
        self._offsets.enabled = False  # the features describe the image to the base UNet, without any offsets
        try:
            self._predict(latents, empty, noise, timesteps, {**options, "patches": patches})
        finally:
            self._offsets.enabled = True
        return torch.cat(blocks, dim=-1)

    def encode_images(self, images: Tensor) -> Tensor:
        with torch.no_grad():  # the VAE's weights are inference tensors and need no gradient
            latents = self.vae.encode(images[..., :3])
        self._loaded = False  # the VAE may have pushed our models out of memory
        return self.model.model.process_latent_in(latents).to(self.device)

    def _predict(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor,
                 transformer_options: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """The noisy latent x0 + σ·ε, σ, and the UNet's x0 prediction at the discrete `timesteps`."""
        sampling = self._sampling
        sigma = sampling.sigma(timesteps.float())                                    # [B]
        noisy = sampling.noise_scaling(sigma, noise, latents)
        extra = {}
        if cond.pooled is not None:
            extra["y"] = self._adm(cond.pooled, latents.shape[-2] * 8, latents.shape[-1] * 8)
        options = {**transformer_options, "cond_or_uncond": [0] * len(latents), "sigmas": sigma}
        denoised = self.model.model.apply_model(noisy, sigma, c_crossattn=cond.cross_attn,
                                                transformer_options=options, **extra)
        return noisy, sigma, denoised

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
            return [[cond.cross_attn, extra]]

        channels = self.model.model.latent_format.latent_channels
        latent = torch.zeros(1, channels, size // 8, size // 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        samples = comfy.sample.sample(self.model, noise, steps, cfg, "euler", "normal", conditioning(prompt, vectors),
                                      conditioning("", {}), latent, seed=seed, disable_pbar=True)
        image = self.vae.decode(samples)
        self._loaded = False  # sampling and decoding may have moved our models
        return image[:1]

    def loss(self, latents: Tensor, cond: ComfyCond, noise: Tensor, timesteps: Tensor,
             mask: Tensor | None = None) -> Tensor:
        self._ensure_loaded()
        options = self.model.model_options.get("transformer_options", {})
        noisy, sigma, denoised = self._predict(latents, cond, noise, timesteps, options)
        if self._reference is not None:  # the dual path: blend in the UNet without offsets on the hard tokens
            blend, vectors = self._reference
            with torch.no_grad():
                reference = self.encode(cond.prompts, vectors())
                self._offsets.enabled = False
                try:
                    reference_denoised = self._predict(latents, reference, noise, timesteps, options)[2]
                finally:
                    self._offsets.enabled = True
            denoised = blend * denoised + (1 - blend) * reference_denoised
        eps = (noisy - denoised) / sigma.view(-1, 1, 1, 1)
        err = (eps.float() - noise.float()) ** 2                                     # [B, C, h, w]
        if mask is None:
            per_sample = err.mean(dim=(1, 2, 3))
        else:
            weights = mask[:, None].to(err).expand_as(err)
            per_sample = (err * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
        if self.v_prediction:
            # v − v̂ = (σ² + σ_d²)^½ / σ_d · (ε − ε̂): the v-MSE is the ε-MSE reweighted per sample
            sd = float(self._sampling.sigma_data)
            per_sample = per_sample * (sigma.float() ** 2 + sd ** 2) / sd ** 2
        return per_sample


def _batch_prompts(hidden: Tensor, pooled: Tensor | None, counts: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Per-chunk encoder outputs → one conditioning per prompt, stacked.

    ComfyUI concatenates a long prompt's 77-token chunks; prompts of different lengths are repeated to a common
    length, as its sampler batches them (CONDCrossAttn.concat). The pooled output is the first chunk's.
    """
    if all(c == 1 for c in counts):
        return hidden, pooled
    starts = [sum(counts[:i]) for i in range(len(counts))]
    per_prompt = [hidden[s:s + c].reshape(1, -1, hidden.shape[-1]) for s, c in zip(starts, counts, strict=True)]
    common = math.lcm(*(p.shape[1] for p in per_prompt))
    stacked = torch.cat([p.repeat(1, common // p.shape[1], 1) for p in per_prompt])
    return stacked, None if pooled is None else pooled[starts]

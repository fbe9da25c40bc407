"""The text side: tokens with a concept slot, the vocabulary, the layer whose output conditions the denoiser, and a
differentiable encode (docs/COMFYUI.md §1), for every encoder ComfyUI builds on `SDClipModel` (CLIP and T5).

A family differs in how its encoders' outputs make one conditioning (`COMBINE`): SD 1.x/2.x and Lumina 2 use theirs
alone, SDXL joins CLIP-L and CLIP-G along the width, SD 3.5 also pads them to T5's width and appends T5's tokens,
Flux.1 conditions on T5's tokens and CLIP-L's pooled vector; and in what its prompt node wraps around the user's
prompt (`PROMPT_FORMATS`): Lumina 2's node puts a system prompt first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...trainers.concept import ENCODER_NAMES, ENCODER_WIDTHS, Arch
from ...trainers.host import TextEncoder
from ..residual_attention import ResidualAttention, ResidualEntry
from .embedding_lookup import tokenizer_with_lookup
from .families import SD_ONLY, encoder_keys

SLOT_NAME = "concept_forge_slot"
# what the family's own prompt node sends for a prompt `p`: CLIPTextEncodeLumina2 with its default system prompt
# ("superior"), which ComfyUI's Lumina 2 workflows use; a concept learned so transfers to the other system prompt
LUMINA2_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                         "image-text alignment based on textual prompts or user prompts.")
PROMPT_FORMATS: dict[Arch, Callable[[str], str]] = {"lumina2": lambda p: f"{LUMINA2_SYSTEM_PROMPT} <Prompt Start> {p}"}


def conditioning_layers(clip: Any) -> dict[str, int]:
    """Per text encoder, the 0-based layer whose output conditions the UNet: the model's default (last, or
    penultimate for SD 2.x/SDXL), or CLIP Set Last Layer's choice — as CLIP.encode_from_tokens sets it."""
    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    layers = {}
    for key in encoder_keys(clip):
        sub = getattr(model, ENCODER_NAMES[key])
        layers[key] = sub.num_layers - 1 if sub.layer == "last" else sub.layer_idx % sub.num_layers
    return layers


@dataclass(frozen=True)
class _Slot:
    row: int  # which of the concept's vectors goes here


@dataclass
class ComfyCond:
    cross_attn: Tensor      # [B, L, D]
    pooled: Tensor | None   # [B, P]: SDXL's clip_g pooled output, for the ADM vector
    prompts: Sequence[Any]  # the prepared prompts, so a reference path can encode them again
    lengths: Sequence[int]  # each prompt's own token count (`cross_attn` repeats or pads shorter ones to L)


def _out_of_place_layer_forward(layer: torch.nn.Module) -> Callable[..., Tensor]:
    """CLIPLayer.forward without its in-place residual adds, which autograd cannot pass (docs/COMFYUI.md §1.9)."""
    def forward(x: Tensor, mask: Tensor | None = None, optimized_attention: Any = None) -> Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def _out_of_place_t5_attention(layer: torch.nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """T5LayerSelfAttention.forward without its in-place residual add (`x += output`)."""
    def forward(x: Tensor, mask: Tensor | None = None, past_bias: Any = None,
                optimized_attention: Any = None) -> tuple[Tensor, Any]:
        out, past_bias = layer.SelfAttention(layer.layer_norm(x), mask=mask, past_bias=past_bias,
                                             optimized_attention=optimized_attention)
        return x + out, past_bias
    return forward


def _out_of_place_t5_feed_forward(layer: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """T5LayerFF.forward without its in-place residual add."""
    def forward(x: Tensor) -> Tensor:
        return x + layer.DenseReluDense(layer.layer_norm(x))
    return forward


def _out_of_place_patches(name: str, sub: Any) -> dict[str, Callable[..., Any]]:
    """Object patches (relative to the CLIP model) that let autograd through encoder `name`'s layers."""
    if name == "gemma2_2b":  # ComfyUI's Llama-family blocks add their residuals out of place already
        return {}
    if name == "t5xxl":
        patches = {}
        for i, block in enumerate(sub.transformer.encoder.block):
            attention, feed_forward = block.layer[0], block.layer[-1]
            patches[f"{name}.transformer.encoder.block.{i}.layer.0.forward"] = _out_of_place_t5_attention(attention)
            patches[f"{name}.transformer.encoder.block.{i}.layer.{len(block.layer) - 1}.forward"] = \
                _out_of_place_t5_feed_forward(feed_forward)
        return patches
    return {f"{name}.transformer.text_model.encoder.layers.{i}.forward": _out_of_place_layer_forward(layer)
            for i, layer in enumerate(sub.transformer.text_model.encoder.layers)}


Encoded = tuple[Tensor, "Tensor | None"]   # one prompt's per-chunk outputs [chunks, L, d] and pooled [chunks, P]


def _alone(outputs: Mapping[str, Encoded]) -> Encoded:
    (hidden, _pooled), = outputs.values()
    return hidden.reshape(1, -1, hidden.shape[-1]), None


def _clip_pair(outputs: Mapping[str, Encoded]) -> tuple[Tensor, Tensor]:
    """CLIP-L and CLIP-G side by side along the width, per chunk, and CLIP-G's first pooled output."""
    (l_out, _), (g_out, pooled) = outputs["l"], outputs["g"]
    cut = min(l_out.shape[1], g_out.shape[1])
    return torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1), pooled


def _sdxl(outputs: Mapping[str, Encoded]) -> Encoded:
    hidden, pooled = _clip_pair(outputs)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled[:1]  # type: ignore[index]


T5_WIDTH = ENCODER_WIDTHS["t5xxl"]


def _sd3(outputs: Mapping[str, Encoded]) -> Encoded:
    """As SD3ClipModel.encode_token_weights: [CLIP-L | CLIP-G] zero-padded to T5's width, then T5's tokens; the
    pooled output is [CLIP-L's | CLIP-G's]. An encoder the checkpoint lacks contributes zeros, as there."""
    parts, pooled = [], []
    if "l" in outputs or "g" in outputs:
        ref = next(iter(outputs.values()))[0]
        if "l" in outputs and "g" in outputs:
            lg = _clip_pair(outputs)[0]
        else:
            key = "l" if "l" in outputs else "g"
            lg = F.pad(outputs[key][0], (0, 0) if key == "l" else (ENCODER_WIDTHS["l"], 0))
        lg = F.pad(lg, (0, T5_WIDTH - lg.shape[-1]))
        parts.append(lg.reshape(1, -1, T5_WIDTH))
        for key in ("l", "g"):
            found = outputs.get(key)
            pooled.append(found[1][:1] if found is not None else ref.new_zeros(1, ENCODER_WIDTHS[key]))  # type: ignore[index]
    if "t5xxl" in outputs:
        t5 = outputs["t5xxl"][0]
        parts.append(t5.reshape(1, -1, t5.shape[-1]))
    hidden = torch.cat(parts, dim=-2)
    if not pooled:  # T5 alone: SD3ClipModel's zero pooled vector
        pooled = [hidden.new_zeros(1, ENCODER_WIDTHS["l"] + ENCODER_WIDTHS["g"])]
    return hidden, torch.cat(pooled, dim=-1)


def _flux(outputs: Mapping[str, Encoded]) -> Encoded:
    """As FluxClipModel.encode_token_weights: T5's tokens condition, CLIP-L only gives the pooled vector `y`."""
    t5 = outputs["t5xxl"][0]
    return t5.reshape(1, -1, t5.shape[-1]), outputs["l"][1][:1]  # type: ignore[index]


COMBINE: dict[Arch, Callable[[Mapping[str, Encoded]], Encoded]] = {"sd1": _alone, "sd2": _alone, "sdxl": _sdxl,
                                                                  "sd3": _sd3, "flux": _flux, "lumina2": _alone}


# Gemma's encode returns an attention mask, from which Lumina2.extra_conds takes the caption's length
CONDITIONING_EXTRAS: dict[Arch, Callable[[ComfyCond], dict[str, Tensor]]] = {
    "lumina2": lambda cond: {"attention_mask": torch.ones(cond.cross_attn.shape[:2], dtype=torch.long)}}


def _with_slot_name(text: str) -> str:
    """`{}` → `embedding:<slot>`, spaced only where the prompt parser needs a space (after a word, before the next
    word), so the words around it reach the tokenizer exactly as a user's `embedding:` prompt sends them — Gemma's
    tokenizer, unlike CLIP's, keeps every space."""
    text = re.sub(r"(?<=\S)\{\}", " {}", text)
    text = re.sub(r"\{\}(?=[^\s,])", "{} ", text)
    return text.replace("{}", f"embedding:{SLOT_NAME}")


class TextSide:
    """The text side on a clone of the user's CLIP; patches go to the clone's patcher, which the host loads."""

    def __init__(self, clip: Any, arch: Arch):
        self.clip, self.arch = clip, arch
        for key in encoder_keys(clip):
            for name, patch in _out_of_place_patches(ENCODER_NAMES[key], self._sub(key)).items():
                clip.patcher.add_object_patch(name, patch)
        self.encoders = {}
        for key, layer in conditioning_layers(clip).items():
            sub = self._sub(key)
            width = sub.transformer.get_input_embeddings().weight.shape[1]
            self.encoders[key] = TextEncoder(key, width, sub.num_layers, layer)  # type: ignore[arg-type]
        self._tokenizer = clip.tokenizer

    def _sub(self, key: str) -> Any:
        return getattr(self.clip.cond_stage_model, ENCODER_NAMES[key])

    def token_ids(self, key: str, text: str) -> list[int]:
        """The ids of `text` as a word of a prompt: after a space, which CLIP and T5 drop and Gemma's tokenizer (no
        leading space of its own) reads as the word's start, "▁dog" rather than the inner-word "dog"."""
        sub = getattr(self._tokenizer, ENCODER_NAMES[key])
        end = -1 if sub.tokenizer_adds_end_token else None  # T5 adds no start token, CLIP both
        return list(sub.tokenizer(" " + text)["input_ids"][sub.tokens_start:end])

    def conditioning_extras(self, cond: ComfyCond) -> dict[str, Tensor]:
        """What ComfyUI's text encode returns beside the conditioning of one prompt, for its sampler."""
        return CONDITIONING_EXTRAS.get(self.arch, lambda c: {})(cond)

    def vocabulary(self, key: str) -> Tensor:
        return self._sub(key).transformer.get_input_embeddings().weight

    def patch_self_attention(self, residuals: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
                             mask_bias: float) -> None:
        for key, layers in residuals.items():
            for i, (keys, values) in layers.items():
                attention = self._sub(key).transformer.text_model.encoder.layers[i].self_attn
                entry = ResidualEntry(keys, values, mask_bias, None)
                self.clip.patcher.add_object_patch(f"{ENCODER_NAMES[key]}.transformer.text_model.encoder.layers.{i}"
                                                   ".self_attn.forward", ResidualAttention(attention, [entry]))

    def prepare_prompt(self, text: str, num_vectors: int = 0) -> dict[str, list[list[Any]]]:
        """Tokenise once with a marker in the `{}` slot; `encode` swaps the marker rows for the vectors."""
        markers = {k: torch.zeros(num_vectors, e.width) for k, e in self.encoders.items()}
        tokenizer = tokenizer_with_lookup(self._tokenizer, list(self.encoders),
                                          lambda key, name: markers[key] if name == SLOT_NAME else None)
        if "{}" in text and not num_vectors:
            raise ValueError(f"prompt {text!r} has a concept slot but the method injects no vectors.")
        text = _with_slot_name(text)
        if self.arch in PROMPT_FORMATS:
            text = PROMPT_FORMATS[self.arch](text)
        tokens = tokenizer.tokenize_with_weights(text, disable_weights=True)
        prepared = {}
        for key in self.encoders:
            storage = markers[key].untyped_storage().data_ptr()
            width = self.encoders[key].width
            prepared[key] = [[_Slot(item.storage_offset() // width)
                              if torch.is_tensor(item) and item.untyped_storage().data_ptr() == storage else item
                              for item, _weight in chunk] for chunk in tokens[key]]
        return prepared

    def encode(self, prompts: Sequence[Mapping[str, list[list[Any]]]], vectors: Mapping[str, Tensor]) -> ComfyCond:
        """Differentiable in `vectors`; the models must be loaded (the host does it)."""
        conditioning_layers(self.clip)  # sets the layer options, as CLIP.encode_from_tokens does
        per_prompt: list[dict[str, Encoded]] = [{} for _ in prompts]
        for key in self.encoders:
            chunks = [[[vectors[key][item.row] if isinstance(item, _Slot) else item for item in chunk]
                       for chunk in prompt[key]] for prompt in prompts]
            flat = [chunk for prompt_chunks in chunks for chunk in prompt_chunks]
            if len({len(chunk) for chunk in flat}) == 1:   # one batch (CLIP's 77-token chunks always are)
                hidden, pooled = self._sub(key).encode(flat)[:2]
                start = 0
                for i, prompt_chunks in enumerate(chunks):
                    end = start + len(prompt_chunks)
                    per_prompt[i][key] = (hidden[start:end], None if pooled is None else pooled[start:end])
                    start = end
            else:                                          # T5 prompts of different lengths: one at a time
                for i, prompt_chunks in enumerate(chunks):
                    hidden, pooled = self._sub(key).encode(prompt_chunks)[:2]
                    per_prompt[i][key] = (hidden, pooled)
        combined = [COMBINE[self.arch](outputs) for outputs in per_prompt]
        stack = _repeat_to_common_length if self.arch in SD_ONLY else _pad_to_longest
        hidden, pooled = stack([h for h, _ in combined]), [p for _, p in combined]
        return ComfyCond(hidden, None if pooled[0] is None else torch.cat(pooled), prompts,  # type: ignore[arg-type]
                         [h.shape[1] for h, _ in combined])


def _repeat_to_common_length(hidden: Sequence[Tensor]) -> Tensor:
    """One conditioning [1, L_i, D] per prompt → [B, L, D] for a UNet: prompts of different lengths (CLIP's 77-token
    chunks) are repeated to a common length, as ComfyUI's sampler batches them (CONDCrossAttn.concat)."""
    common = math.lcm(*(h.shape[1] for h in hidden))
    return torch.cat([h.repeat(1, common // h.shape[1], 1) for h in hidden])


def _pad_to_longest(hidden: Sequence[Tensor]) -> Tensor:
    """One conditioning [1, L_i, D] per prompt → [B, L, D] for a flow transformer, which predicts each prompt at its
    own length (`ComfyCond.lengths`): zeros after each prompt, never read. (Gemma's prompts are all of different
    lengths: a common multiple of them would be thousands of tokens.)"""
    longest = max(h.shape[1] for h in hidden)
    return torch.cat([F.pad(h, (0, 0, 0, longest - h.shape[1])) for h in hidden])

"""The text side of the CLIP families (SD 1.x, SD 2.x, SDXL): tokens with a concept slot, the vocabulary, the layer
whose output conditions the denoiser, and a differentiable encode (docs/COMFYUI.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...trainers.concept import Arch
from ...trainers.host import TextEncoder
from ..residual_attention import ResidualAttention, ResidualEntry
from .embedding_lookup import tokenizer_with_lookup
from .families import ENCODER_KEYS, clip_arch

SLOT_NAME = "concept_forge_slot"


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


@dataclass(frozen=True)
class _Slot:
    row: int  # which of the concept's vectors goes here


@dataclass
class ComfyCond:
    cross_attn: Tensor      # [B, L, D]
    pooled: Tensor | None   # [B, P]: SDXL's clip_g pooled output, for the ADM vector
    prompts: Sequence[Any]  # the prepared prompts, so a reference path can encode them again


def _out_of_place_layer_forward(layer: torch.nn.Module) -> Callable[..., Tensor]:
    """CLIPLayer.forward without its in-place residual adds, which autograd cannot pass (docs/COMFYUI.md §1.9)."""
    def forward(x: Tensor, mask: Tensor | None = None, optimized_attention: Any = None) -> Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


class ClipText:
    """The text side on a clone of the user's CLIP; patches go to the clone's patcher, which the host loads."""

    def __init__(self, clip: Any, arch: Arch):
        self.clip, self.arch = clip, arch
        patcher = clip.patcher
        for key in ENCODER_KEYS[arch]:
            for i, layer in enumerate(self._sub(key).transformer.text_model.encoder.layers):
                patcher.add_object_patch(f"clip_{key}.transformer.text_model.encoder.layers.{i}.forward",
                                         _out_of_place_layer_forward(layer))
        self.encoders = {}
        for key, layer in conditioning_layers(clip).items():
            sub = self._sub(key)
            width = sub.transformer.get_input_embeddings().weight.shape[1]
            self.encoders[key] = TextEncoder(key, width, sub.num_layers, layer)  # type: ignore[arg-type]
        self._tokenizer = clip.tokenizer

    def _sub(self, key: str) -> Any:
        return getattr(self.clip.cond_stage_model, f"clip_{key}")

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
        """Differentiable in `vectors`; the models must be loaded (the host does it)."""
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

"""CatVersion nodes: CatVersion Options and CatVersion Residual (docs/METHODS.md §5)."""

from __future__ import annotations

import math
import re
from typing import Any

from comfy_api.v0_0_2 import io, ui

from ..trainers.concept import Concept
from ..trainers.methods import catversion
from .apply import check_concept_fits, encoder_tables
from .host import conditioning_layers
from .residual_attention import ActivatingEncode, ResidualAttention, ResidualEntry, tokenizer_tagging
from .types import CATEGORY, OPTIONS_CATEGORY, ConceptIO, MethodOptionsIO
from .validation import schema_problem

RESIDUAL = "CatVersion Residual"
LAYER = "clip_{key}.transformer.text_model.encoder.layers.{layer}"


def mentions(concept: Concept) -> re.Pattern[str]:
    """Prompts that name the concept: its class word or its name, as whole words."""
    words = {concept.state["class_word"], concept.name}
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE)


def residual_clip(clip: Any, concept: Concept, strength: float, apply_to_negative: bool) -> tuple[Any, str]:
    """A clone of `clip` whose patched layers carry the concept's residual keys and values, and a note on it.

    Strength multiplies the residual keys' attention weight (a logit bias of log strength): 0 leaves the CLIP
    exactly as it was, 1 is the trained concept. Residuals already on the CLIP (a chained CatVersion Residual)
    stay, so several concepts compose. Without `apply_to_negative` only prompts that mention the class word or
    the concept's name get the residual, as in the official inference, whose negative prompt never had it.
    """
    patched = clip.clone()
    if strength == 0:
        return patched, f"{concept.name}: strength 0, the CLIP is unchanged."
    residuals = catversion.residuals_of(concept)
    tables = encoder_tables(clip)
    for key, layers in residuals.items():
        count = len(getattr(clip.cond_stage_model, f"clip_{key}").transformer.text_model.encoder.layers)
        width = next(iter(layers.values()))[0].shape[-1]
        if width != tables[key].shape[1] or max(layers) >= count:
            raise ValueError(f"{RESIDUAL}: concept '{concept.name}' has {width}-wide residuals up to layer "
                             f"{max(layers)} for clip_{key}, but this CLIP's is {tables[key].shape[1]}-wide with "
                             f"{count} layers; it belongs to another model.")
    bias = concept.state["mask_bias"] + math.log(strength)
    for key, layers in residuals.items():
        for layer, (keys, values) in layers.items():
            name = LAYER.format(key=key, layer=layer) + ".self_attn.forward"
            existing = patched.patcher.object_patches.get(name)
            entries = existing.entries if isinstance(existing, ResidualAttention) else []
            attention = patched.patcher.get_model_object(LAYER.format(key=key, layer=layer) + ".self_attn")
            entry = ResidualEntry(keys, values, bias, concept.name)
            patched.patcher.add_object_patch(name, ResidualAttention(attention, [*entries, entry]))
    encode = patched.patcher.get_model_object("encode_token_weights")
    if not isinstance(encode, ActivatingEncode):
        patched.patcher.add_object_patch("encode_token_weights", ActivatingEncode(encode))
    pattern = mentions(concept)
    patched.tokenizer = tokenizer_tagging(clip.tokenizer, concept.name,
                                          lambda text: apply_to_negative or bool(pattern.search(text)))
    note = [f"{concept.name}: residual on " + ", ".join(f"clip_{k} layers {min(v)}–{max(v)}"
                                                          for k, v in residuals.items()) + f", strength {strength:g}."]
    note.append("Applied to every prompt." if apply_to_negative else
                f"Applied to prompts that mention '{concept.state['class_word']}' or '{concept.name}'.")
    return patched, "\n".join(note + _skipped_layers(patched, residuals))


def _skipped_layers(clip: Any, residuals: catversion.Residuals) -> list[str]:
    """Warn when the CLIP conditions on an earlier layer (CLIP skip) than the concept was trained for."""
    lines = []
    used = conditioning_layers(clip)
    for key, layers in residuals.items():
        beyond = [i for i in layers if i > used[key]]
        if beyond:
            lines.append(f"Warning: this CLIP conditions on clip_{key} layer {used[key]}, so the residual of layer(s) "
                         f"{beyond} has no effect (the concept was learned with another CLIP skip).")
    return lines


class CatVersionOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeCatVersionOptions",
            display_name="CatVersion Options",
            category=OPTIONS_CATEGORY,
            description="CatVersion settings for Learn Concept (method catversion).",
            inputs=[
                io.Int.Input("num_layers", default=3, min=1, max=32, tooltip="How many of the last self-attention "
                             "layers (counted back from the layer the UNet is conditioned on) get residuals. The "
                             "paper uses 3."),
                io.Int.Input("tokens", default=1, min=1, max=16, tooltip="Residual key/value tokens per layer. The "
                             "paper uses 1."),
                io.Float.Input("mask_bias", default=0.0, min=-10.0, max=10.0, step=0.1, tooltip="Logit bias of the "
                               "residual keys. 0 is neutral; 1 reproduces the official code, which adds it by "
                               "accident."),
                io.Float.Input("init_scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="Standard deviation "
                               "of the residuals' random start (official: 1)."),
            ],
            outputs=[MethodOptionsIO.Output("method_options", display_name="method_options",
                                            tooltip="Connect to Learn Concept with method catversion.")],
        )

    @classmethod
    def validate_inputs(cls, mask_bias: float = 0.0, init_scale: float = 1.0) -> bool | str:
        return schema_problem(cls, "CatVersion Options", mask_bias=mask_bias, init_scale=init_scale) or True

    @classmethod
    def execute(cls, num_layers, tokens, mask_bias, init_scale) -> io.NodeOutput:
        return io.NodeOutput(catversion.Options(num_layers=num_layers, tokens=tokens, mask_bias=mask_bias,
                                                init_scale=init_scale))


class CatVersionResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeCatVersionResidual",
            display_name=RESIDUAL,
            category=CATEGORY,
            description="Patches a CLIP clone so its last self-attention layers carry a CatVersion concept; "
                        "prompt with the class word.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint the concept was learned on."),
                ConceptIO.Input("concept", tooltip="A CatVersion concept from Learn Concept or Load Concept."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, tooltip="Scales the residual "
                               "keys' attention weight. 0 returns the CLIP unchanged, 1 the concept as trained."),
                io.Boolean.Input("apply_to_negative", default=False, tooltip="Off (as the official code): only "
                                 "prompts that mention the class word or the concept's name get the residual, so "
                                 "the negative prompt stays as it was. On: every prompt encoded with this CLIP."),
            ],
            outputs=[io.Clip.Output("concept_clip", display_name="clip",
                                    tooltip="The CLIP to connect to CLIP Text Encode; chain another CatVersion "
                                    "Residual to combine concepts.")],
        )

    @classmethod
    def validate_inputs(cls, strength: float = 1.0) -> bool | str:
        return schema_problem(cls, RESIDUAL, strength=strength) or True

    @classmethod
    def execute(cls, clip, concept, strength, apply_to_negative) -> io.NodeOutput:
        if concept.method != "catversion":
            raise ValueError(f"{RESIDUAL}: '{concept.name}' is a {concept.method} concept; connect it to Apply DTI "
                             "Token instead.")
        check_concept_fits(concept, clip, RESIDUAL)
        patched, note = residual_clip(clip, concept, strength, apply_to_negative)
        return io.NodeOutput(patched, ui=ui.PreviewText(note))


NODES = [CatVersionResidual, CatVersionOptions]

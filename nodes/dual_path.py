"""Tuning Encoder Dual Path: DATE's dual path at generation (docs/METHODS.md §6.2).

Every attention block of the UNet computes α·(the prompt with the concept's token, the weights with its offsets) +
(1 − α)·(the same prompt with the token's nearest real words, the original weights) — the blend the concept was
tuned (and its encoder pretrained) under, which keeps the prompt's other words in charge of the picture.

The hard prompt has to reach the attention blocks beside the soft one. This node encodes both from its own text,
returns the soft one as the positive conditioning, and gives the model a function wrapper that, per chunk of each
sampling batch, swaps in the hard context where the chunk is that soft conditioning (repeated as the sampler pads
it) and uses the chunk's own context elsewhere (the negative prompt: original weights on the same words).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from comfy_api.v0_0_2 import io
from torch import Tensor

from ..trainers.concept import Concept
from ..trainers.tuning_encoder import hard_rows
from .apply import apply_concepts, check_concept_fits, encoder_tables
from .host.weight_offsets import DUAL_PATH, Offsets, patch_dual_path, wrap_weights
from .tuning import OFFSETS_MARK, lora_of, model_with_offsets
from .types import CATEGORY, ConceptIO
from .validation import schema_problem

NODE = "Tuning Encoder Dual Path"


def offset_factors(concept: Concept) -> dict[str, tuple[Tensor, Tensor]]:
    """The concept's offsets as weight key → (up·alpha/rank, down), what stock LoRA loading adds to each weight."""
    lora, factors = lora_of(concept), {}
    for key in (k for k in lora if k.endswith(".lora_up.weight")):
        prefix = key.removesuffix(".lora_up.weight")
        up, down = lora[key], lora[f"{prefix}.lora_down.weight"]
        factors[f"{prefix}.weight"] = (up * float(lora[f"{prefix}.alpha"]) / down.shape[0], down)
    return factors


class HardContexts:
    """The model function wrapper: sets `DUAL_PATH` = (α, hard context of the whole batch) for each prediction."""

    def __init__(self, alpha: float, soft: Tensor, hard: Tensor, previous: Callable[..., Tensor] | None):
        self.alpha, self.soft, self.hard, self.previous = alpha, soft, hard, previous

    def hard_chunk(self, chunk: Tensor) -> Tensor:
        """The hard context for one chunk [b, T, d] of the batch: the hard prompt where the chunk is the soft prompt
        (repeated to T tokens as the sampler pads conds of several lengths), else the chunk itself."""
        tokens = self.soft.shape[1]
        if chunk.shape[1] % tokens or chunk.shape[2] != self.soft.shape[2]:
            return chunk
        repeat = chunk.shape[1] // tokens
        soft = self.soft.to(chunk).repeat(1, repeat, 1)
        if not torch.allclose(chunk, soft.expand_as(chunk), rtol=1e-3, atol=1e-3):
            return chunk
        return self.hard.to(chunk).repeat(1, repeat, 1).expand_as(chunk)

    def __call__(self, apply_model: Callable[..., Tensor], args: dict[str, Any]) -> Tensor:
        c = dict(args["c"])
        context = c.get("c_crossattn")
        if context is not None:
            chunks = context.chunk(len(args["cond_or_uncond"]))
            hard = torch.cat([self.hard_chunk(chunk) for chunk in chunks])
            c["transformer_options"] = {**c.get("transformer_options", {}), DUAL_PATH: (self.alpha, hard)}
        if self.previous is not None:
            return self.previous(apply_model, {**args, "c": c})
        return apply_model(args["input"], args["timestep"], **c)


def encode(clip: Any, text: str) -> list[list[Any]]:
    """CONDITIONING of `text`, as stock CLIP Text Encode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def dual_path(model: Any, clip: Any, concept: Concept, text: str, alpha: float) -> tuple[Any, list[list[Any]], Any]:
    """(MODEL with the concept's offsets and the dual path, the prompt's CONDITIONING, CLIP with the concept)."""
    if concept.method != "tuning_encoder":
        raise ValueError(f"{NODE}: concept '{concept.name}' was learned by {concept.method}; the dual path needs a "
                         "Tuning Encoder concept (its offsets and token). Use Apply Concept for other concepts.")
    check_concept_fits(concept, clip, NODE)
    carried = model.model_options.get(OFFSETS_MARK)
    if carried is not None:
        raise ValueError(f"{NODE}: this model already carries the offsets of concept '{carried}' (it is a Tuning "
                         "Encoder's model output), and the dual path needs the original weights; connect the "
                         "checkpoint's MODEL, the one the Tuning Encoder got.")
    problem = schema_problem(TuningEncoderDualPath, NODE, text=text, blend=alpha)
    if problem:
        raise ValueError(problem)
    if f"embedding:{concept.name}" not in text:
        raise ValueError(f"{NODE}: the text does not mention embedding:{concept.name}; write the prompt with it "
                         f"(for example 'a photo of embedding:{concept.name} on the beach').")
    soft_clip = apply_concepts(clip, [concept], NODE)
    soft = encode(soft_clip, text)
    if alpha == 1:  # the dual path off: the Tuning Encoder's own model
        return model_with_offsets(model, concept), soft, soft_clip
    tables = {k: t.detach().float().cpu() for k, t in encoder_tables(clip).items() if k in concept.vectors}
    hard_concept = dataclasses.replace(concept, vectors=hard_rows(concept.vectors, tables))
    hard = encode(apply_concepts(clip, [hard_concept], NODE), text)
    if len(soft) != 1 or len(hard) != 1:
        raise ValueError(f"{NODE}: the text has prompt scheduling ([from:to:when]), which the dual path does not "
                         "follow; write one prompt.")
    patched = model.clone()
    offsets = Offsets()
    offsets.factors.update(offset_factors(concept))
    if not patch_dual_path(patched, offsets):
        raise ValueError(f"{NODE}: this model has no UNet attention blocks (the dual path runs on SD 1.x, SD 2.x and "
                         "SDXL); set blend to 1, or use the Tuning Encoder's model directly.")
    wrap_weights(patched, offsets.factors, offsets)
    previous = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(HardContexts(alpha, soft[0][0], hard[0][0], previous))
    patched.model_options[OFFSETS_MARK] = concept.name  # a second dual path on top would blend the wrong weights
    return patched, soft, soft_clip


class TuningEncoderDualPath(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeTuningEncoderDualPath",
            display_name=NODE,
            category=CATEGORY,
            description="Generate with a Tuning Encoder concept through DATE's dual path: every attention block "
                        "blends the concept (its token and offsets) with its nearest real words on the original "
                        "weights, as it was tuned. Use this node's model and conditioning in the KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL, without the concept's offsets (not the "
                               "Tuning Encoder's model output): this node adds them."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                ConceptIO.Input("concept", tooltip="A Tuning Encoder concept (from the node or Load Concept)."),
                io.String.Input("text", multiline=True, default="a photo of embedding:my_concept",
                                tooltip="The positive prompt; it must mention embedding:<the concept's name>."),
                io.Float.Input("blend", default=0.8, min=0.0, max=1.0, step=0.05, tooltip="α: the concept's share "
                               "of each attention block. 1 turns the dual path off (the Tuning Encoder's own "
                               "model); lower keeps more of the prompt's other words (README: how it was chosen)."),
            ],
            outputs=[
                io.Model.Output("dual_model", display_name="model", tooltip="The MODEL to sample with."),
                io.Conditioning.Output("positive", display_name="positive", tooltip="The text's conditioning, for "
                                       "the KSampler's positive input with this model."),
                io.Clip.Output("concept_clip", display_name="clip", tooltip="The CLIP with the concept's token, for "
                               "the negative prompt."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text: str = "", blend: float = 0.8) -> bool | str:
        known = {k: v for k, v in dict(text=text, blend=blend).items() if v is not None}  # None: linked, checked
        return schema_problem(cls, NODE, **known) or True                                # when the node runs

    @classmethod
    def execute(cls, model, clip, concept, text, blend) -> io.NodeOutput:
        return io.NodeOutput(*dual_path(model, clip, concept, text, blend))


NODES = [TuningEncoderDualPath]

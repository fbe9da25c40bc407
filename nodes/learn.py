"""Learn Concept: train a concept from a few images on the MODEL, CLIP and VAE already in the graph."""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..trainers.concept import ARCH_LABELS, name_problem
from ..trainers.methods import MODULES
from .apply import apply_concepts
from .catversion import residual_clip
from .host import PRECISIONS, TEXT_ENCODER_CHOICES, TEXT_ENCODERS_TOOLTIP
from .plot import loss_plot
from .training import NODE, Learned, LearnSettings, TrainingOptions, learn
from .types import CATEGORY, OPTIONS_CATEGORY, ConceptIO, MethodOptionsIO, TrainingOptionsIO
from .validation import schema_problem

METHODS = [m for m in MODULES if m != "tuning_encoder"]  # that one has its own node, with a CLIP vision model
PROMPT_MODES = ["object", "style", "captions"]


def summary(learned: Learned) -> str:
    c, r = learned.concept, learned.result
    p = c.provenance
    # CatVersion learns no token vectors: its report line says what it trained instead
    learns = "" if c.method == "catversion" else f"{c.num_vectors} vector(s) per encoder, "
    lines = [f"{c.name}: {c.method.upper()} on {ARCH_LABELS[c.arch]}, {learns}{p['steps']} steps at learning rate "
             f"{learned.learning_rate:g} ({p['base_learning_rate']:g} per sample), {learned.resolution} px.",
             f"Training loss {r.losses[0]:.4f} → {r.losses[-1]:.4f}." if r.losses else
             "No training step: the starting point as it is."]
    if r.heldout_before is not None and r.heldout_after is not None:
        change = 100 * (r.heldout_after - r.heldout_before) / r.heldout_before
        lines.append(f"Held-out loss {r.heldout_before:.4f} → {r.heldout_after:.4f} ({change:+.1f}%).")
    lines += learned.report
    how = (f"prompt with the class word '{p['init_word']}'" if c.method == "catversion"
           else f"prompt it as embedding:{c.name}")
    lines.append(f"Through the CLIP output, {how}; Save Concept keeps it.")
    return "\n".join(lines)


def first(value: Any) -> Any:
    """One input's value: with is_input_list ComfyUI sends a list of values, and a widget's list has one."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def image_list(value: Any) -> list[torch.Tensor]:
    """IMAGE or MASK batches, one or a list of them (of any sizes), as one list of single images."""
    batches = value if isinstance(value, list) else [value]
    return [item for batch in batches for item in (batch if batch.dim() >= 3 else [batch])]  # IMAGE 4-D, MASK 3-D


def caption_text(value: Any) -> str:
    """The captions box, or a list of captions (one per image, as dataset nodes give them), as one per line."""
    if not isinstance(value, list):
        return value or ""
    if len(value) == 1:
        return value[0] or ""
    return "\n".join(" ".join(str(c).split()) for c in value)


class LearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeLearnConcept",
            display_name=NODE,
            category=CATEGORY,
            description="Learns a concept (a new word) from a few images with the checkpoint in the graph.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of the checkpoint to learn on (SD 1.x, SD 2.x, SDXL, "
                               "SD 3.5 or Flux.1; there ti, dti and batex learn vectors for each text encoder: "
                               "CLIP-L, CLIP-G and T5-XXL, or CLIP-L and T5-XXL)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; each image is encoded once."),
                io.Image.Input("images", tooltip="3–5 images of the concept. Each is resized so its shorter side "
                               "matches the resolution, then centre-cropped to a square."),
                io.String.Input("name", default="my_concept", tooltip="What prompts call the concept: "
                                "embedding:<name>. Letters, digits, '_', '-' and '.'."),
                io.String.Input("init_word", default="object", tooltip="A word close to the concept ('dog', "
                                "'teddy bear', 'painting'); the learned vectors start from its tokens."),
                io.Combo.Input("method", options=METHODS, default="ti", tooltip="ti: Textual Inversion, free token "
                               "vectors (Gal et al. 2022). dti: Directional TI, the length fixed at the vocabulary's "
                               "norm and only the direction learned (Kim et al. 2025); its recipe is the paper's "
                               "SDXL one, used unchanged for SD 1.x/2.x (not paper-verified). batex: BaTex, the vector "
                               "learned as a weighted sum of M vocabulary rows close to the init word, only the "
                               "weights trained (Du et al. 2024). catversion: "
                               "residual keys and values in the text encoder's last layers, prompted by the class "
                               "word given as init_word (Zhao et al. 2023); SD 2.x and SDXL are experimental, "
                               "SD 3.5 and Flux.1 are not supported."),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip="Optimizer steps. 0 uses the method's "
                             "default: TI 3000, DTI 400, BaTex 1000, CatVersion 1000."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.0001, tooltip="Per-sample "
                               "learning rate, multiplied by batch size × accumulation as the papers do. 0 uses "
                               "the method's default: TI 0.005, DTI 0.01 (a rotation step, 0.04 at batch 4), "
                               "BaTex 0.0005, CatVersion 0.005."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per step. Lower it if you "
                             "run out of memory; the effective learning rate follows it."),
                io.Int.Input("vectors", default=0, min=0, max=16, tooltip="Vectors per text encoder. 0 gives one "
                             "per token of the init word."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8, tooltip="Training resolution in "
                             "pixels. 0 uses the model's own: 512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL, SD "
                             "3.5 and Lumina 2, 512 for Flux.1 (a quarter of the memory of 1024)."),
                io.Combo.Input("prompts", options=PROMPT_MODES, default="object", tooltip="object: 27 'a photo "
                               "of a {}' templates; style: 19 'a painting in the style of {}' templates; captions: "
                               "one caption per image from the captions box."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds every random draw; the same seed and inputs give the same concept. "
                             "Change it to train again."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", tooltip="The UNet's compute "
                               "precision. auto keeps ComfyUI's choice; use bf16 or fp32 if the loss becomes NaN."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute UNet activations in "
                                 "the backward pass: less memory, about a third slower."),
                io.Mask.Input("mask", optional=True, tooltip="Where the concept is (white). Only these pixels count "
                              "in the loss. One mask per image or one for all."),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip="With prompts = "
                                "captions: one caption per image, in batch order, naming the concept as {} or by "
                                "its name. One line alone serves every image."),
                TrainingOptionsIO.Input("training_options", optional=True, tooltip="Advanced options from a "
                                        "Training Options node."),
                MethodOptionsIO.Input("method_options", optional=True, tooltip="The method's own settings from its "
                                      "options node (DTI Options, ...); without it the paper's defaults apply."),
                io.Int.Input("preview_every", default=0, min=0, max=10000, optional=True, tooltip="Every this many "
                             "steps, draw a quick 12-step sample with the concept so far and show it on the node. "
                             "0 turns previews off (best on a CPU)."),
            ],
            outputs=[
                ConceptIO.Output("concept", display_name="concept",
                                 tooltip="The learned concept: save it, apply it, inspect it."),
                io.Clip.Output("concept_clip", display_name="clip",
                               tooltip="The CLIP with the concept applied: write embedding:<name> in CLIP "
                               "Text Encode."),
                io.LossMap.Output("loss", display_name="loss", tooltip="Loss per step; Plot Loss Graph draws it."),
                io.Image.Output("loss_plot", display_name="loss_plot", tooltip="The loss curve as an image, to save "
                                "beside the concept."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_input_list=True,
        )

    @classmethod
    def validate_inputs(cls, name: str = "my_concept", init_word: str = "object", method: str = "ti",
                        learning_rate: float = 0.0, prompts: str = "object", precision: str = "auto",
                        captions: str = "") -> bool | str:
        sent = dict(name=name, init_word=init_word, method=method, learning_rate=learning_rate, prompts=prompts,
                    precision=precision, captions=captions)
        # is_input_list: a widget's value comes as [value]; a linked one as (None,), not known before the node runs
        known = {k: first(v) for k, v in sent.items() if not isinstance(v, tuple)}
        problem = schema_problem(cls, NODE, **known)
        name, init_word, captions = (known.get(k) for k in ("name", "init_word", "captions"))
        if problem:
            return problem
        if name is not None and name_problem(name):  # None: linked, checked when the node runs
            return f"{NODE}: {name_problem(name)}."
        if init_word is not None and not init_word.strip():
            return f"{NODE}: init_word is empty; give a word close to the concept, such as 'dog' or 'painting'."
        if known.get("prompts") == "captions" and captions is not None and not captions.strip():
            return f"{NODE}: prompts is 'captions' but the captions box is empty; write one caption per image."
        return True

    @classmethod
    def execute(cls, images, mask=None, captions="", **inputs: Any) -> io.NodeOutput:
        # is_input_list: ComfyUI sends every input as a list, so that the lists of a dataset node (images of mixed
        # sizes, one caption each) make one training set rather than one run per image
        images, mask, captions = image_list(images), None if mask is None else image_list(mask), caption_text(captions)
        return cls._train(images=images, mask=mask, captions=captions, **{k: first(v) for k, v in inputs.items()})

    @classmethod
    def _train(cls, model, clip, vae, images, name, init_word, method, steps, learning_rate, batch_size, vectors,
              resolution, prompts, seed, precision, gradient_checkpointing, mask=None, captions="",
              training_options=None, method_options=None, preview_every=0) -> io.NodeOutput:
        settings = LearnSettings(name, init_word, method, steps or None, learning_rate, batch_size, vectors, resolution,
                                 prompts, seed, precision, gradient_checkpointing, captions or "",
                                 training_options or TrainingOptions(), method_options, preview_every or 0)
        learned = learn(model, clip, vae, images, mask, settings, cls.hidden.unique_id, cls.hidden.prompt)
        if learned.concept.method == "catversion":
            applied, _ = residual_clip(clip, learned.concept, 1.0, apply_to_negative=False)
        else:
            applied = apply_concepts(clip, [learned.concept], NODE)
        losses = learned.result.losses
        plot = loss_plot(losses, f"{name} · {method} · loss per step")
        # the web chart draws `loss` as the final curve; `text` is the summary shown under it
        return io.NodeOutput(learned.concept, applied, {"loss": losses}, plot,
                             ui={"text": [summary(learned)], "loss": losses})


class TrainingOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeTrainingOptions",
            display_name="Training Options",
            category=OPTIONS_CATEGORY,
            description="Advanced training options for Learn Concept.",
            inputs=[
                io.Int.Input("gradient_accumulation", default=1, min=1, max=64, tooltip="Forward passes per "
                             "optimizer step: a larger effective batch in the same memory. 1 turns it off."),
                io.Combo.Input("flip", options=["method default", "on", "off"], default="method default",
                               tooltip="Horizontal flips of the images (p = 0.5). The method default: off for DTI, on "
                               "for the others."),
                io.Boolean.Input("scale_learning_rate", default=True, tooltip="Multiply the learning rate by batch "
                                 "size × accumulation, as the papers do. Off uses it as given."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000, tooltip="Every this many steps "
                             "(and at the end), keep the concept and the optimizer state in models/concepts/"
                             "checkpoints/<name>/, replacing the previous one. 0 keeps none."),
                io.Boolean.Input("resume", default=False, tooltip="Continue from that checkpoint instead of starting "
                                 "over: with the same settings and seed the result equals an uninterrupted run. "
                                 "Raise steps to extend a finished run."),
                io.Combo.Input("text_encoders", options=list(TEXT_ENCODER_CHOICES), default="family default",
                               optional=True, tooltip=TEXT_ENCODERS_TOOLTIP),
            ],
            outputs=[TrainingOptionsIO.Output("training_options", display_name="training_options",
                                              tooltip="Connect to Learn Concept.")],
        )

    @classmethod
    def validate_inputs(cls, flip: str = "method default", text_encoders: str = "family default") -> bool | str:
        return schema_problem(cls, "Training Options", flip=flip, text_encoders=text_encoders) or True

    @classmethod
    def execute(cls, gradient_accumulation, flip, scale_learning_rate, checkpoint_every, resume,
                text_encoders="family default") -> io.NodeOutput:
        return io.NodeOutput(TrainingOptions(gradient_accumulation, flip, scale_learning_rate, checkpoint_every,
                                             resume, text_encoders))


NODES = [LearnConcept, TrainingOptionsNode]

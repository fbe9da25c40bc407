"""Learn Concept: train a concept from a few images on the MODEL, CLIP and VAE already in the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from comfy_api.v0_0_2 import io, ui

from ..trainers.concept import Arch, Concept, name_problem
from ..trainers.data import prepare_images, prepare_masks
from ..trainers.files import save_concept
from ..trainers.loop import LoopOptions, NonFiniteLoss, TrainingSet, TrainResult, scaled_learning_rate, train
from ..trainers.methods import MODULES, create_method, method_options, method_prompts
from ..trainers.templates import training_prompts
from .apply import apply_concepts
from .catversion import residual_clip
from .comfy_host import PRECISIONS, ComfyHost, detect_arch
from .paths import display_path, recovery_path
from .progress import NodeProgress
from .provenance import provenance
from .types import CATEGORY, OPTIONS_CATEGORY, ConceptIO, MethodOptionsIO, TrainingOptionsIO

NODE = "Learn Concept"
METHODS = list(MODULES)
PROMPT_MODES = ["object", "style", "captions"]
HELDOUT_DRAWS = 4  # fixed (noise, timestep) pairs per image for the before/after loss in the summary


@dataclass(frozen=True)
class TrainingOptions:
    """The advanced knobs of the Training Options node."""

    gradient_accumulation: int = 1
    flip: Literal["method default", "on", "off"] = "method default"
    scale_learning_rate: bool = True  # multiply by batch × accumulation, as every method's paper does


@dataclass(frozen=True)
class LearnSettings:
    name: str
    init_word: str
    method: str = "ti"
    steps: int = 0                  # 0: the method's default
    learning_rate: float = 0.0      # 0: the method's default, per sample
    batch_size: int = 4
    vectors: int = 0                # 0: one per token of the init word
    resolution: int = 0             # 0: the model's native resolution
    prompts: str = "object"
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    captions: str = ""
    training: TrainingOptions = field(default_factory=TrainingOptions)
    method_options: Any = None


def native_resolution(arch: Arch, v_prediction: bool) -> int:
    """SD 1.x trains at 512, SD 2.x at 768 (v-prediction) or 512 (base), SDXL at 1024."""
    if arch == "sdxl":
        return 1024
    return 768 if arch == "sd2" and v_prediction else 512


@dataclass
class Learned:
    concept: Concept
    result: TrainResult
    learning_rate: float
    resolution: int
    report: list[str]


def learn(model: Any, clip: Any, vae: Any, images: torch.Tensor, mask: torch.Tensor | None, settings: LearnSettings,
          node_id: str | None = None, prompt: Any = None) -> Learned:
    """Everything Learn Concept does, without the node: validate, train, and return the concept."""
    s = settings
    problem = name_problem(s.name)
    if problem:
        raise ValueError(f"{NODE}: {problem}. Use letters, digits, '_', '-' or '.'.")
    if vae is None:
        raise ValueError(f"{NODE}: the VAE input is empty; connect the VAE output of Load Checkpoint.")
    arch = detect_arch(model, clip, NODE)
    try:
        options = method_options(s.method, s.method_options)
    except ValueError as e:
        raise ValueError(f"{NODE}: {e}") from e
    steps = s.steps or options.steps
    base_lr = s.learning_rate or options.learning_rate
    accum = s.training.gradient_accumulation
    lr = scaled_learning_rate(base_lr, s.batch_size, accum) if s.training.scale_learning_rate else base_lr
    flip_p = {"on": 0.5, "off": 0.0}.get(s.training.flip, options.flip_p)

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs every node in inference mode
        with ComfyHost(model, clip, vae, arch, s.precision, s.gradient_checkpointing) as host:
            resolution = s.resolution or native_resolution(arch, host.v_prediction)
            try:
                pixels = prepare_images(images.clone(), resolution)
                masks = None if mask is None else prepare_masks(mask.clone(), len(pixels), resolution)
                prompts, per_image = training_prompts(s.prompts, s.name, len(pixels), s.captions)  # type: ignore[arg-type]
                prompts = method_prompts(s.method, prompts, per_image, s.init_word)
                method = create_method(s.method, host, s.init_word, s.vectors, options, s.seed)  # type: ignore[arg-type]
            except ValueError as e:
                raise ValueError(f"{NODE}: {e}") from e
            record = provenance(prompt, node_id, method=s.method, init_word=s.init_word.strip(), steps=steps,
                                learning_rate=lr, base_learning_rate=base_lr, batch_size=s.batch_size,
                                gradient_accumulation=accum, resolution=resolution, seed=s.seed, images=len(pixels),
                                prompts=s.prompts, precision=s.precision)
            loop = LoopOptions(steps=steps, learning_rate=lr, batch_size=s.batch_size, grad_accum=accum, seed=s.seed,
                               flip_p=flip_p, heldout_draws=HELDOUT_DRAWS)
            data = TrainingSet(pixels, prompts, per_image, masks)
            try:
                result = train(method, host, data, loop, NodeProgress(node_id, s.name, steps))
            except NonFiniteLoss as e:
                last_good = method.to_concept(s.name, arch, {**record, "steps": e.step - 1})
                path = save_concept(last_good, recovery_path(s.name, e.step - 1), overwrite=True)
                raise RuntimeError(f"{NODE}: {e}. The last finite concept was saved to {display_path(path)} (load it "
                                   "with Load Concept); retry with a lower learning rate, or precision fp32 or "
                                   "bf16.") from e
    final = {**record, "final_loss": result.losses[-1], "heldout_loss_before": result.heldout_before,
             "heldout_loss_after": result.heldout_after}
    return Learned(method.to_concept(s.name, arch, final), result, lr, resolution, method.report())


def summary(learned: Learned) -> str:
    c, r = learned.concept, learned.result
    p = c.provenance
    lines = [f"{c.name}: {c.method.upper()} on {c.arch}, {c.num_vectors} vector(s) per encoder, "
             f"{p['steps']} steps at learning rate {learned.learning_rate:g} ({p['base_learning_rate']:g} per "
             f"sample), {learned.resolution} px.",
             f"Training loss {r.losses[0]:.4f} → {r.losses[-1]:.4f}."]
    if r.heldout_before is not None and r.heldout_after is not None:
        change = 100 * (r.heldout_after - r.heldout_before) / r.heldout_before
        lines.append(f"Held-out loss {r.heldout_before:.4f} → {r.heldout_after:.4f} ({change:+.1f}%).")
    lines += learned.report
    lines.append(f"Prompt it as embedding:{c.name} through the CLIP output; Save Concept keeps it.")
    return "\n".join(lines)


class LearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeLearnConcept",
            display_name=NODE,
            category=CATEGORY,
            description="Learns a concept (a new word) from a few images with the checkpoint in the graph.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of the checkpoint to learn on (SD 1.x, SD 2.x or SDXL)."),
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
                               "SDXL one, used unchanged for SD 1.x/2.x at 512 px (not paper-verified). catversion: "
                               "residual keys and values in the text encoder's last layers, prompted by the class "
                               "word given as init_word (Zhao et al. 2023); SD 2.x and SDXL are experimental."),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip="Optimizer steps. 0 uses the method's "
                             "default: TI 3000, DTI 400, CatVersion 1000."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.0001, tooltip="Per-sample "
                               "learning rate, multiplied by batch size × accumulation as the papers do. 0 uses "
                               "the method's default: TI 0.005, DTI 0.01 (a rotation step, 0.04 at batch 4), "
                               "CatVersion 0.005."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per step. Lower it if you "
                             "run out of memory; the effective learning rate follows it."),
                io.Int.Input("vectors", default=0, min=0, max=16, tooltip="Vectors per text encoder. 0 gives one "
                             "per token of the init word."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8, tooltip="Training resolution in "
                             "pixels. 0 uses the model's own: 512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL."),
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
            ],
            outputs=[
                ConceptIO.Output("concept", display_name="concept",
                                 tooltip="The learned concept: save it, apply it, inspect it."),
                io.Clip.Output("concept_clip", display_name="clip",
                               tooltip="The CLIP with the concept applied: write embedding:<name> in CLIP "
                               "Text Encode."),
                io.LossMap.Output("loss", display_name="loss", tooltip="Loss per step; Plot Loss Graph draws it."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, name: str = "my_concept", init_word: str = "object", prompts: str = "object",
                        captions: str = "", **_: Any) -> bool | str:
        problem = name_problem(name)
        if problem:
            return f"{NODE}: {problem}."
        if not init_word.strip():
            return f"{NODE}: init_word is empty; give a word close to the concept, such as 'dog' or 'painting'."
        if prompts == "captions" and not (captions or "").strip():
            return f"{NODE}: prompts is 'captions' but the captions box is empty; write one caption per image."
        return True

    @classmethod
    def execute(cls, model, clip, vae, images, name, init_word, method, steps, learning_rate, batch_size, vectors,
                resolution, prompts, seed, precision, gradient_checkpointing, mask=None, captions="",
                training_options=None, method_options=None) -> io.NodeOutput:
        settings = LearnSettings(name, init_word, method, steps, learning_rate, batch_size, vectors, resolution,
                                 prompts, seed, precision, gradient_checkpointing, captions or "",
                                 training_options or TrainingOptions(), method_options)
        learned = learn(model, clip, vae, images, mask, settings, cls.hidden.unique_id, cls.hidden.prompt)
        if learned.concept.method == "catversion":
            applied, _ = residual_clip(clip, learned.concept, 1.0, apply_to_negative=False)
        else:
            applied = apply_concepts(clip, [learned.concept], NODE)
        return io.NodeOutput(learned.concept, applied, {"loss": learned.result.losses},
                             ui=ui.PreviewText(summary(learned)))


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
                               tooltip="Horizontal flips of the images (p = 0.5). The method default: on for TI, off "
                               "for DTI."),
                io.Boolean.Input("scale_learning_rate", default=True, tooltip="Multiply the learning rate by batch "
                                 "size × accumulation, as the papers do. Off uses it as given."),
            ],
            outputs=[TrainingOptionsIO.Output("training_options", display_name="training_options",
                                              tooltip="Connect to Learn Concept.")],
        )

    @classmethod
    def execute(cls, gradient_accumulation, flip, scale_learning_rate) -> io.NodeOutput:
        return io.NodeOutput(TrainingOptions(gradient_accumulation, flip, scale_learning_rate))


NODES = [LearnConcept, TrainingOptionsNode]

"""The run behind Learn Concept: settings → ComfyUI host → the shared loop → a concept, with checkpoints and resume,
previews, and recovery of the last finite state after a NaN."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import comfy.model_management as mm
import torch

from ..trainers.checkpoint import TrainState, load_state, save_state
from ..trainers.concept import ARCH_LABELS, Arch, Concept, name_problem
from ..trainers.data import prepare_images, prepare_masks
from ..trainers.files import save_concept
from ..trainers.loop import (
    LoopOptions,
    NonFiniteLoss,
    ResumeMismatch,
    TrainingSet,
    TrainResult,
    scaled_learning_rate,
    train,
)
from ..trainers.methods import Method, create_method, freeze_encoders, method_options, method_prompts
from ..trainers.templates import training_prompts
from .host import SD_ONLY, ComfyHost, detect_arch, encoder_keys, frozen_encoders
from .paths import STATE_FILE, checkpoint_dir, display_path, recovery_path
from .progress import NodeProgress
from .provenance import provenance

NODE = "Learn Concept"
UNET_METHODS = {"catversion": "CatVersion", "tuning_encoder": "The Tuning Encoder"}
HELDOUT_DRAWS = 4  # fixed (noise, timestep) pairs per image for the before/after loss in the summary
log = logging.getLogger("concept_forge")


@dataclass(frozen=True)
class TrainingOptions:
    """The advanced knobs of the Training Options node."""

    gradient_accumulation: int = 1
    flip: Literal["method default", "on", "off"] = "method default"
    scale_learning_rate: bool = True  # multiply by batch × accumulation, as every method's paper does
    checkpoint_every: int = 100       # steps between checkpoints in models/concepts/checkpoints/<name>/; 0: none
    resume: bool = False              # continue from that checkpoint
    text_encoders: str = "family default"  # which encoders' vectors train (TEXT_ENCODER_CHOICES)


@dataclass(frozen=True)
class LearnSettings:
    name: str
    init_word: str
    method: str = "ti"
    steps: int | None = None        # None: the method's default; 0: none (the starting point as it is)
    learning_rate: float = 0.0      # 0: the method's default; per sample unless scale_learning_rate is off
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
    preview_every: int = 0          # steps between preview samples on the node; 0: none


def native_resolution(arch: Arch, v_prediction: bool) -> int:
    """SD 1.x trains at 512, SD 2.x at 768 (v-prediction) or 512 (base), SDXL, SD 3.5 and Lumina 2 at 1024; Flux.1
    at 512, which concept training on it commonly uses (a quarter of 1024's image tokens and memory)."""
    if arch in ("sdxl", "sd3", "lumina2"):
        return 1024
    return 768 if arch == "sd2" and v_prediction else 512


@dataclass
class Learned:
    concept: Concept
    result: TrainResult
    learning_rate: float
    resolution: int
    report: list[str]


Build = Callable[[ComfyHost, torch.Tensor], Method]  # (host, training images) → the method, for nodes with their own


def learn(model: Any, clip: Any, vae: Any, images: torch.Tensor | Sequence[torch.Tensor],
          mask: torch.Tensor | Sequence[torch.Tensor] | None, settings: LearnSettings,
          node_id: str | None = None, prompt: Any = None, *, node: str = NODE, build: Build | None = None,
          clip_vision: Any = None) -> Learned:
    """Everything Learn Concept does, without the node: validate, train, and return the concept.

    Tuning Encoder runs the same way with its own `node` name for messages, its own `build` of the method from
    the host and the images, and a `clip_vision` for the host.
    """
    s = settings
    problem = name_problem(s.name)
    if problem:
        raise ValueError(f"{node}: {problem}. Use letters, digits, '_', '-' or '.'.")
    if vae is None:
        raise ValueError(f"{node}: the VAE input is empty; connect the VAE output of Load Checkpoint.")
    arch = detect_arch(model, clip, node)
    if s.method in UNET_METHODS and arch not in SD_ONLY:
        raise ValueError(f"{node}: {UNET_METHODS[s.method]} learns on SD 1.x, SD 2.x and SDXL only (it patches their "
                         f"CLIP layers and UNet); for {ARCH_LABELS[arch]} choose ti, dti or batex.")
    try:
        options = method_options(s.method, s.method_options)
        frozen = frozen_encoders(encoder_keys(clip), s.training.text_encoders, arch)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from e
    steps = options.steps if s.steps is None else s.steps
    base_lr = s.learning_rate or options.learning_rate
    accum = s.training.gradient_accumulation
    lr = scaled_learning_rate(base_lr, s.batch_size, accum) if s.training.scale_learning_rate else base_lr
    flip_p = {"on": 0.5, "off": 0.0}.get(s.training.flip, options.flip_p)
    folder = checkpoint_dir(s.name)

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs every node in inference mode
        resume = _resume_state(folder) if s.training.resume else None  # loaded here: no inference tensors
        with ComfyHost(model, clip, vae, arch, s.precision, s.gradient_checkpointing, clip_vision) as host:
            resolution = s.resolution or native_resolution(arch, host.v_prediction)

            def prepare(stage: str) -> None:  # Cancel works before the first step too
                mm.throw_exception_if_processing_interrupted()
                NodeProgress.say(node_id, f"{s.name}: {stage}")

            try:
                prepare("preparing the images")
                pixels = prepare_images([image.clone() for image in images], resolution)
                masks = None if mask is None else prepare_masks(
                    [m.clone() for m in (mask[None] if mask.dim() == 2 else mask)], len(pixels), resolution)
                prompts, per_image = training_prompts(s.prompts, s.name, len(pixels), s.captions)  # type: ignore[arg-type]
                prompts = method_prompts(s.method, prompts, per_image, s.init_word)
                prepare(f"setting up {s.method}")
                method = (build(host, pixels) if build else
                          create_method(s.method, host, s.init_word, s.vectors, options, s.seed))  # type: ignore[arg-type]
                freeze_encoders(method, frozen)
            except ValueError as e:
                raise ValueError(f"{node}: {e}") from e
            record = provenance(prompt, node_id, method=s.method, init_word=s.init_word.strip(), steps=steps,
                                learning_rate=lr, base_learning_rate=base_lr, batch_size=s.batch_size,
                                gradient_accumulation=accum, resolution=resolution, seed=s.seed, images=len(pixels),
                                prompts=s.prompts, precision=s.precision, text_encoders=s.training.text_encoders)
            loop = LoopOptions(steps=steps, learning_rate=lr, batch_size=s.batch_size, grad_accum=accum, seed=s.seed,
                               flip_p=flip_p, heldout_draws=HELDOUT_DRAWS,
                               checkpoint_every=s.training.checkpoint_every)
            data = TrainingSet(pixels, prompts, per_image, masks)

            saved = [resume.step] if resume else []

            def checkpoint(state: TrainState) -> None:
                # the concept first: a kill between the two writes leaves a state that is never ahead of the
                # concept, and resuming from it recomputes the same steps
                try:
                    save_concept(method.to_concept(s.name, arch, {**record, "steps": state.step}),
                                 folder / f"{s.name}.safetensors", overwrite=True)
                    save_state(state, folder / STATE_FILE)
                except OSError as e:  # a full disk must not end the run: the concept stays in memory
                    message = (f"the checkpoint of step {state.step} could not be written ({e}); training goes on "
                               f"and the previous checkpoint stays. Free some disk space to keep the next one.")
                    log.warning("Concept Forge: %s: %s", s.name, message)
                    NodeProgress.say(node_id, message)
                    return
                saved.append(state.step)

            def preview() -> Any:
                return host.sample(prompts[0], method.vectors(), resolution, seed=s.seed)

            progress = NodeProgress(node_id, s.name, steps, preview if s.preview_every else None, s.preview_every)
            try:
                result = train(method, host, data, loop, progress, checkpoint, resume, prepare)
            except NonFiniteLoss as e:
                last_good = method.to_concept(s.name, arch, {**record, "steps": e.step - 1})
                path = save_concept(last_good, recovery_path(s.name, e.step - 1), overwrite=True)
                raise RuntimeError(f"{node}: {e}. The last finite concept was saved to {display_path(path)} (load it "
                                   "with Load Concept); retry with a lower learning rate, or precision fp32 or "
                                   "bf16.") from e
            except ResumeMismatch as e:
                raise ValueError(f"{node}: cannot resume '{s.name}': {e}. Restore those settings, or turn resume "
                                 "off to start again.") from e
            except mm.InterruptProcessingException:
                _report_cancel(folder, saved[-1] if saved else None, node_id)
                raise
            finally:
                progress.finish()
    final = {**record, "final_loss": result.losses[-1] if result.losses else None,
             "heldout_loss_before": result.heldout_before, "heldout_loss_after": result.heldout_after}
    return Learned(method.to_concept(s.name, arch, final), result, lr, resolution, method.report())


def _resume_state(folder: Any) -> TrainState:
    path = folder / STATE_FILE
    if not path.exists():
        raise ValueError(f"{NODE}: resume is on but there is no checkpoint at {display_path(path)}; turn resume off "
                         "to start a new run.")
    try:
        return load_state(path)
    except ValueError as e:
        raise ValueError(f"{NODE}: {display_path(path)} cannot be resumed: {e}") from e


def _report_cancel(folder: Any, step: int | None, node_id: str | None) -> None:
    """Cancel keeps the last checkpoint: say where it is and how to continue."""
    if step is not None:
        message = (f"Cancelled. The checkpoint of step {step} is in {display_path(folder)}: turn resume on in "
                   "Training Options to continue, or load the concept there with Load Concept.")
    else:
        message = "Cancelled before the first checkpoint; nothing was kept."
    log.warning("Concept Forge: %s", message)
    NodeProgress.say(node_id, message)

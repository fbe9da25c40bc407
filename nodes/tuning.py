"""Tuning Encoder: one-image personalization in a dozen steps (docs/METHODS.md §6)."""

from __future__ import annotations

import weakref
from typing import Any

import comfy.sd
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..trainers.concept import Concept, name_problem
from ..trainers.methods import tuning_encoder as tuning
from ..trainers.methods.base import init_vectors
from ..trainers.templates import caption_prompts
from ..trainers.tuning_encoder import (
    EncoderConfig,
    TuningEncoder,
    load_encoder,
    mismatches,
    signature_image,
    vision_problem,
    vision_signature,
)
from .apply import apply_concepts
from .host import ATTENTION_PROJECTIONS, ComfyHost
from .learn import summary
from .paths import ENCODERS
from .plot import loss_plot
from .training import LearnSettings, TrainingOptions, learn
from .types import CATEGORY, ConceptIO
from .validation import schema_problem

NODE = "Tuning Encoder"
NO_ENCODER = "none"
OFFSETS_MARK = "concept_forge_offsets"  # model_options key: the concept whose offsets a MODEL carries
FEATURE_TIMESTEP = 500  # the noisy latent the UNet features come from: mid-schedule (this pack's choice)


def lora_of(concept: Concept) -> dict[str, torch.Tensor]:
    """A tuning-encoder concept's offsets as stock LoRA tensors (`diffusion_model.<module>.lora_up.weight`, ...)."""
    return {k.removeprefix("lora."): v for k, v in concept.tensors.items() if k.startswith("lora.")}


def model_with_offsets(model: Any, concept: Concept) -> Any:
    """The MODEL with the concept's offsets as ordinary LoRA patches, exactly as the stock LoraLoader applies them,
    marked with the concept's name (clones keep the mark)."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_of(concept), 1.0, 0.0)
    patched.model_options[OFFSETS_MARK] = concept.name
    return patched


def expected_config(host: ComfyHost, encoder: TuningEncoder, vision: torch.Tensor, unet: torch.Tensor,
                    targets: str) -> EncoderConfig:
    c = encoder.config
    return EncoderConfig(vision.shape[-1], unet.shape[-1], {k: e.width for k, e in host.encoders.items()},
                         host.unet_targets(targets), c.rank, c.hidden)


_SIGNATURES: weakref.WeakKeyDictionary[Any, list[float]] = weakref.WeakKeyDictionary()  # per CLIP_VISION object


def wired_signature(host: ComfyHost) -> list[float]:
    """The signature of the host's CLIP vision model, computed once per loaded model (one forward)."""
    if host.clip_vision not in _SIGNATURES:
        _SIGNATURES[host.clip_vision] = vision_signature(host.image_features(signature_image()))
    return _SIGNATURES[host.clip_vision]


def predicted(host: ComfyHost, pixels: torch.Tensor, encoder: TuningEncoder, encoder_name: str, class_word: str,
              options: tuning.Options, seed: int) -> tuning.TunedPrediction:
    """The encoder's prediction from the first image, as the starting point of the tuning steps."""
    image = pixels[:1]
    vision = host.image_features(image)
    latent = host.encode_images(image)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)).to(latent)
    unet = host.unet_features(latent, noise, torch.tensor([FEATURE_TIMESTEP], device=latent.device))
    problems = mismatches(encoder.config, expected_config(host, encoder, vision, unet, options.targets))
    if not problems and encoder.vision_signature is not None:  # widths differ: no need to tell the models apart
        problem = vision_problem(encoder, wired_signature(host))
        if problem:
            problems.append(problem)
    if problems:
        made_for = f" It was pretrained on {encoder.made_for}." if encoder.made_for else ""
        raise ValueError(f"the encoder {encoder_name} was made for another model: {'; '.join(problems)}."
                         f"{made_for} Choose an encoder pretrained for this checkpoint type, vision model and "
                         "targets, or encoder none.")
    class_embeddings = init_vectors(host, class_word, 0)
    encoder = encoder.to(host.device)
    with torch.no_grad():
        p = encoder(vision, unet, class_embeddings)
    embeddings = {k: e[0] for k, e in p.embeddings.items()}
    return tuning.TunedPrediction(host, class_word.strip(), class_embeddings, embeddings, encoder.config.targets,
                                  [u[0] for u in p.up], [d[0] for d in p.down], options, encoder_name)


def load_weights(name: str) -> TuningEncoder:
    try:
        return load_encoder(folder_paths.get_full_path_or_raise(ENCODERS, name))
    except ValueError as e:
        raise ValueError(f"{NODE}: {e} Choose another encoder, or none.") from e


class TuningEncoderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeTuningEncoder",
            display_name=NODE,
            category=CATEGORY,
            description="One-image personalization: an encoder predicts a token and LoRA offsets from the image, "
                        "then a dozen tuning steps refine them.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of the checkpoint (SD 1.x, SD 2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint."),
                io.Image.Input("image", tooltip="One image of the concept (more are used for tuning; the first is "
                               "the one the encoder sees)."),
                io.String.Input("name", default="my_concept", tooltip="What prompts call the concept: "
                                "embedding:<name>."),
                io.String.Input("class_word", default="object", tooltip="The concept's class ('dog', 'mug'); the "
                                "embedding is predicted near it, and starts at it without encoder weights."),
                io.Combo.Input("encoder", options=[NO_ENCODER, *folder_paths.get_filename_list(ENCODERS)],
                               default=NO_ENCODER, tooltip="Pretrained encoder weights from models/concept_encoders "
                               "(tools/pretrain_encoder.py makes them for a checkpoint type). none: start from the "
                               "class word and zero offsets — then this is a plain LoRA + embedding tuner, which "
                               f"needs {tuning.NO_WEIGHTS_NEED}."),
                io.Int.Input("tuning_steps", default=12, min=0, max=1000, tooltip="Steps refining the prediction. "
                             "The paper uses 12 or fewer; 0 keeps the encoder's prediction as it is."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.0001, tooltip="Learning "
                               "rate of each tuning step, whatever the batch size. 0 uses this pack's default (the "
                               "paper does not report one): 0.01 from encoder weights, 0.001 without."),
                io.Combo.Input("targets", options=list(ATTENTION_PROJECTIONS), default="attention q/k/v/out",
                               tooltip="The UNet projections that get LoRA offsets: q/k/v/out of every attention "
                               "(default), q/k/v (E4T), or the cross-attention k/v (Custom Diffusion)."),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank without encoder weights; an "
                             "encoder brings its own."),
                io.Float.Input("blend", default=tuning.Options.blend, min=0.0, max=1.0, step=0.05,
                               tooltip="α of the dual path while tuning, in every attention block: α·(soft token, "
                               "offsets) + (1 − α)·(nearest real word, original weights). 1 turns it off; the "
                               "paper's value is not reported (README: how this one was chosen)."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8, tooltip="Tuning resolution; 0 uses "
                             "the model's own (512 / 768 / 1024)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the tuning's draws and the offsets' random start."),
                io.Float.Input("contrastive", default=tuning.Options.contrastive, optional=True, min=0.0, max=1.0,
                               step=0.001,
                               tooltip="Weight of the term that keeps the embedding near its nearest real words and "
                               "away from the rest of the vocabulary. 0 turns it off."),
                io.Int.Input("contrastive_k", default=tuning.Options.contrastive_k, optional=True, min=1, max=64,
                             tooltip="How many of the embedding's nearest real words the contrastive term pulls it "
                             "toward (this pack's choice; README: how it was chosen)."),
                io.Float.Input("contrastive_temperature", default=tuning.Options.contrastive_temperature,
                               optional=True, min=0.01, max=1.0, step=0.01, tooltip="τ of the contrastive term: "
                               "lower sharpens it toward the nearest words (this pack's choice)."),
                io.Int.Input("batch_size", default=0, optional=True, min=0, max=64,
                             tooltip="Samples per tuning step, each with its own timestep and noise, run as "
                             "passes over the images (memory of one pass) and averaged into one step. 0: 8 with "
                             "captions (the most likeness in this pack's measurements), otherwise one per image; "
                             "without a caption, more samples fold the image's layout into the concept."),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip="What else the "
                                "image shows, naming the concept as {} or by its name ('a photo of a big {} on a "
                                "beach'): one line per image, or one for all. Say its size and place too: what a "
                                "caption leaves out or gets wrong, the tuning folds into the concept. Empty: the "
                                "'a photo of a {}' templates."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="A CLIP vision model (CLIP Vision Loader); "
                                    "needed with encoder weights, which read the image through it."),
            ],
            outputs=[
                io.Model.Output("concept_model", display_name="model", tooltip="The MODEL with the LoRA offsets."),
                io.Clip.Output("concept_clip", display_name="clip", tooltip="The CLIP on which embedding:<name> "
                               "is the concept."),
                ConceptIO.Output("concept", display_name="concept", tooltip="Save Concept keeps it (and can "
                                 "export a stock LoRA and embedding)."),
                io.Image.Output("loss_plot", display_name="loss_plot", tooltip="The tuning loss per step."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, name: str = "my_concept", class_word: str = "object", encoder: str = NO_ENCODER,
                        learning_rate: float = 0.0, targets: str = "attention q/k/v/out",
                        blend: float = tuning.Options.blend, contrastive: float = tuning.Options.contrastive,
                        contrastive_k: int = tuning.Options.contrastive_k,
                        contrastive_temperature: float = tuning.Options.contrastive_temperature,
                        batch_size: int = 0, captions: str = "") -> bool | str:
        sent = dict(name=name, class_word=class_word, encoder=encoder, learning_rate=learning_rate, targets=targets,
                    blend=blend, contrastive=contrastive, contrastive_k=contrastive_k,
                    contrastive_temperature=contrastive_temperature, batch_size=batch_size, captions=captions)
        problem = schema_problem(cls, NODE, **{k: v for k, v in sent.items() if v is not None})  # None: linked,
        if problem:                                                                             # checked in execute
            return problem
        if name is not None and name_problem(name):
            return f"{NODE}: {name_problem(name)}."
        if class_word is not None and not class_word.strip():
            return f"{NODE}: class_word is empty; give the concept's class, e.g. 'dog'."
        if name is not None and captions is not None and captions.strip():
            try:  # the image count is not known yet: one line or several, each must name the concept
                caption_prompts(captions, name, sum(1 for line in captions.splitlines() if line.strip()))
            except ValueError as e:
                return f"{NODE}: {e}"
        return True

    @classmethod
    def execute(cls, model, clip, vae, image, name, class_word, encoder, tuning_steps, learning_rate, targets, rank,
                blend, resolution, seed, contrastive=tuning.Options.contrastive,
                contrastive_k=tuning.Options.contrastive_k,
                contrastive_temperature=tuning.Options.contrastive_temperature, batch_size=0,
                captions="", clip_vision=None) -> io.NodeOutput:
        weights = None if encoder == NO_ENCODER else load_weights(encoder)
        rate = {} if weights is None else {"learning_rate": tuning.PRETRAINED_LEARNING_RATE}  # the default, when 0
        options = tuning.Options(rank=rank, targets=targets, blend=blend, contrastive=contrastive,
                                 contrastive_k=int(contrastive_k), contrastive_temperature=contrastive_temperature,
                                 **rate)
        if weights is not None and clip_vision is None:
            raise ValueError(f"{NODE}: the encoder {encoder} reads the image through a CLIP vision model; connect "
                             "a CLIP Vision Loader to clip_vision, or choose encoder none.")

        def build(host: ComfyHost, pixels: torch.Tensor) -> tuning.TunedPrediction:
            if weights is None:
                return tuning.build(host, class_word, 0, options, seed)
            return predicted(host, pixels, weights, encoder, class_word, options, seed)

        samples = tuning.samples_per_step(int(batch_size), len(image), bool(captions.strip()))
        per_pass, passes = tuning.passes_per_step(samples, len(image))
        settings = LearnSettings(name, class_word, "tuning_encoder", tuning_steps, learning_rate, batch_size=per_pass,
                                 resolution=resolution, prompts="captions" if captions.strip() else "object",
                                 seed=seed, captions=captions, method_options=options,
                                 training=TrainingOptions(gradient_accumulation=passes, checkpoint_every=0,
                                                          scale_learning_rate=False))  # a rate per step
        learned = learn(model, clip, vae, image, None, settings, cls.hidden.unique_id, cls.hidden.prompt, node=NODE,
                        build=build, clip_vision=clip_vision)
        concept = learned.concept
        plot = loss_plot(learned.result.losses, f"{name} · tuning encoder · loss per step")
        return io.NodeOutput(model_with_offsets(model, concept), apply_concepts(clip, [concept], NODE), concept, plot,
                             ui={"text": [summary(learned)], "loss": learned.result.losses})


NODES = [TuningEncoderNode]

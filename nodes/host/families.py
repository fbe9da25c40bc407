"""Which model family a CLIP and a MODEL belong to, and the refusal when they do not match or are not supported."""

from __future__ import annotations

from typing import Any

from ...trainers.concept import ARCH_ENCODERS, ARCH_LABELS, ENCODER_NAMES, Arch

# ComfyUI's classes by name (a class or any of its bases: sd3_clip() subclasses SD3ClipModel per checkpoint)
CLIP_ARCHS: dict[str, Arch] = {"SD1ClipModel": "sd1", "SD2ClipModel": "sd2", "SDXLClipModel": "sdxl",
                               "SD3ClipModel": "sd3", "FluxClipModel": "flux", "LuminaModel": "lumina2"}
MODEL_ARCHS: dict[str, Arch] = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                                "KOALA_700M": "sdxl", "KOALA_1B": "sdxl",  # the distilled SDXLs share its CLIP
                                "SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux", "Lumina2": "lumina2"}
# model classes that inherit a supported one but condition differently (Z-Image: Qwen3 on Lumina 2's DiT)
NOT_SUPPORTED = {"ZImage"}
SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD 3.5, Flux.1 and Lumina 2"
SD_ONLY: tuple[Arch, ...] = ("sd1", "sd2", "sdxl")  # CatVersion and the Tuning Encoder patch a UNet's CLIP and UNet


def _by_class(table: dict[str, Arch], obj: Any) -> Arch | None:
    for c in type(obj).__mro__:
        if c.__name__ in NOT_SUPPORTED:
            return None
        if c.__name__ in table:
            return table[c.__name__]
    return None


def clip_arch(clip: Any) -> Arch | None:
    arch = _by_class(CLIP_ARCHS, clip.cond_stage_model)
    if arch is not None and not any(getattr(clip.cond_stage_model, ENCODER_NAMES[k], None) is not None
                                    for k in ARCH_ENCODERS[arch]):
        return None  # a family's class around other encoders (Lumina's text model around Gemma 3)
    return arch


def model_arch(model: Any) -> Arch | None:
    return _by_class(MODEL_ARCHS, model.model.model_config)


def encoder_keys(clip: Any) -> tuple[str, ...]:
    """The text encoders this CLIP has, in ComfyUI's order (an SD 3.5 checkpoint may come without some)."""
    arch = clip_arch(clip)
    if arch is None:
        return ()
    return tuple(k for k in ARCH_ENCODERS[arch] if getattr(clip.cond_stage_model, ENCODER_NAMES[k], None) is not None)


TEXT_ENCODER_CHOICES = ("family default", "CLIP only", "T5 / LLM only")
CLIP_KEYS = ("l", "g", "h")
TEXT_ENCODERS_TOOLTIP = (
    "Which text encoders' vectors train; the others keep their starting vectors (the init word's; under DTI its "
    "direction at the vocabulary's norm), and the file still has one per encoder. family default trains every "
    "encoder the family conditions on: CLIP-L (SD 1.x), CLIP-H (SD 2.x), CLIP-L and CLIP-G (SDXL), CLIP-L, CLIP-G "
    "and T5-XXL (SD 3.5), T5-XXL and CLIP-L (Flux.1; CLIP-L only sets the pooled vector), Gemma-2 (Lumina 2). "
    "CLIP only skips the backward pass through T5, the largest memory cost on SD 3.5 and Flux.1. T5 / LLM only "
    "trains T5 or Gemma alone.")


def frozen_encoders(keys: tuple[str, ...], choice: str, arch: Arch) -> tuple[str, ...]:
    """The encoders among `keys` whose vectors stay at the init word's under `choice`, or a refusal when none would
    train."""
    if choice not in TEXT_ENCODER_CHOICES:
        raise ValueError(f"text_encoders {choice!r} is not one of {', '.join(TEXT_ENCODER_CHOICES)}.")
    trained = {"family default": keys, "CLIP only": tuple(k for k in keys if k in CLIP_KEYS),
               "T5 / LLM only": tuple(k for k in keys if k not in CLIP_KEYS)}[choice]
    if not trained:
        raise ValueError(f"text_encoders is {choice!r} but this {ARCH_LABELS[arch]} CLIP has no such encoder; choose "
                         "family default.")
    return tuple(k for k in keys if k not in trained)


def describe_clip(clip: Any) -> str:
    arch = clip_arch(clip)
    return ARCH_LABELS[arch] if arch else type(clip.cond_stage_model).__name__


def detect_arch(model: Any, clip: Any, node: str) -> Arch:
    """The architecture shared by MODEL and CLIP, or a clear error naming the node."""
    if clip is None or model is None:
        raise ValueError(f"{node}: the {'CLIP' if clip is None else 'MODEL'} input is empty; connect the outputs "
                         "of Load Checkpoint.")
    c_arch, m_arch = clip_arch(clip), model_arch(model)
    supported = SUPPORTED
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

"""Which model family a CLIP and a MODEL belong to, and the refusal when they do not match or are not supported."""

from __future__ import annotations

from typing import Any

from ...trainers.concept import ARCH_LABELS, Arch

CLIP_ARCHS: dict[str, Arch] = {"SD1ClipModel": "sd1", "SD2ClipModel": "sd2", "SDXLClipModel": "sdxl"}
MODEL_ARCHS: dict[str, Arch] = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                                "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}  # the distilled SDXLs share its CLIP
ENCODER_KEYS: dict[Arch, tuple[str, ...]] = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}


def clip_arch(clip: Any) -> Arch | None:
    return CLIP_ARCHS.get(type(clip.cond_stage_model).__name__)


def model_arch(model: Any) -> Arch | None:
    return MODEL_ARCHS.get(type(model.model.model_config).__name__)


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

"""The CONCEPT value: what a method learned, for which base model, and how (docs/DESIGN.md, "The concept value")."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, get_args

import torch
from torch import Tensor

Method = Literal["ti", "dti", "batex", "catversion", "tuning_encoder"]
Arch = Literal["sd1", "sd2", "sdxl", "sd3", "flux", "lumina2"]
EncoderKey = Literal["l", "g", "h", "t5xxl", "gemma2_2b"]

METHODS: tuple[Method, ...] = get_args(Method)
ARCHS: tuple[Arch, ...] = get_args(Arch)
TOKEN_METHODS: tuple[Method, ...] = ("ti", "dti", "batex")  # saved as stock embedding files

# The text encoders each architecture conditions on, in ComfyUI's order, and their real widths.
ARCH_ENCODERS: dict[Arch, tuple[EncoderKey, ...]] = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g"),
                                                     "sd3": ("l", "g", "t5xxl"), "flux": ("l", "t5xxl"),
                                                     "lumina2": ("gemma2_2b",)}
ENCODER_WIDTHS: dict[EncoderKey, int] = {"l": 768, "h": 1024, "g": 1280, "t5xxl": 4096, "gemma2_2b": 2304}
# each encoder's name in ComfyUI: its attribute on the CLIP model and tokenizer, and the key of its vectors in a
# multi-encoder embedding file that ComfyUI's tokenizer reads (`embedding_key`)
ENCODER_NAMES: dict[str, str] = {"l": "clip_l", "g": "clip_g", "h": "clip_h", "t5xxl": "t5xxl",
                                 "gemma2_2b": "gemma2_2b"}
ARCH_LABELS: dict[Arch, str] = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.5", "flux": "Flux.1",
                                "lumina2": "Lumina 2"}
# files keyed per encoder (the key ComfyUI's tokenizer for that encoder reads), not one `emb_params`
MULTI_ENCODER_ARCHS: tuple[Arch, ...] = ("sdxl", "sd3", "flux", "lumina2")

# A name must survive both a file name and ComfyUI's prompt parser: "embedding:<name>" ends at whitespace,
# loses a trailing comma, and parentheses or colons are weight syntax.
# what stock ComfyUI finds as embedding:<name>: letters and digits of any script, '_', '-' and '.', no spaces or
# prompt syntax; not starting with '.' (a hidden file)
_NAME = re.compile(r"^[\w\-][\w.\-]*$")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_NAME_BYTES = 240  # file systems allow 255 bytes for a name, and ".safetensors" takes 12


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a concept name, or None when it can."""
    if not name:
        return "the name is empty"
    if "/" in name or "\\" in name or ".." in name:
        return f"'{name}' contains a path separator or '..'"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"'{name[:40]}...' is longer than a file name can be ({MAX_NAME_BYTES} bytes)"
    if name.endswith(".") or name.split(".")[0].upper() in _RESERVED:
        return f"'{name}' is a name Windows cannot give a file (reserved, or ending in '.')"
    if not _NAME.match(name):
        return (f"'{name}' may only contain letters, digits, '_', '-' and '.' (it is typed as embedding:{name} "
                "in prompts)")
    return None


@dataclass(frozen=True)
class Concept:
    """A learned concept. Tensors live on the CPU in float32.

    Args:
        name (`str`): what prompts call it (`embedding:<name>`).
        method (`Method`): the method that learned it; third-party embeddings load as `"ti"`.
        arch (`Arch`): the base-model family it was learned on.
        vectors (`Mapping[str, Tensor]`): per text encoder (`l`, `g`, `h`) the token vectors, each `[n, d]`;
            empty for methods that inject no token (CatVersion).
        state (`Mapping[str, Any]`): method state that is JSON-serialisable (DTI magnitude, BaTex weights, ...).
        tensors (`Mapping[str, Tensor]`): method tensors that are not token vectors (CatVersion residuals, LoRA).
        provenance (`Mapping[str, Any]`): how it was made: init word, steps, learning rate, seed, checkpoint, ...
    """

    name: str
    method: Method
    arch: Arch
    vectors: Mapping[str, Tensor]
    state: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown concept method {self.method!r}; expected one of {METHODS}.")
        if self.arch not in ARCHS:
            raise ValueError(f"Unknown architecture {self.arch!r}; expected one of {ARCHS}.")
        problem = name_problem(self.name)
        if problem:
            raise ValueError(f"Invalid concept name: {problem}.")
        expected = set(ARCH_ENCODERS[self.arch])
        if self.vectors and set(self.vectors) != expected:
            raise ValueError(f"A {self.arch} concept needs vectors for encoders {sorted(expected)}, "
                             f"got {sorted(self.vectors)}.")
        counts = {v.shape[0] for v in self.vectors.values()}
        if any(v.dim() != 2 for v in self.vectors.values()) or len(counts) > 1:
            shapes = {k: tuple(v.shape) for k, v in self.vectors.items()}
            raise ValueError(f"Concept vectors must be [n, d] with the same n for every encoder, got {shapes}.")
        if self.method in TOKEN_METHODS and not self.vectors:
            raise ValueError(f"A {self.method} concept needs token vectors.")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0] if self.vectors else 0

    @property
    def is_token_concept(self) -> bool:
        """True when the concept is fully described by its token vectors (a stock embedding file)."""
        return self.method in TOKEN_METHODS

    def renamed(self, name: str) -> Concept:
        return replace(self, name=name)

    def norms(self) -> dict[str, list[float]]:
        return {k: [round(float(x), 6) for x in v.norm(dim=-1)] for k, v in self.vectors.items()}

    def is_finite(self) -> bool:
        tensors = list(self.vectors.values()) + list(self.tensors.values())
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def cpu_float(t: Tensor) -> Tensor:
    """A detached float32 CPU copy, the form every tensor of a Concept takes."""
    return t.detach().to(device="cpu", dtype=torch.float32).clone()


def arch_for_width(width: int) -> Arch | None:
    """The architecture a single-encoder embedding of this width belongs to (768 → SD 1.x, 1024 → SD 2.x)."""
    return {768: "sd1", 1024: "sd2"}.get(width)  # type: ignore[return-value]

"""Applying token concepts to a CLIP in memory: a clone whose tokenizer resolves `embedding:<name>` to the
concept (docs/COMFYUI.md §1.6-2). Stock CLIP Text Encode on the returned CLIP then uses it; the input CLIP is
unchanged. Apply DTI Token builds on this."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..trainers.concept import ARCH_LABELS, ENCODER_NAMES, Concept
from .host import clip_arch, describe_clip, encoder_keys, tokenizer_with_lookup


def check_concept_fits(concept: Concept, clip: Any, node: str) -> None:
    """Refuse a concept learned for another architecture, naming both."""
    arch = clip_arch(clip)
    if arch != concept.arch:
        raise ValueError(f"{node}: concept '{concept.name}' was learned on {ARCH_LABELS[concept.arch]} but this CLIP "
                         f"is {describe_clip(clip)}; load a matching checkpoint or relearn the concept.")
    widths = {k: int(table.shape[1]) for k, table in encoder_tables(clip).items()}
    for key, vectors in concept.vectors.items():
        # an encoder this checkpoint lacks (SD 3.5 without T5) never sees its vectors, as with stock files
        if key in widths and vectors.shape[-1] != widths[key]:
            raise ValueError(f"{node}: concept '{concept.name}' has {vectors.shape[-1]}-wide vectors for "
                             f"{ENCODER_NAMES[key]} but this CLIP's are {widths[key]}-wide; it belongs to another "
                             "model.")


def apply_concepts(clip: Any, concepts: Sequence[Concept], node: str) -> Any:
    """A clone of `clip` on which `embedding:<concept name>` resolves to each concept's vectors."""
    for concept in concepts:
        check_concept_fits(concept, clip, node)
        if not concept.vectors:
            raise ValueError(f"{node}: concept '{concept.name}' is a {concept.method} concept with no token vectors; "
                             "use the node made for that method.")
    table = {c.name: c for c in concepts}

    def lookup(key: str, name: str) -> Tensor | None:
        concept = table.get(name)
        return None if concept is None else concept.vectors.get(key)

    applied = clip.clone()
    applied.tokenizer = tokenizer_with_lookup(clip.tokenizer, encoder_keys(clip), lookup)
    return applied


def encoder_tables(clip: Any) -> dict[str, Tensor]:
    """The token-embedding table [V, d] of each text encoder of a supported CLIP (read only)."""
    model = clip.cond_stage_model
    return {k: getattr(model, ENCODER_NAMES[k]).transformer.get_input_embeddings().weight for k in encoder_keys(clip)}

"""`embedding:<name>` resolved by the pack before ComfyUI's embedding folders: how Apply Concept's CLIP and the
training prompts' concept slot reach the tokenizer."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from torch import Tensor

from ...trainers.concept import ENCODER_NAMES

Lookup = Callable[[str, str], "Tensor | None"]  # (encoder key, embedding name) → [n, d] vectors or None
TryGet = Callable[[str], tuple[Any, str]]  # SDTokenizer._try_get_embedding: name → (vectors or None, leftover)


def tokenizer_with_lookup(tokenizer: Any, keys: Sequence[str], lookup: Lookup) -> Any:
    """A copy of a ComfyUI tokenizer on which `embedding:<name>` asks `lookup` before the embedding folders.

    The copy is shallow except for the per-encoder sub-tokenizers, which get the override; `CLIP.clone()` shares
    its tokenizer, so the original is never touched (docs/COMFYUI.md §1.6-2). Lookups stack: an earlier override
    stays the fallback of a later one.
    """
    tokenizer = copy.copy(tokenizer)
    for key in keys:
        sub = copy.copy(getattr(tokenizer, ENCODER_NAMES[key]))
        sub._try_get_embedding = _lookup_first(key, lookup, sub._try_get_embedding)
        if sub.embedding_directory is None:  # ComfyUI only parses "embedding:" when a folder list exists
            sub.embedding_directory = []
        setattr(tokenizer, ENCODER_NAMES[key], sub)
    return tokenizer


def _lookup_first(key: str, lookup: Lookup, fallback: TryGet) -> TryGet:
    def try_get_embedding(embedding_name: str) -> tuple[Any, str]:
        words = embedding_name.split()
        if not words:
            return fallback(embedding_name)
        name, leftover = words[0], " ".join(words[1:])
        # as ComfyUI does: a trailing comma is not part of the name and goes back to the prompt
        for candidate in dict.fromkeys((name, name.rstrip(","))):
            found = lookup(key, _strip_extension(candidate))
            if found is not None:
                rest = name[len(candidate):]
                return found, f"{rest} {leftover}".strip() if rest else leftover
        return fallback(embedding_name)
    return try_get_embedding


def _strip_extension(name: str) -> str:
    for ext in (".safetensors", ".pt", ".bin"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name

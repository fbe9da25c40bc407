"""Residual keys and values in the self-attention of ComfyUI's CLIP layers (CatVersion; docs/COMFYUI.md §1.8).

`ResidualAttention` replaces a `CLIPAttention.forward` through an object patch on a CLIP clone: it projects q, k
and v as the original does, appends each active concept's residual keys and values, widens the causal mask by
their logit biases, and attends. Which concepts are active is decided per prompt: `tag_prompt` records it when
the tokenizer runs, and the patched `encode_token_weights` makes it current while that prompt is encoded.
"""

from __future__ import annotations

import contextvars
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

# Concepts active for the prompt being encoded; None means "all" (tokens this pack did not tag, and training).
ACTIVE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("concept_forge_active", default=None)
_TAGS: OrderedDict[int, tuple[Any, set[str]]] = OrderedDict()  # id(tokens) → (tokens, active concept names)
_TAG_LIMIT = 256


@dataclass(frozen=True)
class ResidualEntry:
    keys: Tensor          # [t, d]
    values: Tensor        # [t, d]
    bias: float           # logit bias of these keys: the mask bias, plus log(strength) at generation
    concept: str | None   # the concept it belongs to; None: always active


class ResidualAttention:
    """A CLIPAttention.forward with residual keys and values appended after the projections."""

    def __init__(self, attention: torch.nn.Module, entries: list[ResidualEntry]):
        self.attention, self.entries = attention, entries

    def __call__(self, x: Tensor, mask: Tensor | None = None, optimized_attention: Any = None) -> Tensor:
        attn = self.attention
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)                 # [B, L, d]
        active = ACTIVE.get()
        entries = [e for e in self.entries if e.concept is None or active is None or e.concept in active]
        if entries:
            b, length = x.shape[:2]
            keys = torch.cat([e.keys for e in entries]).to(k)                      # [T, d]
            values = torch.cat([e.values for e in entries]).to(v)
            biases = torch.cat([torch.full((len(e.keys),), e.bias) for e in entries]).to(k)
            biases = biases.clamp(min=-torch.finfo(k.dtype).max)                    # strength 0: log 0 = -inf
            k = torch.cat([k, keys.expand(b, -1, -1)], dim=1)                       # [B, L + T, d]
            v = torch.cat([v, values.expand(b, -1, -1)], dim=1)
            if mask is None:
                mask = torch.zeros(length, length, dtype=k.dtype, device=k.device)
            mask = torch.cat([mask, biases.expand(*mask.shape[:-1], -1)], dim=-1)  # every query sees them
        return attn.out_proj(optimized_attention(q, k, v, attn.heads, mask))


def tag_prompt(tokens: Any, concepts: set[str]) -> None:
    """Remember which concepts `tokens` (a tokenizer's output) activates; later tags of the same prompt add up."""
    key = id(tokens)
    if key in _TAGS and _TAGS[key][0] is tokens:
        _TAGS[key][1].update(concepts)
    else:
        _TAGS[key] = (tokens, set(concepts))  # holding the tokens keeps their id from being reused
    _TAGS.move_to_end(key)
    while len(_TAGS) > _TAG_LIMIT:
        _TAGS.popitem(last=False)


def active_for(tokens: Any) -> frozenset[str] | None:
    entry = _TAGS.get(id(tokens))
    return frozenset(entry[1]) if entry is not None and entry[0] is tokens else None


class ActivatingEncode:
    """cond_stage_model.encode_token_weights that makes the prompt's tagged concepts active while it encodes."""

    def __init__(self, encode: Callable[[Any], Any]):
        self.encode = encode

    def __call__(self, token_weight_pairs: Any) -> Any:
        token = ACTIVE.set(active_for(token_weight_pairs))
        try:
            return self.encode(token_weight_pairs)
        finally:
            ACTIVE.reset(token)


def tokenizer_tagging(tokenizer: Any, concept: str, applies: Callable[[str], bool]) -> Any:
    """A copy of `tokenizer` whose output is tagged with `concept` when `applies(text)`."""
    tagging = copy.copy(tokenizer)
    tokenize = tokenizer.tokenize_with_weights

    def tokenize_with_weights(text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
        tokens = tokenize(text, return_word_ids, **kwargs)
        tag_prompt(tokens, {concept} if applies(text) else set())
        return tokens

    tagging.tokenize_with_weights = tokenize_with_weights
    return tagging

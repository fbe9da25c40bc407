"""Low-rank weight offsets on the denoiser's attention projections (the tuning encoder's LoRA), as ComfyUI weight
wrappers that stay differentiable, and DATE's dual path over the attention modules they sit in."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.nn import Module

ATTENTION_PROJECTIONS = {  # the tuning encoder's LoRA targets, by option
    "attention q/k/v/out": ("attn1", "attn2"), "attention q/k/v": ("attn1", "attn2"), "cross-attention k/v": ("attn2",),
}
PROJECTION = re.compile(r"(?:^|\.)(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")  # a BasicTransformerBlock's


class Offsets:
    """The weight offsets' current factors, shared by their wrappers: replacing a factor (pretraining predicts new
    ones for every image) needs no reload, and `enabled` turns them all off for the dual path's hard branch."""

    def __init__(self) -> None:
        self.enabled = True
        self.scale = 1.0
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # weight key → (up [out, r], down [r, in])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


class LoraDelta:
    """A weight wrapper: W + scale·up@down (docs/COMFYUI.md §2.5), differentiable in up and down."""

    def __init__(self, key: str, offsets: Offsets):
        self.key, self.offsets = key, offsets

    def __call__(self, weight: Tensor) -> Tensor:
        factors = self.offsets.factors.get(self.key)
        if not self.offsets.enabled or factors is None:
            return weight
        up, down = factors
        return weight + (self.offsets.scale * (up @ down)).to(weight)


def attention_targets(diffusion_model: Module, kind: str) -> list[tuple[str, int, int]]:
    """The projections of `kind` as (weight key, out, in)."""
    if kind not in ATTENTION_PROJECTIONS:
        raise ValueError(f"targets must be one of {', '.join(ATTENTION_PROJECTIONS)}, got {kind!r}.")
    projections = {"to_k", "to_v"} if kind == "cross-attention k/v" else {"to_q", "to_k", "to_v"}
    if kind == "attention q/k/v/out":
        projections.add("to_out.0")
    targets = []
    for name, module in diffusion_model.named_modules():
        found = PROJECTION.search(name)
        if found and found.group(1) in ATTENTION_PROJECTIONS[kind] and found.group(2) in projections:
            out_features, in_features = module.weight.shape
            targets.append((f"diffusion_model.{name}.weight", int(out_features), int(in_features)))
    return targets


DUAL_PATH = "concept_forge_dual_path"  # transformer_options key: (α, hard context [B, T, d]) for one prediction


class DualPathAttention:
    """An attention module's forward (an object patch) that, when `transformer_options[DUAL_PATH]` is set, returns
    α·soft + (1 − α)·hard (DATE's dual path, docs/METHODS.md §6.2). soft is the module as patched (the prompt's
    context, W + ΔW); hard is the same module with the offsets off and, for cross-attention, the hard prompt's
    context — computed without gradient, so gradients flow through the soft branch only.

    The key travels in transformer_options, not in a field of this object, so a gradient checkpoint that
    recomputes the block sees the same α and hard context as the forward did. Both inner calls run without the key:
    a wrapped forward reached from inside (another clone's patch) computes once, never recursing into a dual path.
    A `value` that is the context itself (attn2 patches pass it so) is the hard context in the hard branch; other
    values (set by patches) are kept. Attention replace patches bypass the module's forward and so the dual path.
    """

    def __init__(self, forward: Callable[..., Tensor], offsets: Offsets, cross: bool):
        self.forward, self.offsets, self.cross = forward, offsets, cross

    def __call__(self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None,
                 mask: Tensor | None = None, transformer_options: dict[str, Any] | None = None, **kwargs: Any
                 ) -> Tensor:
        options = transformer_options or {}
        if DUAL_PATH not in options:
            return self.forward(x, context=context, value=value, mask=mask, transformer_options=options, **kwargs)
        alpha, hard_prompt = options[DUAL_PATH]
        single = {k: v for k, v in options.items() if k != DUAL_PATH}
        soft = self.forward(x, context=context, value=value, mask=mask, transformer_options=single, **kwargs)
        hard_context, hard_value = context, value
        if self.cross and context is not None:
            if hard_prompt.shape != context.shape:
                raise ValueError(f"the dual path's hard context has shape {tuple(hard_prompt.shape)}, the "
                                 f"prompt's {tuple(context.shape)}; the hard prompt must be the same prompt.")
            hard_context = hard_prompt.to(context)
            hard_value = hard_context if value is context else value
        with torch.no_grad(), self.offsets.disabled():
            hard = self.forward(x, context=hard_context, value=hard_value, mask=mask, transformer_options=single,
                                **kwargs)
        return alpha * soft + (1 - alpha) * hard


def wrap_weights(patcher: Any, keys: Iterable[str], offsets: Offsets) -> None:
    """A `LoraDelta` weight wrapper over each weight `key` of a ModelPatcher (effective on its next load)."""
    for key in keys:
        patcher.add_weight_wrapper(key, LoraDelta(key, offsets))


def patch_dual_path(patcher: Any, offsets: Offsets) -> int:
    """Every attention module's forward of a ModelPatcher's UNet as a `DualPathAttention` over `offsets` (object
    patches, effective on its next load); how many modules were patched (0: not a UNet with such blocks)."""
    modules = attention_modules(patcher.model.diffusion_model)
    for path, cross in modules:
        name = f"diffusion_model.{path}.forward"
        patcher.add_object_patch(name, DualPathAttention(patcher.get_model_object(name), offsets, cross))
    return len(modules)


def attention_modules(diffusion_model: Module) -> list[tuple[str, bool]]:
    """The transformer blocks' attention modules (those `attention_targets` finds projections in) as
    (module path under the diffusion model, whether it is the cross-attention attn2)."""
    keys = attention_targets(diffusion_model, "attention q/k/v/out")
    paths = sorted({key.removeprefix("diffusion_model.").rsplit(".to_", 1)[0] for key, _, _ in keys})
    return [(path, path.endswith("attn2")) for path in paths]

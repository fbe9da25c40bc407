"""What Flux.1's transformer needs before autograd can pass through it (found on ComfyUI 0.3.64 and 0.8.0, checked
against float64 finite differences):

- its blocks add to their streams in place (`txt += …`, `x += …`; 0.8 also `img += …`), overwriting tensors its
  LayerNorms saved for the backward pass: each norm gets a copy of its input instead;
- checkpointing a block recomputes it from its inputs, which the block itself then overwrites: the checkpointed
  function works on copies;
- ComfyUI 0.8 computes RoPE with comfy_kitchen operations that have no backward: while a host trains, Flux's
  attention uses the plain torch RoPE (the same arithmetic as 0.3.64's), and the original is put back after.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DOUBLE_NORMS = ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")
STREAMS = ("img", "txt", "x")   # the arguments a block updates in place


def _copy_input(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return forward(x.clone(), *args, **kwargs)
    return run


def _checkpointed_on_copies(forward: Callable[..., Any]) -> Callable[..., Any]:
    def on_copies(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.clone() if k in STREAMS and torch.is_tensor(v) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(on_copies, *args, use_reentrant=False, **kwargs)
    return run


def patch_for_autograd(model: Any, gradient_checkpointing: bool) -> None:
    """Object patches on a Flux ModelPatcher clone (applied when it loads)."""
    network = model.model.diffusion_model
    for i, block in enumerate(network.double_blocks):
        for norm in DOUBLE_NORMS:
            model.add_object_patch(f"diffusion_model.double_blocks.{i}.{norm}.forward",
                                   _copy_input(getattr(block, norm).forward))
        if gradient_checkpointing:
            model.add_object_patch(f"diffusion_model.double_blocks.{i}.forward", _checkpointed_on_copies(block.forward))
    for i, block in enumerate(network.single_blocks):
        model.add_object_patch(f"diffusion_model.single_blocks.{i}.pre_norm.forward",
                               _copy_input(block.pre_norm.forward))
        if gradient_checkpointing:
            model.add_object_patch(f"diffusion_model.single_blocks.{i}.forward", _checkpointed_on_copies(block.forward))


def _rope1(x: Tensor, freqs: Tensor) -> Tensor:
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)


def _rope(q: Tensor, k: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    return _rope1(q, freqs), _rope1(k, freqs)


def differentiable_rope(module_name: str = "comfy.ldm.flux.math") -> Callable[[], None]:
    """Point the attention of `module_name` (Flux's, or Lumina 2's, which imports Flux's RoPE on ComfyUI 0.8) at the
    torch RoPE; returns what puts the original back. A module without its own binding is left alone."""
    import importlib

    module = importlib.import_module(module_name)
    if not hasattr(module, "apply_rope"):
        return lambda: None
    original = module.apply_rope
    module.apply_rope = _rope

    def restore() -> None:
        module.apply_rope = original
    return restore

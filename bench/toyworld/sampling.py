"""Text-to-image through ComfyUI's stock nodes (CLIPTextEncode → KSampler → VAEDecode), scored by the judge."""

from __future__ import annotations

from typing import Any, Sequence

import comfy.utils  # noqa: E402
import torch

import nodes  # noqa: E402  (ComfyUI's nodes.py, importable once models put ComfyUI on sys.path)

from . import (
    models,  # noqa: F401  (imports ComfyUI on the CPU before `nodes`)
    world,
)
from .judge import Judge, predict

SAMPLER = dict(steps=20, cfg=5.0, sampler_name="euler", scheduler="normal")


@torch.no_grad()
def generate(model: Any, clip: Any, vae: Any, text: str, n: int, seed: int, negative: str = "",
             positive: Any = None, **sampler: Any) -> torch.Tensor:
    """n images (IMAGE [n, H, W, 3] in 0..1) for one prompt, exactly as a stock graph makes them (`positive`: the
    prompt's CONDITIONING when a node made it, as Tuning Encoder Dual Path does)."""
    s = {**SAMPLER, **sampler}
    comfy.utils.set_progress_bar_enabled(False)   # a tqdm bar per prompt would flood the logs
    if positive is None:
        positive = nodes.CLIPTextEncode().encode(clip, text)[0]
    negative_cond = nodes.CLIPTextEncode().encode(clip, negative)[0]
    latent = nodes.EmptyLatentImage().generate(world.RES, world.RES, n)[0]
    samples = nodes.KSampler().sample(model, seed, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"],
                                      positive, negative_cond, latent)[0]
    return nodes.VAEDecode().decode(vae, samples)[0]


def score_suite(model: Any, clip: Any, vae: Any, judge: Judge, suite: Sequence[world.Attrs], per_prompt: int,
                seed: int = 1000, **sampler: Any) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Judge accuracy per attribute and for all four, over `per_prompt` images of each prompt in `suite`.

    Prompt i uses sampler seed `seed + i`, so a suite's images are fixed for fixed weights.
    Returns the accuracies and the images (one [per_prompt, H, W, 3] tensor per prompt).
    """
    hits, images = [], []
    for i, attrs in enumerate(suite):
        imgs = generate(model, clip, vae, world.prompt(*attrs), per_prompt, seed + i, **sampler)
        preds, _ = predict(judge, imgs)
        hits.append(preds == torch.tensor(world.labels_of(attrs)))          # [per_prompt, 4]
        images.append(imgs)
    h = torch.cat(hits).float()
    out = {a: h[:, k].mean().item() for k, a in enumerate(world.ATTRIBUTES)}
    out["all4"] = h.prod(1).mean().item()
    out["prompts"], out["images"] = len(suite), len(h)
    return out, images

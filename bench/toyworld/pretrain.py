"""Pretraining the Tuning Encoder on the toy world: its image folder and its models for `tools/pretrain_encoder.py`.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/pretrain.py --data /tmp/toyworld_encoder_data
    COMFYUI_PATH=/opt/comfyui torchrun --nproc_per_node 2 tools/pretrain_encoder.py \\
        --loader bench/toyworld/pretrain.py:first_tower_models --data /tmp/toyworld_encoder_data \\
        --run-dir runs/toyworld --resolution 64 --batch-size 4 --learning-rate 2e-3 --code 32 --steps 600 \\
        --max-grad-norm 0 --out toyworld_encoder
    # That is the shipped weights/encoder.safetensors (the first vision tower, made before gradient clipping
    # existed); its ablations add --contrastive 0, --blend 1 or --hypernetwork scales. Without --max-grad-norm 0
    # (clipped at the default 1.0): weights/encoder_clipped.safetensors, and with --blend 1, --codes 0 or --rank 2 / 8
    # too, the other *_clipped files. With --loader bench/toyworld/pretrain.py:models (the second tower,
    # vision.CURRENT), clipped: weights/encoder_vision2_clipped.safetensors. With --seed 1: the *_seed1 files.

The folder holds every colour × shape pair of the world except the benchmark concepts' eight and three more kept
for checks outside the benchmark (UNSEEN_PAIRS), at random sizes and positions, with a `captions.txt` that names
each image's class word the way the benchmark does (the shape, or "shape" for the hidden heart) and its prompt,
which says the size and position ("a photo of a small {} on the left"), so that the predicted embedding need not
hold them, and the pair it shows (the concept, which gets a code: docs/METHODS.md §6.3). The prompts all start
"a photo of", a form no scored prompt of the benchmark has.

`models()` gives the toy world's MODEL, CLIP and VAE and, as CLIP_VISION, the small vision tower whose features are
padded to the stock ViT-L's width: the stock file computes these (to 3e-6 in fp32, plus the fp16 rounding of the
installed file's weights; bench/toyworld/vision.py), for a sixteenth of the arithmetic.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script, or loaded by file path: make `toyworld` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "toyworld"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from toyworld import vision, world  # noqa: E402
from toyworld.models import load_clip, load_model, load_vae  # noqa: E402
from toyworld.protocol import CLASS_WORD  # noqa: E402


def class_word(shape: str) -> str:
    """The word a concept of this shape is learned from, as the benchmark's CLASS_WORD names it."""
    return "shape" if shape in world.HIDDEN_SHAPES else shape


# Unseen by the encoder and not benchmark concepts either: the toy-world workflow and spot checks use these
UNSEEN_PAIRS = frozenset({("blue", "star"), ("green", "cross"), ("orange", "heart")})


def pairs() -> list[tuple[str, str]]:
    """The colour × shape pairs the encoder is pretrained on."""
    left_out = vision.BENCHMARK_PAIRS | UNSEEN_PAIRS
    return [(c, s) for c in world.COLOUR_NAMES for s in world.SHAPES if (c, s) not in left_out]


def write_data(folder: Path, per_pair: int = 8, seed: int = 11) -> int:
    """Render `per_pair` images of every non-benchmark pair into `folder` with its captions.txt; the image count."""
    folder.mkdir(parents=True, exist_ok=True)
    pick, rng = random.Random(seed), np.random.default_rng(seed)
    lines = []
    for colour, shape in pairs():
        for i in range(per_pair):
            attrs = (colour, shape, pick.choice(world.SIZES), pick.choice(world.POSITIONS))
            name = f"{colour}_{shape}_{i}.png"
            Image.fromarray(world.render(attrs, rng)[0]).save(folder / name)
            lines.append(f"{name}\t{class_word(shape)}\t{world.layout_caption(*attrs[2:])}\t{colour} {shape}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


class PaddedTower:
    """A small tower as a CLIP_VISION whose penultimate hidden states are its stock ViT-L file's, named as that file
    (the name pretraining records in the encoder)."""

    def __init__(self, tower: vision.Tower) -> None:
        self.small = vision.load_small(tower).eval()
        self.name = tower.stock_name

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = True) -> dict[str, torch.Tensor]:
        states = vision.tokens(self.small, image[..., :3])
        return {"penultimate_hidden_states": torch.nn.functional.pad(states, (0, vision.STOCK_WIDTH -
                                                                               states.shape[-1]))}


def models(tower: vision.Tower = vision.CURRENT) -> tuple[Any, Any, Any, Any]:
    """(MODEL, CLIP, VAE, CLIP_VISION) of the toy world, for `tools/pretrain_encoder.py --loader`."""
    return load_model(), load_clip(), load_vae(), PaddedTower(tower)


def first_tower_models() -> tuple[Any, Any, Any, Any]:
    """`models()` with the first vision tower, the one the encoders shipped before the second were pretrained on."""
    return models(vision.FIRST)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy world's encoder-pretraining image folder.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-pair", type=int, default=8)
    opts = parser.parse_args(argv)
    count = write_data(opts.data, opts.per_pair)
    print(f"{count} images of {len(pairs())} pairs in {opts.data} (left out: the benchmark concepts "
          f"{', '.join(sorted(CLASS_WORD))} and {', '.join(' '.join(p) for p in sorted(UNSEEN_PAIRS))})")


if __name__ == "__main__":
    main()

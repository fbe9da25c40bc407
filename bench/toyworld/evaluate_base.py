"""Recompute the toy world's base-model and judge accuracies from the committed weights.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/evaluate_base.py            # ~5–8 minutes on 1 CPU core

1. Judge ceiling: the judge on 1,000 random images of every combination, clean and after a stock VAE round trip.
2. Base model: images sampled through stock nodes (CLIPTextEncode → KSampler euler/normal, 20 steps, CFG 5,
   negative "" → VAEDecode), 8 per prompt, scored by the judge, on three suites:
   held-in (48 training combinations, all four attributes named, known words only), held-out colour×shape
   pairs (incl. the known-word concept pairs) and held-out shape×position pairs.
Prints a table and writes bench/out/toyworld_base.json (and a grid of held-in samples next to it);
--record also stores the numbers in weights/world.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from toyworld import world  # noqa: E402
from toyworld.judge import evaluate as judge_ceiling  # noqa: E402
from toyworld.judge import load_judge
from toyworld.models import WEIGHTS, load_clip, load_model, load_vae  # noqa: E402
from toyworld.sampling import SAMPLER, score_suite  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "toyworld_base.json"
SUITES = {"held-in": world.heldin_suite, "held-out colour×shape": world.heldout_colour_shape_suite,
          "held-out shape×position": world.heldout_shape_position_suite}
TARGETS = {"held-in all4": 0.60, "judge per attribute (VAE round trip)": 0.95}


def save_grid(images: list[torch.Tensor], path: Path, per_row: int = 8) -> None:
    """One row per prompt (the first `per_row` images of each), 2× nearest upscale."""
    rows = [torch.cat(list(imgs[:per_row]), 1) for imgs in images]
    grid = (torch.cat(rows, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def print_table(result: dict[str, Any]) -> None:
    cols = (*world.ATTRIBUTES, "all4")
    print(f"\n{'':34}" + "".join(f"{c:>10}" for c in cols) + f"{'images':>8}")
    ceiling = result["judge"]
    for name in ("clean", "vae_round_trip"):
        print(f"{'judge, ' + name:34}" + "".join(f"{ceiling[name][c]:10.3f}" for c in cols) + f"{ceiling['n']:8d}")
    for name, r in result["base"].items():
        print(f"{'base, ' + name:34}" + "".join(f"{r[c]:10.3f}" for c in cols) + f"{r['images']:8d}")
    for name, ok in result["targets_met"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--record", action="store_true", help="also store the numbers in weights/world.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    start = time.time()
    clip, vae, model, judge = load_clip(), load_vae(), load_model(), load_judge()
    result: dict[str, Any] = {"sampler": SAMPLER, "per_prompt": opts.per_prompt, "judge": judge_ceiling(judge, vae),
                              "base": {}}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    for name, suite in SUITES.items():
        result["base"][name], images = score_suite(model, clip, vae, judge, suite(), opts.per_prompt)
        print(f"{name}: {json.dumps(result['base'][name])} ({time.time() - start:.0f} s)", flush=True)
        if name == "held-in":
            save_grid(images[:16], opts.out.with_name("toyworld_heldin.png"))
    rt = result["judge"]["vae_round_trip"]
    result["targets_met"] = {
        "held-in all4 >= 0.60": result["base"]["held-in"]["all4"] >= TARGETS["held-in all4"],
        "judge >= 0.95 per attribute on VAE round trips": all(rt[a] >= TARGETS["judge per attribute (VAE round trip)"]
                                                               for a in world.ATTRIBUTES)}
    result["seconds"] = time.time() - start
    opts.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {opts.out} ({result['seconds']:.0f} s)")
    if opts.record:
        data = json.loads((WEIGHTS / "world.json").read_text())
        data["measured"] = result
        (WEIGHTS / "world.json").write_text(json.dumps(data, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Build the toy world's base models from seeds: VAE, judge, training data, UNet + CLIP, then the CLIP vision tower.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/build.py                  # all stages: ~9 min on one H200
    COMFYUI_PATH=/opt/comfyui python bench/toyworld/build.py --stages unet --unet-steps 6000   # extend the UNet

Each stage writes its weights to weights/ and its stats to weights/world.json, and skips itself when its output
exists (use --force to redo it). The UNet stage checkpoints to cache/ and resumes from there; with per-step
seeds a resumed run draws the same batches as an uninterrupted one. It trains on the GPU when torch sees one
(the shipped weights were built on one H200) and otherwise on the CPU, on --threads threads (hours).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

import torch  # noqa: E402

from toyworld import world  # noqa: E402
from toyworld.models import WEIGHTS, load_vae, save_weights  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE, LOGS = HERE / "cache", HERE / "logs"
WORLD_JSON = WEIGHTS / "world.json"
STAGES = ("vae", "judge", "data", "unet", "vision")


def record(key: str, value: Any) -> None:
    """Merge one stage's stats into weights/world.json (which also holds the world's definition)."""
    data = json.loads(WORLD_JSON.read_text()) if WORLD_JSON.exists() else {}
    data["world"] = world.definition()
    data.setdefault("build", {})[key] = value
    WORLD_JSON.parent.mkdir(parents=True, exist_ok=True)
    WORLD_JSON.write_text(json.dumps(data, indent=1))


def make_logger(name: str) -> Callable[[str], None]:
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{name}.log"

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with path.open("a") as f:
            f.write(stamped + "\n")
    return log


@torch.no_grad()
def vae_fidelity(vae: Any, seed: int, n: int = 256) -> dict[str, float]:
    """PSNR of a stock `VAE.encode` → `VAE.decode` round trip, overall and on object pixels only."""
    images, masks, _, _ = world.make_images(n, seed, training_only=False)
    x = torch.from_numpy(images).float() / 255
    latents = vae.encode(x)
    error = (vae.decode(latents) - x) ** 2
    m = torch.from_numpy(masks).float()[..., None].expand_as(error)
    return {"psnr": -10 * math.log10(error.mean().item()),
            "psnr_object": -10 * math.log10((error * m).sum().item() / m.sum().item()),
            "latent_std_scaled": (latents * 0.18215).std().item()}


def stage_vae(opts: argparse.Namespace) -> None:
    from toyworld.train_vae import train_vae
    log = make_logger("vae")
    vae, stats = train_vae(opts.vae_steps, opts.vae_batch, seed=opts.seed + 1, peak_lr=1e-3, pool=opts.vae_pool,
                           log=log)
    save_weights(vae.first_stage_model, WEIGHTS / "vae.safetensors")
    stats.update(vae_fidelity(load_vae(), seed=opts.seed + 901))
    log(json.dumps(stats))
    record("vae", stats)


def stage_judge(opts: argparse.Namespace) -> None:
    from toyworld.judge import train_judge
    log = make_logger("judge")
    stats = train_judge(load_vae(), opts.judge_steps, seed=opts.seed + 2, cache=CACHE, log=log,
                        n_images=opts.judge_images, batch_size=opts.judge_batch)
    log(json.dumps(stats))
    record("judge", stats)


def stage_data(opts: argparse.Namespace) -> None:
    from toyworld.train_unet import make_training_data
    log = make_logger("data")
    stats = make_training_data(load_vae(), opts.images, seed=opts.seed + 3, path=CACHE / "unet_data.safetensors",
                               log=log)
    record("data", stats)


def stage_unet(opts: argparse.Namespace) -> None:
    from toyworld.train_unet import train_unet
    log = make_logger("unet")
    stats = train_unet(opts.unet_steps, opts.unet_batch, seed=opts.seed + 4, data=CACHE / "unet_data.safetensors",
                       state=CACHE / "unet_state", log=log, eval_every=opts.eval_every,
                       time_limit=opts.unet_time_limit)
    record("unet", stats)


def stage_vision(opts: argparse.Namespace) -> None:
    from toyworld.vision import TOWERS, build
    for tower in TOWERS:  # each under its file's stem in world.json ("vision": the first)
        if opts.force or not tower.file.exists():
            record(tower.file.stem, build(tower, log=make_logger(tower.file.stem)))


def outputs(stage: str) -> list[Path]:
    from toyworld.vision import TOWERS  # reads ComfyUI's ViT-L config
    return {"vae": [WEIGHTS / "vae.safetensors"], "judge": [WEIGHTS / "judge.safetensors"],
            "data": [CACHE / "unet_data.safetensors"], "unet": [],   # unet: resumes, never skipped
            "vision": [tower.file for tower in TOWERS]}[stage]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=5000)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--vae-pool", type=int, default=40000, help="renders the VAE's batches are drawn from")
    parser.add_argument("--judge-steps", type=int, default=3000)
    parser.add_argument("--judge-images", type=int, default=24000)
    parser.add_argument("--judge-batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=48000, help="training images for the UNet")
    parser.add_argument("--unet-steps", type=int, default=3500, help="total steps (a resumed run continues); the "
                        "shipped weights are the EMA at step 3500")
    parser.add_argument("--unet-batch", type=int, default=256)
    parser.add_argument("--unet-time-limit", type=float, help="stop the UNet stage after this many seconds")
    parser.add_argument("--eval-every", type=int, default=1000, help="quick held-in check every N UNet steps")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage not in opts.stages:
            continue
        if not opts.force and outputs(stage) and all(p.exists() for p in outputs(stage)):
            print(f"{stage}: outputs exist, skipped (use --force to redo)")
            continue
        start = time.time()
        globals()[f"stage_{stage}"](opts)
        print(f"{stage}: done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: does BaTex converge faster than TI? (docs/METHODS.md §4; the paper claims it does.)

Trains TI and BaTex, each with its own paper defaults (TI 5e-3, BaTex 5e-4 per sample, both scaled by the batch;
BaTex M = 720 ranked by dot), for the same steps on the same seeds, and records the held-out loss every `--every`
steps: the loop's own held-out set (fixed images, prompts, noise and timesteps, drawn from the run's seed, so TI
and BaTex of one seed are measured on the same draws) through `LoopOptions.heldout_every`; each run is exactly
what `trainers.loop.train` does for Learn Concept.

Runs on the tiny ComfyUI models of tests/support/tiny_comfy.py when $COMFYUI_PATH holds a ComfyUI, otherwise on
tests/support/tiny_host.py. Prints the mean held-out loss per step for both methods and the step at which each
reaches 90% of its own final improvement; writes the numbers to bench/out/batex_convergence.json.

    COMFYUI_PATH=/opt/comfyui python bench/batex_convergence.py            # about 2 minutes on 2 CPU cores

Tiny models are not Stable Diffusion: their text encoders are 32/48 wide, so 720 rows span the whole width and
BaTex differs from TI only by its parameterization and learning rate. Read the numbers as a smoke test of the
claim, not as a reproduction of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "batex_convergence.json"
METHODS = ("ti", "batex")


def register_package() -> None:
    """Import the pack as `concept_forge`, as tests/conftest.py does, and put the test doubles on the path."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    if "concept_forge" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    assert spec is not None and spec.loader is not None  # a file that exists always has a spec
    module = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = module
    spec.loader.exec_module(module)


# -- the numbers --------------------------------------------------------------------------------------------------
def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*curves, strict=True)]


def steps_to_fraction(curve: Sequence[float], steps: Sequence[int], fraction: float = 0.9) -> int | None:
    """The first evaluated step whose improvement over step 0 is `fraction` of the final one; None if no gain."""
    final = curve[0] - curve[-1]
    if final <= 0:
        return None
    return next(s for s, loss in zip(steps, curve, strict=True) if curve[0] - loss >= fraction * final)


# -- the runs -----------------------------------------------------------------------------------------------------
class Models:
    """A fresh host per run on the tiny ComfyUI models, or on TinyHost without ComfyUI."""

    def __init__(self, arch: str, backend: str):
        self.arch = arch
        self.tc: Any = None
        if backend != "tiny":
            try:
                import tiny_comfy
                self.tc = tiny_comfy
            except ImportError as e:
                if backend == "comfy":
                    raise
                print(f"ComfyUI not found ({e}); using TinyHost.")
        self.backend = "comfy" if self.tc else "tiny"

    def images(self) -> torch.Tensor:
        if self.tc:
            return self.tc.tiny_images()  # type: ignore[no-any-return]
        from tiny_host import tiny_images
        return tiny_images()

    @contextlib.contextmanager
    def host(self) -> Iterator[Any]:
        with torch.inference_mode(False), torch.enable_grad():
            if self.tc is None:
                from tiny_host import TinyHost
                yield TinyHost(self.arch)
                return
            from concept_forge.nodes.host import ComfyHost
            tc = self.tc
            with ComfyHost(tc.tiny_model(self.arch), tc.tiny_clip(self.arch), tc.tiny_vae(), self.arch) as host:
                yield host


def run(models: Models, method_name: str, seed: int, steps: int, every: int, batch_size: int,
        heldout_draws: int) -> dict[str, Any]:
    """One training run through the shared loop; its held-out loss at step 0 and every `every` steps."""
    from concept_forge.trainers import loop
    from concept_forge.trainers.methods import create_method, method_options
    from concept_forge.trainers.templates import OBJECT_TEMPLATES

    options = method_options(method_name)
    data = loop.TrainingSet(models.images(), list(OBJECT_TEMPLATES))
    learning_rate = loop.scaled_learning_rate(options.learning_rate, batch_size, 1)
    start = time.perf_counter()
    with models.host() as host:
        method = create_method(method_name, host, "dog", 0, options, seed)
        result = loop.train(method, host, data, loop.LoopOptions(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, flip_p=options.flip_p,
            heldout_draws=heldout_draws, heldout_every=every))
        report = method.report()
    return {"heldout": [loss for _, loss in result.heldout_curve], "train_loss": result.losses,
            "seconds": time.perf_counter() - start, "learning_rate": learning_rate, "report": report}


def summarise(runs: dict[str, list[dict[str, Any]]], eval_steps: list[int]) -> dict[str, Any]:
    out = {}
    for name, per_seed in runs.items():
        curves = [r["heldout"] for r in per_seed]
        mean = mean_curve(curves)
        out[name] = {"learning_rate": per_seed[0]["learning_rate"], "report": per_seed[0]["report"],
                     "heldout_mean": mean, "heldout_per_seed": curves,
                     "steps_to_90": steps_to_fraction(mean, eval_steps),
                     "steps_to_90_per_seed": [steps_to_fraction(c, eval_steps) for c in curves],
                     "final_improvement_pct": 100 * (mean[0] - mean[-1]) / mean[0],
                     "seconds_per_run": sum(r["seconds"] for r in per_seed) / len(per_seed)}
    return out


def print_table(summary: dict[str, Any], eval_steps: list[int]) -> None:
    print(f"{'step':>6}" + "".join(f"{name + ' held-out':>18}" for name in summary))
    for i, step in enumerate(eval_steps):
        print(f"{step:>6}" + "".join(f"{s['heldout_mean'][i]:>18.5f}" for s in summary.values()))
    for name, s in summary.items():
        print(f"{name}: lr {s['learning_rate']:g} effective, final improvement {s['final_improvement_pct']:.2f}%, "
              f"90% of it by step {s['steps_to_90']} (per seed {s['steps_to_90_per_seed']}), "
              f"{s['seconds_per_run']:.1f} s per run. {' '.join(s['report'])}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="held-out evaluation interval in steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heldout-draws", type=int, default=8, help="(noise, timestep) draws per image")
    parser.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    parser.add_argument("--backend", choices=["auto", "comfy", "tiny"], default="auto")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.steps % args.every:
        parser.error(f"--steps {args.steps} must be a multiple of --every {args.every}")

    register_package()
    models = Models(args.arch, args.backend)
    eval_steps = list(range(0, args.steps + 1, args.every))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    for seed in args.seeds:
        for name in METHODS:
            runs[name].append(run(models, name, seed, args.steps, args.every, args.batch_size, args.heldout_draws))
            print(f"seed {seed} {name}: held-out {runs[name][-1]['heldout'][0]:.5f} → "
                  f"{runs[name][-1]['heldout'][-1]:.5f} ({runs[name][-1]['seconds']:.1f} s)", flush=True)
    summary = summarise(runs, eval_steps)
    print(f"\n{models.backend} {args.arch}, batch {args.batch_size}, seeds {args.seeds}, mean held-out loss:")
    print_table(summary, eval_steps)
    record = {"backend": models.backend, "arch": args.arch, "steps": args.steps, "every": args.every,
              "seeds": args.seeds, "batch_size": args.batch_size, "heldout_draws": args.heldout_draws,
              "eval_steps": eval_steps, "methods": summary,
              "train_loss": {name: [r["train_loss"] for r in per_seed] for name, per_seed in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

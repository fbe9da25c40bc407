"""The toy-world quality benchmark: every method learns every concept through the pack's own nodes, and the judge
scores what the learned concept generates.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/benchmark.py              # the full table, ~1 h on 2 CPU cores
    COMFYUI_PATH=/opt/comfyui python bench/toyworld/benchmark.py --concepts tealstar --seeds 0 --methods ti

Each concept is learned from its four references (all big and centred) by Learn Concept (TI, DTI, BaTex,
CatVersion: `LearnConcept.execute`, as ComfyUI's executor runs it) and by Tuning Encoder (one reference, its own
steps, no encoder weights), and prompted as a user would: `embedding:<name>` through the node's CLIP output,
or the class word through CatVersion's residual CLIP. Per concept, seed and method, 64 images per prompt group,
sampled with stock nodes (euler, 20 steps, CFG 5) at fixed sampler seeds, so rows are paired:
- identity: "a photo of a <c>": the judge reads the concept's colour and shape (both right), and the cosine of
  the judge's features to the references' mean;
- prompt fidelity: "<c> on the left/right/top/bottom" (16 each), "a small <c>" and "a blue <c>" (no concept is
  blue): the share that shows the asked position, size or colour; fidelity is their mean;
- steps to 90%: identity after 50, 100, 200 and 400 steps (each a run of that length; the loop's sample plan is
  prefix-stable), the first that reaches 90% of the 400-step identity.
Baselines: the class word alone, and the concept's own words ("teal star"; hidden words are untrained tokens).
Proportions pool 3 seeds × 64 images per concept with Wilson 95% intervals; the method rows average the four
concepts, with a t interval over the 12 concept × seed cells. Writes bench/out/toyworld_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from pack_import import import_pack  # noqa: E402

from toyworld import world  # noqa: E402
from toyworld.judge import load_judge, predict  # noqa: E402
from toyworld.models import load_clip, load_model, load_vae  # noqa: E402
from toyworld.sampling import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "toyworld_benchmark.json"
METHODS = ("ti", "dti", "batex", "catversion", "tuning_encoder")
STEPS = 400                     # DTI's recipe, for every Learn Concept method alike
CONVERGENCE = (50, 100, 200)    # shorter runs for the steps-to-90% column
PER_GROUP = 64
EDIT_COLOUR = "blue"            # the colour-change prompt; no concept is blue
CLASS_WORD = {"tealstar": "star", "pinkheart": "shape", "orangesquare": "square", "purpletriangle": "triangle"}
GROUP_SEEDS = {"identity": 7000, "position": 7100, "size": 7200, "colour": 7300}


def use_scratch_folders() -> None:
    """The pack's model folders in a temporary directory: nothing is written (checkpoint_every=0), but the nodes
    look their folders up."""
    import tempfile

    import folder_paths
    from concept_forge.nodes.paths import CONCEPTS, ENCODERS

    scratch = Path(tempfile.mkdtemp(prefix="toyworld-"))
    for folder in (CONCEPTS, ENCODERS):
        folder_paths.folder_names_and_paths[folder] = ([str(scratch / folder)], {".safetensors"})


def run_node(node_class: Any, **inputs: Any) -> Any:
    """A V3 node's outputs, run as ComfyUI's executor runs it."""
    from comfy_api.v0_0_2 import io
    from concept_forge.nodes.headless import execute_node

    return execute_node(node_class, {io.Hidden.unique_id: "toyworld"}, **inputs).args


def node_defaults(node_class: Any) -> dict[str, Any]:
    return {i.id: i.default for i in node_class.define_schema().inputs if getattr(i, "default", None) is not None}


# -- scoring -------------------------------------------------------------------------------------------------------
class Scorer:
    """Samples prompt groups with the base model (or a method's MODEL/CLIP) and scores them with the judge."""

    def __init__(self) -> None:
        self.clip, self.vae, self.model, self.judge = load_clip(), load_vae(), load_model(), load_judge()
        self.reference_features: dict[str, torch.Tensor] = {}

    def references(self, concept: world.Concept) -> torch.Tensor:
        return torch.from_numpy(world.concept_references(concept.name)).float() / 255

    def reference_feature(self, concept: world.Concept) -> torch.Tensor:
        if concept.name not in self.reference_features:
            _, feats = predict(self.judge, self.references(concept))
            self.reference_features[concept.name] = feats.mean(0)
        return self.reference_features[concept.name]

    def judge_prompts(self, model: Any, clip: Any, prompts: Sequence[str],
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        per = PER_GROUP // len(prompts)
        preds, feats = [], []
        for i, text in enumerate(prompts):
            p, f = predict(self.judge, generate(model, clip, self.vae, text, per, seed + i))
            preds.append(p)
            feats.append(f)
        return torch.cat(preds), torch.cat(feats)

    def identity(self, model: Any, clip: Any, phrase: str, concept: world.Concept) -> dict[str, Any]:
        preds, feats = self.judge_prompts(model, clip, [f"a photo of a {phrase}"], GROUP_SEEDS["identity"])
        hit = self._is_concept(preds, concept)
        cosine = torch.nn.functional.cosine_similarity(feats, self.reference_feature(concept)[None], dim=1)
        return {"identity": int(hit.sum()), "n": len(hit), "feature_cosine": cosine.mean().item(),
                "colour": int((preds[:, 0] == world.COLOUR_NAMES.index(concept.colour)).sum()),
                "shape": int((preds[:, 1] == world.SHAPES.index(concept.shape)).sum())}

    def score(self, model: Any, clip: Any, phrase: str, concept: world.Concept) -> dict[str, Any]:
        out = self.identity(model, clip, phrase, concept)
        positions = ("left", "right", "top", "bottom")
        preds, _ = self.judge_prompts(model, clip, [f"a photo of a {phrase} {world.POS_PHRASE[p]}" for p in positions],
                                      GROUP_SEEDS["position"])
        asked = torch.tensor([world.POSITIONS.index(p) for p in positions]).repeat_interleave(PER_GROUP // 4)
        out["position"] = int((preds[:, 3] == asked).sum())
        out["position_identity"] = int(self._is_concept(preds, concept).sum())
        preds, _ = self.judge_prompts(model, clip, [f"a photo of a small {phrase}"], GROUP_SEEDS["size"])
        out["size"] = int((preds[:, 2] == world.SIZES.index("small")).sum())
        out["size_identity"] = int(self._is_concept(preds, concept).sum())
        preds, _ = self.judge_prompts(model, clip, [f"a photo of a {EDIT_COLOUR} {phrase}"], GROUP_SEEDS["colour"])
        out["colour_change"] = int((preds[:, 0] == world.COLOUR_NAMES.index(EDIT_COLOUR)).sum())
        out["colour_change_shape"] = int((preds[:, 1] == world.SHAPES.index(concept.shape)).sum())
        return out

    @staticmethod
    def _is_concept(preds: torch.Tensor, concept: world.Concept) -> torch.Tensor:
        return (preds[:, 0] == world.COLOUR_NAMES.index(concept.colour)) & \
               (preds[:, 1] == world.SHAPES.index(concept.shape))


# -- training through the nodes ------------------------------------------------------------------------------------
def learn(scorer: Scorer, method: str, concept: world.Concept, seed: int, steps: int) -> tuple[Any, Any, str, Any]:
    """(MODEL, CLIP, prompt phrase, CONCEPT) of `method` trained on the concept's references through its node."""
    from concept_forge.nodes.learn import LearnConcept
    from concept_forge.nodes.training import TrainingOptions
    from concept_forge.nodes.tuning import TuningEncoderNode

    images, class_word = scorer.references(concept), CLASS_WORD[concept.name]
    if method == "tuning_encoder":
        inputs = {**node_defaults(TuningEncoderNode), "model": scorer.model, "clip": scorer.clip, "vae": scorer.vae,
                  "image": images[:1], "name": concept.name, "class_word": class_word, "resolution": world.RES,
                  "seed": seed}
        if steps:
            inputs["tuning_steps"] = steps
        model, clip, learned, _ = run_node(TuningEncoderNode, **inputs)
        return model, clip, f"embedding:{concept.name}", learned
    learned, clip, _, _ = run_node(
        LearnConcept, model=scorer.model, clip=scorer.clip, vae=scorer.vae, images=images, name=concept.name,
        init_word=class_word, method=method, steps=steps, learning_rate=0.0, batch_size=4, vectors=0,
        resolution=world.RES, prompts="object", seed=seed, precision="fp32", gradient_checkpointing=False,
        training_options=TrainingOptions(checkpoint_every=0))
    phrase = class_word if method == "catversion" else f"embedding:{concept.name}"
    return scorer.model, clip, phrase, learned


def vector_norm(concept: Any) -> float | None:
    vectors = concept.vectors.get("l")
    return None if vectors is None or not len(vectors) else vectors.float().norm(dim=-1).mean().item()


# -- statistics ----------------------------------------------------------------------------------------------------
def wilson(k: int, n: int) -> tuple[float, float, float]:
    """Proportion and its Wilson score 95% interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its t 95% interval."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], float("nan")
    from scipy.stats import t  # a ComfyUI requirement

    n = len(values)
    return statistics.mean(values), float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def fidelity(cell: dict[str, Any]) -> float:
    n = cell["n"]
    return (cell["position"] + cell["size"] + cell["colour_change"]) / (3 * n)


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row (method or baseline): per-concept pooled proportions and the mean over concepts."""
    rows: dict[str, Any] = {}
    for row in dict.fromkeys(c["row"] for c in cells):
        mine = [c for c in cells if c["row"] == row]
        per_concept = {}
        for name in dict.fromkeys(c["concept"] for c in mine):
            cs = [c for c in mine if c["concept"] == name]
            n = sum(c["n"] for c in cs)
            per_concept[name] = {k: wilson(sum(c[k] for c in cs), n) for k in
                                 ("identity", "position", "size", "colour_change", "colour_change_shape")}
            per_concept[name]["feature_cosine"] = mean_ci([c["feature_cosine"] for c in cs])
            per_concept[name]["fidelity"] = mean_ci([fidelity(c) for c in cs])
        ident = [c["identity"] / c["n"] for c in mine]
        fid = [fidelity(c) for c in mine]
        rows[row] = {
            "cells": len(mine), "per_concept": per_concept,
            "identity": mean_ci(ident), "feature_cosine": mean_ci([c["feature_cosine"] for c in mine]),
            "position": mean_ci([c["position"] / c["n"] for c in mine]),
            "size": mean_ci([c["size"] / c["n"] for c in mine]),
            "colour_change": mean_ci([c["colour_change"] / c["n"] for c in mine]),
            "fidelity": mean_ci(fid), "product": mean_ci([i * f for i, f in zip(ident, fid, strict=True)]),
            "norm": mean_ci([c["norm"] for c in mine if c.get("norm") is not None]),
            "train_s": mean_ci([c["train_s"] for c in mine if c.get("train_s") is not None]),
        }
        curves = [c["convergence"] for c in mine if c.get("convergence")]
        if curves:
            steps = sorted({int(k) for cv in curves for k in cv})
            pooled = {s: statistics.mean(cv[str(s)] for cv in curves) for s in steps}
            final = pooled[max(steps)]
            rows[row]["identity_by_steps"] = pooled
            rows[row]["steps_to_90"] = next((s for s in steps if pooled[s] >= 0.9 * final), None)
    return rows


def print_table(rows: dict[str, Any]) -> None:
    def f(mc: tuple[float, float]) -> str:
        m, h = mc
        return "–" if math.isnan(m) else (f"{m:.2f}" if math.isnan(h) else f"{m:.2f}±{h:.2f}")
    head = ("row", "identity", "feat cos", "position", "small", "blue", "fidelity", "id×fid", "‖v‖", "steps→90%")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row, r in rows.items():
        print(f"| {row} | {f(r['identity'])} | {f(r['feature_cosine'])} | {f(r['position'])} | {f(r['size'])} | "
              f"{f(r['colour_change'])} | {f(r['fidelity'])} | {f(r['product'])} | {f(r['norm'])} | "
              f"{r.get('steps_to_90') or '–'} |")


# -- the run -------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs="+", choices=list(world.CONCEPTS), default=list(world.CONCEPTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=STEPS, help="Learn Concept steps (Tuning Encoder: its own)")
    parser.add_argument("--convergence-seeds", type=int, nargs="*", default=[0],
                        help="seeds that also train the shorter runs (none: skip them)")
    parser.add_argument("--merge", type=Path, nargs="+", help="summarise the cells of earlier runs' JSON files "
                        "(e.g. shards run side by side) instead of running")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    opts = parser.parse_args(argv)
    if opts.merge:
        runs = [json.loads(path.read_text()) for path in opts.merge]
        settings = {**runs[0]["settings"], "concepts": [n for r in runs for n in r["settings"]["concepts"]]}
        return report([c for r in runs for c in r["cells"]], settings, sum(r["seconds"] for r in runs), opts.out)
    torch.set_num_threads(opts.threads)
    import_pack()
    use_scratch_folders()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    start = time.time()
    scorer = Scorer()
    cells: list[dict[str, Any]] = []
    concepts = [world.CONCEPTS[n] for n in opts.concepts]
    if not opts.no_baselines:
        for c in concepts:
            for row, phrase in (("class word", CLASS_WORD[c.name]),
                                ("own words", f"{c.colour} {'shape' if c.shape in world.HIDDEN_SHAPES else c.shape}")):
                cells.append({"row": row, "concept": c.name, "seed": 0, "phrase": phrase,
                              **scorer.score(scorer.model, scorer.clip, phrase, c)})
                print(f"{row:>14} {c.name:>15}: identity {cells[-1]['identity']}/{cells[-1]['n']} "
                      f"({time.time() - start:.0f} s)", flush=True)
    for method in opts.methods:
        for c in concepts:
            for seed in opts.seeds:
                t0 = time.time()
                model, clip, phrase, learned = learn(scorer, method, c, seed,
                                                     0 if method == "tuning_encoder" else opts.steps)
                train_s = time.time() - t0
                cell = {"row": method, "concept": c.name, "seed": seed, "phrase": phrase, "train_s": train_s,
                        "norm": vector_norm(learned), **scorer.score(model, clip, phrase, c)}
                if method != "tuning_encoder" and seed in opts.convergence_seeds:
                    curve = {str(opts.steps): cell["identity"] / cell["n"]}
                    for steps in CONVERGENCE:
                        m, cl, ph, _ = learn(scorer, method, c, seed, steps)
                        ident = scorer.identity(m, cl, ph, c)
                        curve[str(steps)] = ident["identity"] / ident["n"]
                    cell["convergence"] = curve
                cells.append(cell)
                print(f"{method:>14} {c.name:>15} seed {seed}: identity {cell['identity']}/{cell['n']}, fidelity "
                      f"{fidelity(cell):.2f}, train {train_s:.0f} s ({time.time() - start:.0f} s)", flush=True)
    settings = {"steps": opts.steps, "per_group": PER_GROUP, "seeds": opts.seeds, "concepts": opts.concepts,
                "convergence_steps": [*CONVERGENCE, opts.steps], "convergence_seeds": opts.convergence_seeds,
                "sampler": "euler/normal, 20 steps, CFG 5", "edit_colour": EDIT_COLOUR, "class_words": CLASS_WORD}
    return report(cells, settings, time.time() - start, opts.out)


def report(cells: list[dict[str, Any]], settings: dict[str, Any], seconds: float, out: Path) -> dict[str, Any]:
    rows = summarise(cells)
    result = {"settings": settings, "rows": rows, "cells": cells, "seconds": seconds}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(rows)
    print(f"wrote {out} ({seconds:.0f} s)")
    return result


if __name__ == "__main__":
    main()

"""The toy-world quality benchmark: every row (a method at a published recipe, or a variant of one) learns every
concept through the pack's own nodes, and the judge scores what the learned concept generates.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/benchmark.py --shard 0/2 &   # two shards on 2 cores
    COMFYUI_PATH=/opt/comfyui python bench/toyworld/benchmark.py --shard 1/2
    COMFYUI_PATH=/opt/comfyui python bench/toyworld/benchmark.py --report       # -> bench/results/toyworld.json

The protocol (bench/toyworld/protocol.py; the README's "Quality" section says why):
- Rows: TI at DTI's baseline rate (0.02, 400 steps) and at BaTex's baseline rate (2e-3), DTI with β = 0 and
  β = 0.99, BaTex with M in the paper's proportion to the encoder's width, CatVersion at its official rate and
  batch with mask bias 0 and +1, TI/DTI/BaTex trained without the templates' size words, the Tuning Encoder without
  weights. Learn Concept runs as ComfyUI's executor runs it (`LearnConcept.execute`).
- Curves: a curve row runs once to 1000 steps, stopping at 25, 50, 100, 200, 400 and 1000 (and its recipe's
  length) to be scored, and continuing through the node's own resume (resumed runs equal uninterrupted ones:
  tests/comfy/test_checkpoints.py). Fidelity is scored at the recipe's length.
- Prompts: no scored prompt is a training prompt of the row (checked before every cell): identity "a ⟨c⟩";
  fidelity "a ⟨c⟩ on the left/right/top/bottom", "a small ⟨c⟩", "a blue ⟨c⟩" (no concept is blue); 32 images per
  group, stock nodes (euler, 20 steps, CFG 5), fixed sampler seeds, so rows are paired image for image.
- Statistics: means over the concept × seed cells with t 95% intervals; every row is paired with TI on the same
  cells (the difference per cell, then its t interval); each paper claim gets a verdict from its interval.

Every finished cell is appended to bench/results/toyworld/<shard>.jsonl at once; a rerun skips the cells it finds,
so shards can be stopped and continued (also in another session or on another machine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from pack_import import import_pack  # noqa: E402

from toyworld import protocol, report, world  # noqa: E402
from toyworld.judge import load_judge, predict  # noqa: E402  (imports ComfyUI: COMFYUI_PATH)
from toyworld.models import WEIGHTS, load_clip, load_model, load_vae  # noqa: E402
from toyworld.protocol import CLASS_WORD, GROUP_SEEDS, PER_GROUP, Row  # noqa: E402
from toyworld.sampling import generate  # noqa: E402
from toyworld.vision import Tower, encoder_tower, install  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CELLS = ROOT / "bench" / "results" / "toyworld"   # the raw cells are evidence too: kept, and continued from
RESULT = ROOT / "bench" / "results" / "toyworld.json"
LAST_ONLY = 100000   # checkpoint_every: only a run's last step is checkpointed, which is what the next stop resumes


def use_scratch_folders() -> None:
    """The pack's model folders and clip_vision in a temporary directory (checkpoints go there, the pretrained
encoders and the vision tower's stock file are copied there)."""
    import tempfile

    import folder_paths
    from concept_forge.nodes.paths import CONCEPTS, ENCODERS

    scratch = Path(tempfile.mkdtemp(prefix="toyworld-"))
    for folder in (CONCEPTS, ENCODERS, "clip_vision"):
        folder_paths.folder_names_and_paths[folder] = ([str(scratch / folder)], {".safetensors"})
    (scratch / ENCODERS).mkdir()
    for name in protocol.ENCODERS.values():  # the pretrained encoders, where the node's dropdown finds them
        if (WEIGHTS / name).exists():
            shutil.copyfile(WEIGHTS / name, scratch / ENCODERS / name)


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
        self._clip_vision: dict[Tower, Any] = {}

    def clip_vision(self, encoder: Path) -> Any:
        """The vision tower the encoder file names, as the stock Load CLIP Vision loads it (installed once in the
        scratch folders)."""
        tower = encoder_tower(encoder)
        if tower not in self._clip_vision:
            import comfy.clip_vision
            import folder_paths

            self._clip_vision[tower] = comfy.clip_vision.load(str(install(Path(
                folder_paths.get_folder_paths("clip_vision")[0]), tower)))
        return self._clip_vision[tower]

    @property
    def width(self) -> int:
        return self.clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]

    @staticmethod
    def references(concept: world.Concept) -> torch.Tensor:
        return torch.from_numpy(world.concept_references(concept.name)).float() / 255

    def reference_feature(self, concept: world.Concept) -> torch.Tensor:
        if concept.name not in self.reference_features:
            _, feats = predict(self.judge, self.references(concept))
            self.reference_features[concept.name] = feats.mean(0)
        return self.reference_features[concept.name]

    def judge_prompts(self, model: Any, clip: Any, prompts: Sequence[str], seed: int,
                      dual: tuple[Any, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The judge's reading of PER_GROUP images over `prompts`; `dual` = (a Tuning Encoder concept, α): each
        prompt through Tuning Encoder Dual Path on the base model and CLIP instead of `model` and `clip`."""
        from concept_forge.nodes.dual_path import TuningEncoderDualPath

        per = PER_GROUP // len(prompts)
        preds, feats = [], []
        for i, text in enumerate(prompts):
            sampled, positive = model, None
            if dual is not None:
                sampled, positive, clip = run_node(TuningEncoderDualPath, model=self.model, clip=self.clip,
                                                   concept=dual[0], text=text, blend=dual[1])
            p, f = predict(self.judge, generate(sampled, clip, self.vae, text, per, seed + i, positive=positive))
            preds.append(p)
            feats.append(f)
        return torch.cat(preds), torch.cat(feats)

    def score(self, model: Any, clip: Any, text: str, concept: world.Concept,
              groups: Sequence[str] = ("identity", "position", "size", "colour"),
              dual: tuple[Any, float] | None = None) -> dict[str, Any]:
        """Counts out of `n` images per group: the concept recognised, the asked position, size or colour."""
        prompts = protocol.scored_prompts(text)
        out: dict[str, Any] = {"n": PER_GROUP}
        for group in groups:
            preds, feats = self.judge_prompts(model, clip, prompts[group], GROUP_SEEDS[group], dual)
            if group == "identity":
                out["identity"] = int(self._is_concept(preds, concept).sum())
                out["feature_cosine"] = torch.nn.functional.cosine_similarity(
                    feats, self.reference_feature(concept)[None], dim=1).mean().item()
            elif group == "position":
                asked = torch.tensor([world.POSITIONS.index(p) for p in protocol.POSITIONS])
                out["position"] = int((preds[:, 3] == asked.repeat_interleave(len(preds) // len(asked))).sum())
                out["position_identity"] = int(self._is_concept(preds, concept).sum())
            elif group == "size":
                out["size"] = int((preds[:, 2] == world.SIZES.index("small")).sum())
                out["size_identity"] = int(self._is_concept(preds, concept).sum())
            else:
                out["colour_change"] = int((preds[:, 0] == world.COLOUR_NAMES.index(protocol.EDIT_COLOUR)).sum())
                out["colour_change_shape"] = int((preds[:, 1] == world.SHAPES.index(concept.shape)).sum())
        return out

    @staticmethod
    def _is_concept(preds: torch.Tensor, concept: world.Concept) -> torch.Tensor:
        return (preds[:, 0] == world.COLOUR_NAMES.index(concept.colour)) & \
               (preds[:, 1] == world.SHAPES.index(concept.shape))


# -- training through the nodes ------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_templates(row: Row) -> Iterator[None]:
    """The template list the row trains with, in place of the published one (the size-word ablation)."""
    from concept_forge.trainers import templates

    published = templates.OBJECT_TEMPLATES
    templates.OBJECT_TEMPLATES = tuple(protocol.training_templates(row))
    try:
        yield
    finally:
        templates.OBJECT_TEMPLATES = published


def method_options(row: Row, width: int) -> Any:
    """The row's Options for its method: the method's defaults with the row's fields (BaTex: M for this width)."""
    from concept_forge.trainers.methods import method_options as defaults

    fields = dict(row.options)
    if row.method == "batex":
        fields["basis_size"] = protocol.batex_basis_size(width)
    return dataclasses.replace(defaults(row.method, None), **fields)


def learn(scorer: Scorer, row: Row, concept: world.Concept, seed: int, steps: int,
          resume: bool = False) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, CONCEPT) after `steps` steps of `row` on the concept's references, through its node;
    `resume` continues the checkpoint of the previous call's run."""
    from concept_forge.nodes.learn import LearnConcept
    from concept_forge.nodes.training import TrainingOptions
    from concept_forge.nodes.tuning import TuningEncoderNode

    images, class_word = scorer.references(concept), CLASS_WORD[concept.name]
    if row.method == "tuning_encoder":  # one reference; the row's options are the node's inputs
        encoder = {"clip_vision": scorer.clip_vision(WEIGHTS / row.options["encoder"])} if "encoder" in row.options \
            else {}
        model, clip, learned, _ = run_node(
            TuningEncoderNode, **{**node_defaults(TuningEncoderNode), "model": scorer.model, "clip": scorer.clip,
                                  "vae": scorer.vae, "image": images[:1], "name": concept.name,
                                  "class_word": class_word, "resolution": world.RES, "seed": seed,
                                  "tuning_steps": steps, **row.options, **encoder,
                                  "captions": protocol.reference_captions(concept, 1)[0] if row.captioned else ""})
        return model, clip, learned
    with training_templates(row):
        learned, clip, _, _ = run_node(
            LearnConcept, model=scorer.model, clip=scorer.clip, vae=scorer.vae, images=images, name=concept.name,
            init_word=class_word, method=row.method, steps=steps, learning_rate=row.learning_rate,
            batch_size=row.batch_size, vectors=0, resolution=world.RES,
            prompts="captions" if row.captioned else "object", seed=seed,
            captions="\n".join(protocol.reference_captions(concept)) if row.captioned else "",
            precision="fp32", gradient_checkpointing=False, method_options=method_options(row, scorer.width),
            training_options=TrainingOptions(checkpoint_every=LAST_ONLY, resume=resume))
    return scorer.model, clip, learned


def learned_facts(learned: Any) -> dict[str, Any]:
    """What the cell records of the concept itself: the vectors' length, BaTex's basis."""
    out: dict[str, Any] = {}
    vectors = learned.vectors.get("l")
    if vectors is not None and len(vectors):
        out["norm"] = vectors.float().norm(dim=-1).mean().item()
    if learned.method == "batex":
        out["basis"] = {"M": learned.state["basis_size"], "rank": learned.state["rank"]["l"]}
    return out


def run_cell(scorer: Scorer, row: Row, concept: world.Concept, seed: int) -> dict[str, Any]:
    """One row × concept × seed: its identity curve, and everything scored at the recipe's length."""
    leaked = protocol.contamination(row, concept)
    if leaked:
        raise RuntimeError(f"{row.name} trains on scored prompts: {sorted(leaked)}")
    text = protocol.phrase(row.name, concept)
    cell: dict[str, Any] = {"row": row.name, "concept": concept.name, "kind": concept.kind, "seed": seed,
                            "phrase": text, "curve": {}, "train_s": 0.0}
    if "encoder" in row.options:
        scorer.clip_vision(WEIGHTS / row.options["encoder"])  # installed and loaded once, before any timing
    previous = 0
    for steps in protocol.curve_points(row):
        start = time.time()
        model, clip, learned = learn(scorer, row, concept, seed, steps, resume=previous > 0)
        cell["train_s"] += time.time() - start
        previous = steps
        if steps == row.steps:
            dual = (learned, row.generation_blend) if row.generation_blend < 1 else None
            cell.update(scorer.score(model, clip, text, concept, row.score_groups, dual), **learned_facts(learned))
            cell["recipe_train_s"] = cell["train_s"]
            cell["curve"][str(steps)] = cell["identity"] / cell["n"]
        else:
            cell["curve"][str(steps)] = scorer.score(model, clip, text, concept, ("identity",))["identity"] / PER_GROUP
    return cell


def baseline_cell(scorer: Scorer, row: str, concept: world.Concept) -> dict[str, Any]:
    text = protocol.phrase(row, concept)
    return {"row": row, "concept": concept.name, "kind": concept.kind, "seed": 0, "phrase": text,
            **scorer.score(scorer.model, scorer.clip, text, concept)}


# -- the run -------------------------------------------------------------------------------------------------------
Job = tuple[str, str, int]   # (row, concept, seed)


def jobs(rows: Sequence[str], concepts: Sequence[str], seeds: Sequence[int], baselines: bool) -> list[Job]:
    """Seed-major, so that a run stopped early has every row on the same cells."""
    out: list[Job] = [(b, c, 0) for b in protocol.BASELINE_ROWS for c in concepts] if baselines else []
    return out + [(r, c, s) for s in seeds for c in concepts for r in rows]


def read_cells(folders: Sequence[Path]) -> list[dict[str, Any]]:
    cells = []
    for folder in folders:
        for path in sorted(folder.glob("*.jsonl")):
            cells += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return cells


def append_cell(path: Path, cell: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(opts: argparse.Namespace) -> None:
    missing = sorted({protocol.ROWS[r].options["encoder"] for r in opts.rows if "encoder" in protocol.ROWS[r].options}
                     - {p.name for p in WEIGHTS.glob("encoder*.safetensors")})
    if missing:
        raise SystemExit(f"no {', '.join(missing)} in {WEIGHTS}: pretrain those encoders (README: Tuning Encoder) "
                         "or leave their rows out (--rows).")
    index, count = (int(x) for x in opts.shard.split("/"))
    todo = jobs(opts.rows, opts.concepts, opts.seeds, not opts.no_baselines)[index::count]
    done = {(c["row"], c["concept"], c["seed"]) for c in read_cells([opts.cells])}
    todo = [j for j in todo if j not in done]
    print(f"shard {opts.shard}: {len(todo)} cells to run ({len(done)} already in {opts.cells})", flush=True)
    torch.set_num_threads(opts.threads)
    import_pack()
    use_scratch_folders()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    scorer, start = Scorer(), time.time()
    out = opts.cells / f"shard-{index}-of-{count}.jsonl"
    for row, name, seed in todo:
        concept = world.CONCEPTS[name]
        cell = (baseline_cell(scorer, row, concept) if row in protocol.BASELINE_ROWS
                else run_cell(scorer, protocol.ROWS[row], concept, seed))
        cell["settings"] = {"threads": opts.threads, "width": scorer.width}
        append_cell(out, cell)
        curve = " ".join(f"{k}:{v:.2f}" for k, v in cell.get("curve", {}).items())
        print(f"{row:>28} {name:>15} seed {seed}: identity {cell['identity']}/{cell['n']} {curve} "
              f"({time.time() - start:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(protocol.ROWS), default=list(protocol.ROWS))
    parser.add_argument("--concepts", nargs="+", choices=list(world.CONCEPTS), default=list(world.CONCEPTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from the i-th")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cells", type=Path, default=CELLS, help="where cells are appended and found")
    parser.add_argument("--report", action="store_true", help="summarise the cells found (of --seeds) instead of "
                        "running")
    parser.add_argument("--out", type=Path, default=RESULT)
    opts = parser.parse_args(argv)
    if opts.report:
        report.write([c for c in read_cells([opts.cells]) if c["seed"] in opts.seeds or c["row"] in
                      protocol.BASELINE_ROWS], opts.out)
    else:
        run(opts)


if __name__ == "__main__":
    main()

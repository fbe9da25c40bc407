"""The benchmark's summary: per row the means over its concept × seed cells, its identity curve, its paired
differences against TI, and a verdict on each paper claim from its paired interval."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from . import protocol
from .stats import Interval, mean_ci, verdict

Cell = dict[str, Any]
REFERENCE = "TI"
MARGIN = 0.05   # "kept" / "on par": the paired interval's lower end above −0.05


def metric(cell: Cell, name: str) -> float | None:
    """A cell's value of `name`: a share of its images, the feature cosine, fidelity, or `curve:<steps>`."""
    if name.startswith("curve:"):
        return cell.get("curve", {}).get(name[6:])
    if name == "fidelity":
        parts = [metric(cell, k) for k in ("position", "size", "colour_change")]
        return None if None in parts else statistics.mean(p for p in parts if p is not None)
    if name == "product":
        i, f = metric(cell, "identity"), metric(cell, "fidelity")
        return None if i is None or f is None else i * f
    value = cell.get(name)
    if value is None or name in ("feature_cosine", "norm", "recipe_train_s"):
        return value
    return value / cell["n"]


METRICS = ("identity", "feature_cosine", "position", "size", "colour_change", "fidelity", "product", "norm",
           "recipe_train_s")


Rows = str | tuple[str, ...]  # a row, or rows pooled per cell (e.g. one encoder recipe pretrained from two seeds)


def per_cell(cells: Sequence[Cell], rows: Rows, name: str) -> dict[tuple[str, int], float]:
    """`name` per (concept, seed) cell of `rows`: with several rows, their mean on the cells all of them have."""
    group = (rows,) if isinstance(rows, str) else rows
    values: dict[tuple[str, int], dict[str, float]] = {}  # cell -> row -> value (a cell run again: the last)
    for c in cells:
        if c["row"] in group and (value := metric(c, name)) is not None:
            values.setdefault((c["concept"], c["seed"]), {})[c["row"]] = value
    return {k: statistics.mean(v.values()) for k, v in values.items() if len(v) == len(group)}


def paired(cells: Sequence[Cell], row: Rows, other: Rows, name: str) -> Interval:
    """Mean of `row` − `other` over the cells both have, and its t interval."""
    mine, theirs = per_cell(cells, row, name), per_cell(cells, other, name)
    return mean_ci([mine[k] - theirs[k] for k in mine.keys() & theirs.keys()])


def summarise_row(cells: Sequence[Cell], row: str) -> dict[str, Any]:
    mine = [c for c in cells if c["row"] == row]
    out: dict[str, Any] = {"cells": len(mine), "seeds": sorted({c["seed"] for c in mine}),
                           "concepts": sorted({c["concept"] for c in mine})}
    out.update({name: mean_ci([metric(c, name) for c in mine]) for name in METRICS})
    out["by_kind"] = {kind: mean_ci([metric(c, "identity") for c in mine if c["kind"] == kind])
                      for kind in dict.fromkeys(c["kind"] for c in mine)}
    out["by_concept"] = {name: {m: mean_ci([metric(c, m) for c in mine if c["concept"] == name])[0]
                                for m in ("identity", "fidelity", "size")}
                         for name in dict.fromkeys(c["concept"] for c in mine)}
    steps = sorted({int(s) for c in mine for s in c.get("curve", {})})
    if len(steps) > 1:
        curve = {s: mean_ci([metric(c, f"curve:{s}") for c in mine]) for s in steps}
        out["curve"] = curve
        final = curve[steps[-1]][0]
        out["steps_to_90"] = next(s for s in steps if curve[s][0] >= 0.9 * final)
    if row != REFERENCE and row not in protocol.BASELINE_ROWS:
        out["vs_TI"] = {m: paired(cells, row, REFERENCE, m) for m in ("identity", "fidelity", "size", "product")}
    bases = [c["basis"] for c in mine if "basis" in c]
    if bases:
        out["basis"] = {"M": bases[0]["M"], "rank": sorted({r for b in bases for r in b["rank"]}),
                        "width": mine[0]["settings"]["width"]}
    return out


SECOND_TOWER = ("Tuning Encoder, second vision tower, clipped pretraining",
                "Tuning Encoder, second vision tower, clipped pretraining, seed 1")
FIRST_TOWER = ("Tuning Encoder, clipped pretraining", "Tuning Encoder, clipped pretraining, seed 1")
# (claim, row, baseline row, metric, test) — test: +1 the row is higher, "kept": not lower by more than MARGIN; a
# tuple of rows is their mean per cell
CLAIMS: tuple[tuple[str, Rows, Rows, str, Any], ...] = (
    ("DTI keeps the prompt better than TI (fidelity, 400 steps)", "DTI", "TI", "fidelity", 1),
    ("DTI keeps TI's identity", "DTI", "TI", "identity", "kept"),
    ("BaTex converges faster than TI at 2e-3 (identity after 100 steps)", "BaTex", "TI 2e-3", "curve:100", 1),
    ("BaTex converges faster than TI at 2e-3 (identity after 200 steps)", "BaTex", "TI 2e-3", "curve:200", 1),
    ("BaTex follows the prompt better than TI at 2e-3 (fidelity, 1000 steps)", "BaTex", "TI 2e-3", "fidelity", 1),
    ("CatVersion follows the prompt better than TI (fidelity)", "CatVersion", "TI", "fidelity", 1),
    ("CatVersion keeps TI's identity", "CatVersion", "TI", "identity", "kept"),
    ("TI without size words in its templates obeys 'small' more", "TI, no size words", "TI", "size", 1),
    ("DTI without size words in its templates obeys 'small' more", "DTI, no size words", "DTI", "size", 1),
    ("BaTex without size words in its templates obeys 'small' more", "BaTex, no size words", "BaTex", "size", 1),
    ("Tuning Encoder from one image in 12 steps keeps TI's identity (TI: four images, 400 steps)", "Tuning Encoder",
     "TI", "identity", "kept"),
    ("Tuning Encoder's prompt fidelity is not below TI's", "Tuning Encoder", "TI", "fidelity", "kept"),
    ("Pretrained encoder weights beat none at 12 steps (identity)", "Tuning Encoder", "Tuning Encoder, no weights",
     "identity", 1),
    ("The contrastive term helps (identity × fidelity)", "Tuning Encoder", "Tuning Encoder, no contrastive term",
     "product", 1),
    ("The dual path helps (identity × fidelity)", "Tuning Encoder", "Tuning Encoder, no dual path", "product", 1),
    ("The dual path helps when pretraining clips its gradients (identity × fidelity)",
     "Tuning Encoder, clipped pretraining", "Tuning Encoder, no dual path, clipped pretraining", "product", 1),
    ("Concept codes in pretraining help (identity)", "Tuning Encoder, clipped pretraining",
     "Tuning Encoder, no concept codes, clipped pretraining", "identity", 1),
    ("Another pretraining seed keeps the identity", "Tuning Encoder, clipped pretraining, seed 1",
     "Tuning Encoder, clipped pretraining", "identity", "kept"),
    ("A vision tower that reads shape helps (identity; each encoder pretrained from seeds 0 and 1)", SECOND_TOWER,
     FIRST_TOWER, "identity", 1),
    ("Clipping the pretraining gradients keeps the identity", "Tuning Encoder, clipped pretraining",
     "Tuning Encoder", "identity", "kept"),
    ("Predicting the offsets is not worse than predicting scales (identity × fidelity)", "Tuning Encoder",
     "Tuning Encoder, scales hypernetwork", "product", "kept"),
    ("The dual path at generation follows the prompt better (fidelity)", "Tuning Encoder, dual path at generation",
     "Tuning Encoder", "fidelity", 1),
    ("The dual path at generation keeps the identity", "Tuning Encoder, dual path at generation", "Tuning Encoder",
     "identity", "kept"),
    ("Captioned, from one image in 12 steps, the Tuning Encoder keeps TI's identity (TI: four images, 400 steps)",
     "Tuning Encoder, captioned", "TI", "identity", "kept"),
    ("Captioned, its prompt fidelity is not below TI's", "Tuning Encoder, captioned", "TI", "fidelity", "kept"),
    ("Captioned, in 4 steps, it keeps TI's identity", "Tuning Encoder, captioned, 4 steps", "TI", "identity", "kept"),
    ("Captioned, it keeps the identity of TI trained on the same captions", "Tuning Encoder, captioned",
     "TI, captioned", "identity", "kept"),
    ("Captioned, it follows the prompt better than TI trained on the same captions (fidelity)",
     "Tuning Encoder, captioned", "TI, captioned", "fidelity", 1),
    ("The caption helps the tuning (identity × fidelity, 8 samples a step)", "Tuning Encoder, captioned",
     "Tuning Encoder, batch 8", "product", 1),
    ("The captioned recipe beats the default tuning (identity)", "Tuning Encoder, captioned", "Tuning Encoder",
     "identity", 1),
    ("The captioned recipe beats the default tuning from another pretraining seed (identity)",
     "Tuning Encoder, captioned, clipped pretraining, seed 1", "Tuning Encoder, clipped pretraining, seed 1",
     "identity", 1),
)
# (row, against): wall time per concept; TI, captioned ran in the same session as the captioned rows
SPEEDUPS = (("Tuning Encoder", "TI"), ("Tuning Encoder, 4 steps", "TI"), ("Tuning Encoder, captioned", "TI"),
            ("Tuning Encoder, captioned, 4 steps", "TI"), ("Tuning Encoder, captioned", "TI, captioned"))


def judge_claims(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    out = []
    for claim, row, base, name, test in CLAIMS:
        diff = paired(cells, row, base, name)
        if test == "kept":
            mean, half = diff
            found = "not testable" if math.isnan(half) else "found" if mean - half > -MARGIN else "not found"
        else:
            found = verdict(diff, test)
        out.append({"claim": claim, "row": row, "against": base, "metric": name, "difference": diff,
                    "verdict": found})
    return out


def speedups(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per (row, against): the median over shared cells of against's wall time per concept ÷ the row's (training
    through the node, both measured by the benchmark)."""
    out = []
    for row, base in SPEEDUPS:
        mine = {(c["concept"], c["seed"]): c["recipe_train_s"] for c in cells if c["row"] == row}
        theirs = {(c["concept"], c["seed"]): c["recipe_train_s"] for c in cells if c["row"] == base}
        ratios = sorted(theirs[k] / mine[k] for k in mine.keys() & theirs.keys())
        if ratios:
            out.append({"row": row, "against": base, "cells": len(ratios), "median": statistics.median(ratios),
                        "range": [ratios[0], ratios[-1]], "row_median_s": statistics.median(mine.values()),
                        "against_median_s": statistics.median(theirs.values())})
    return out


def summarise(cells: Sequence[Cell]) -> dict[str, Any]:
    order = [*protocol.BASELINE_ROWS, *protocol.ROWS]
    return {row: summarise_row(cells, row) for row in order if any(c["row"] == row for c in cells)}


def _f(value: Interval | float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    mean, half = value if isinstance(value, tuple) else (value, float("nan"))
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(rows: dict[str, Any], claims: list[dict[str, Any]], times: Sequence[dict[str, Any]] = ()) -> str:
    lines = ["| row | cells | identity | position | small | blue | fidelity | identity × fidelity | ‖v‖ | "
             "identity − TI | fidelity − TI | small − TI |", "|" + "---|" * 12]
    for row, r in rows.items():
        vs = r.get("vs_TI", {})
        lines.append(f"| {row} | {r['cells']} | {_f(r['identity'])} | {_f(r['position'])} | {_f(r['size'])} | "
                     f"{_f(r['colour_change'])} | {_f(r['fidelity'])} | {_f(r['product'])} | {_f(r['norm'][0])} | "
                     f"{_f(vs.get('identity'))} | {_f(vs.get('fidelity'))} | {_f(vs.get('size'))} |")
    curves = {row: r["curve"] for row, r in rows.items() if "curve" in r}
    if curves:
        steps = sorted({s for c in curves.values() for s in c})
        lines += ["", "| identity after | " + " | ".join(map(str, steps)) + " | steps → 90% |",
                  "|" + "---|" * (len(steps) + 2)]
        for row, c in curves.items():
            lines.append(f"| {row} | " + " | ".join(_f(c.get(s)) for s in steps) +
                         f" | {rows[row]['steps_to_90']} |")
    lines += ["", "| claim | difference (95% t interval) | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {_f(c['difference'], 3)} | {c['verdict']} |" for c in claims]
    if times:
        lines += ["", "| wall time per concept | row (median) | against (median) | against ÷ row, median (range) |",
                  "|---|---|---|---|"]
        lines += [f"| {t['row']} vs {t['against']} | {t['row_median_s']:.1f} s | {t['against_median_s']:.1f} s | "
                  f"{t['median']:.1f}× ({t['range'][0]:.1f}–{t['range'][1]:.1f}) |" for t in times]
    return "\n".join(lines)


def write(cells: Sequence[Cell], out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    rows, claims, times = summarise(cells), judge_claims(cells), speedups(cells)
    result = {"protocol": {"rows": {name: {"method": r.method, "steps": r.steps, "learning_rate": r.learning_rate,
                                           "effective_learning_rate": r.effective_learning_rate,
                                           "batch_size": r.batch_size, "options": dict(r.options),
                                           "size_words": r.size_words, "curve": r.curve, "recipe": r.recipe,
                                           "generation_blend": r.generation_blend}
                                    for name, r in protocol.ROWS.items()},
                           "curve": protocol.CURVE, "per_group": protocol.PER_GROUP,
                           "prompts": protocol.scored_prompts("⟨c⟩"), "class_words": protocol.CLASS_WORD,
                           "sampler": "euler/normal, 20 steps, CFG 5"},
              "rows": {row: {k: v for k, v in r.items()} for row, r in rows.items()},
              "claims": claims, "speedups": times, "cells": list(cells)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    say(table(rows, claims, times))
    say(f"wrote {out} ({len(cells)} cells)")
    return result

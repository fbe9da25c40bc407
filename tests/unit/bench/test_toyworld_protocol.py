"""The quality benchmark's protocol (bench/toyworld/protocol.py, report.py): what is scored is never what a method
trained on, each claim's baseline runs at the claim's settings, and the paired statistics say what they should."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from toyworld import protocol, report, world  # noqa: E402

# make_images(400, seed 11, training_only=True) before the benchmark had more than its first four concepts: the
# base model's training data must not change when concepts are added (the shipped weights were built from it).
BUILD_DATA_DIGEST = "4a64a5686a379179"


@pytest.mark.parametrize("row", protocol.ROWS.values(), ids=list(protocol.ROWS))
def test_no_scored_prompt_is_a_training_prompt(row):
    for concept in world.CONCEPTS.values():
        assert protocol.contamination(row, concept) == set(), (row.name, concept.name)


def test_the_check_would_see_the_old_size_prompt():
    # the previous protocol scored "a photo of a small <c>", one of the templates TI, DTI and BaTex train on
    text = protocol.phrase("TI", world.CONCEPTS["tealstar"])
    assert "a photo of a small {}".replace("{}", text) in {
        t.replace("{}", text) for t in protocol.training_templates(protocol.TI)}


def test_captioned_rows_train_on_their_references_captions_and_the_check_sees_them(monkeypatch):
    varied = next(c for c in world.CONCEPTS.values() if c.varied)
    assert protocol.reference_captions(varied) == [
        "a photo of a big {} in the center", "a photo of a small {} on the left", "a photo of a big {} at the top",
        "a photo of a small {} on the right"]  # as the encoder's pretraining folder captions its images
    assert protocol.ROWS["Tuning Encoder, captioned"].captioned and protocol.ROWS["TI, captioned"].captioned
    monkeypatch.setattr(world, "layout_caption", lambda size, position: "a {}")  # a caption that is scored
    assert protocol.contamination(protocol.ROWS["TI, captioned"], varied) == {f"a embedding:{varied.name}"}


def test_the_size_word_ablation_only_drops_templates_that_name_a_size():
    published = protocol.training_templates(protocol.TI)
    ablated = protocol.training_templates(protocol.ROWS["TI, no size words"])
    dropped = set(published) - set(ablated)
    assert dropped == {"a photo of the small {}", "a photo of the large {}", "a photo of a small {}"}
    assert set(ablated) < set(published)


def test_each_claim_runs_against_its_own_baseline_settings():
    rows = protocol.ROWS
    assert rows["TI 2e-3"].effective_learning_rate == pytest.approx(2e-3)      # BaTex's TI baseline
    assert rows["BaTex"].effective_learning_rate == pytest.approx(2e-3) and rows["BaTex"].steps == 1000
    assert rows["TI"].effective_learning_rate == pytest.approx(0.02) and rows["TI"].steps == 400  # DTI's baseline
    assert rows["DTI"].effective_learning_rate == pytest.approx(0.04) and rows["DTI"].steps == rows["TI"].steps
    assert rows["DTI β 0.99"].options["beta"] > 0 == rows["DTI"].options["beta"]
    cat, bias = rows["CatVersion"], rows["CatVersion +1 bias"]
    assert (cat.batch_size, cat.effective_learning_rate, cat.steps) == (2, pytest.approx(1e-2), 1000)
    assert (cat.options["mask_bias"], bias.options["mask_bias"]) == (0.0, 1.0)
    for claim, row, base, *_ in report.CLAIMS:
        named = [r for group in (row, base) for r in ((group,) if isinstance(group, str) else group)]
        assert all(r in rows for r in named), claim


def test_batex_keeps_the_papers_share_of_the_width():
    assert protocol.batex_basis_size(768) == 720
    assert protocol.batex_basis_size(64) == 60          # the toy world: 720 rows would span all 64 dimensions


def test_curves_reach_every_step_and_the_recipe():
    for row in protocol.ROWS.values():
        points = protocol.curve_points(row)
        assert row.steps in points
        if row.curve:
            assert set(protocol.CURVE) <= set(points)


def test_the_concepts_cover_every_kind_and_leave_the_build_unchanged():
    kinds = [c.kind for c in world.CONCEPTS.values()]
    assert len(kinds) >= 8 and {"hidden colour", "hidden shape", "known words", "varied references"} <= set(kinds)
    assert sum(c.varied for c in world.CONCEPTS.values()) >= 2
    images, _, labels, _ = world.make_images(400, 11, training_only=True)
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16] == BUILD_DATA_DIGEST
    assert all(c.colour != protocol.EDIT_COLOUR for c in world.CONCEPTS.values())


def _cells(row, values, seeds=(0, 1, 2)):
    return [{"row": row, "concept": f"c{i}", "kind": "k", "seed": s, "n": 32, "identity": v, "curve": {}}
            for i, v in enumerate(values) for s in seeds]


def test_paired_differences_are_per_cell():
    ti = _cells("TI", [4, 16, 28])
    dti = _cells("DTI", [8, 20, 32])                     # +4 images of 32 on every cell, whatever the concept
    mean, half = report.paired(ti + dti, "DTI", "TI", "identity")
    assert mean == pytest.approx(4 / 32) and half == pytest.approx(0)
    # unpaired, the spread between concepts would hide it
    assert report.summarise_row(ti, "TI")["identity"][1] > 0.2
    assert report.verdict((mean, 0.01)) == "found"
    assert report.verdict((-mean, 0.01)) == "opposite" and report.verdict((0.01, 0.05)) == "not found"


def test_paired_differences_use_only_the_cells_both_rows_have():
    ti = _cells("TI", [4, 16])
    cat = _cells("CatVersion", [4, 16, 30], seeds=(0,))
    assert report.paired(ti + cat, "CatVersion", "TI", "identity") == (0.0, 0.0)


def test_pooled_rows_are_averaged_per_cell_on_the_cells_all_of_them_have():
    a, b = _cells("A", [4, 16, 28]), _cells("B", [8, 20], seeds=(0,))   # B lacks the third concept and seeds 1, 2
    ti = _cells("TI", [0, 0, 0])
    mean, half = report.paired(a + b + ti, ("A", "B"), "TI", "identity")
    assert mean == pytest.approx((6 / 32 + 18 / 32) / 2) and half > 0   # the two cells both rows have, averaged


def test_the_readme_quality_table_is_the_one_the_results_give():
    import json

    root = Path(__file__).resolve().parents[3]
    cells = json.loads((root / "bench" / "results" / "toyworld.json").read_text())["cells"]
    expected = report.table(report.summarise(cells), report.judge_claims(cells), report.speedups(cells))
    assert expected in (root / "README.md").read_text()

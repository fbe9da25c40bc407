"""The toy world's CLIP vision tower (bench/toyworld/vision.py): the wide file built from the small tower is what
the stock loader builds, and computes the small tower exactly; the shipped tower's features carry the attributes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from comfy_tier import require_comfyui

require_comfyui()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import comfy.clip_model  # noqa: E402
import comfy.ops  # noqa: E402
from toyworld import vision, world  # noqa: E402

STOCK = json.loads(vision.STOCK_CONFIG.read_text())


def perturbed_small(seed=0, tower=vision.FIRST):
    """A small tower with weights away from their initial values, its constraints restored as training does."""
    model = vision.small_model(seed, tower)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vision.centre(model)
    return model


@pytest.mark.parametrize("tower", vision.TOWERS, ids=lambda t: t.file.stem)
def test_the_stock_file_has_exactly_the_keys_and_shapes_the_stock_loader_builds(tower):
    with torch.device("meta"):
        stock = comfy.clip_model.CLIPVisionModelProjection(STOCK, torch.float32, "meta", comfy.ops.manual_cast)
    built = vision.stock_state_dict(perturbed_small(tower=tower))
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert f"vision_model.encoder.layers.{STOCK['num_hidden_layers'] - 2}.layer_norm1.weight" in built  # ViT-L's key


TWO_HEADS = vision.Tower(vision.FIRST.file, 128, 3, (0.0,), 1)  # a config only: its weights are never loaded
SHAPES = {(t.width, t.layers): t for t in (*vision.TOWERS, TWO_HEADS)}  # one tower of each width × depth


@pytest.mark.parametrize("tower", SHAPES.values(), ids=[f"{w}x{n}" for w, n in SHAPES])
def test_the_wide_model_computes_the_small_tower_exactly(tower):
    """Also with several heads: the small tower's heads are ViT-L's first ones."""
    small = perturbed_small(1, tower)
    config = {**STOCK, "num_hidden_layers": 6}  # ViT-L's width and heads, fewer layers: the same padding, cheaper
    wide = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
    wide.load_state_dict(vision.stock_state_dict(small, config))
    images, _ = vision.renders(2, seed=5, include_benchmark_pairs=True)
    with torch.no_grad():
        expected = vision.tokens(small, images)
        penultimate = wide(pixel_values=vision.preprocess(images), intermediate_output=-2)[1]
    assert expected.abs().max() > 1
    assert (penultimate[..., :tower.width] - expected).abs().max() < 1e-4
    assert penultimate[..., tower.width:].abs().max() == 0


def test_a_towers_runs_continue_each_other_and_never_draw_a_scene_twice():
    first, second = vision.runs_of(vision.FIRST), vision.runs_of(vision.SECOND)
    # the first tower's scenes as it was built and shipped (weights/world.json)
    assert [(r.start, r.random_colour, r.scenes) for r in first] == [
        (None, 0.0, 0), (vision.FIRST.file, 0.0, 1_000_000), (vision.FIRST.file, 0.5, 51_000_000)]
    assert second[:3] == first
    assert [(r.tower, r.start) for r in second[3:]] == [(vision.SECOND, vision.FIRST.file),
                                                        (vision.SECOND, vision.SECOND.file)]
    drawn = [set(range(r.scenes, r.scenes + r.tower.steps)) for r in second]
    assert sum(map(len, drawn)) == len(set().union(*drawn))


def test_the_constraints_refuse_a_width_the_stock_loader_never_builds():
    with pytest.raises(ValueError, match="STOCK_WIDTH"):
        vision.stock_state_dict(perturbed_small(), {**STOCK, "hidden_size": 512})


@pytest.mark.skipif(not vision.CURRENT.file.exists(), reason="the shipped vision tower is not built")
def test_the_shipped_tower_reads_colour_and_shape_on_unseen_pairs():
    """Linear probes on the mean token, fitted on scenes without the benchmark pairs. The build's probe (3,000
    scenes; weights/world.json) reads colour 1.00 and shape 0.93 on the benchmark pairs, shape 0.98 on seen pairs
    (the first tower: 0.39 and 0.79); these bounds leave room for a smaller sample."""
    model = vision.load_small()
    train_x, train_y = vision.renders(900, seed=31, include_benchmark_pairs=False)
    seen_x, seen_y = vision.renders(300, seed=33, include_benchmark_pairs=False)
    bench_x, bench_y = vision.benchmark_renders(300, seed=32)
    train_f, seen_f, bench_f = (vision.pooled_features(model, x) for x in (train_x, seen_x, bench_x))
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6

    def accuracy(attribute, features, labels):
        i = world.ATTRIBUTES.index(attribute)
        probe = vision.fit_probe((train_f - mean) / std, train_y[:, i], len(world.CLASSES[attribute]))
        return (probe((features - mean) / std).argmax(-1) == labels[:, i]).float().mean().item()

    assert accuracy("colour", bench_f, bench_y) >= 0.95
    assert accuracy("position", bench_f, bench_y) >= 0.9
    assert accuracy("shape", seen_f, seen_y) >= 0.9
    assert accuracy("shape", bench_f, bench_y) >= 0.8  # chance: 1/6

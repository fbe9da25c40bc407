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


def perturbed_small(seed=0):
    """A small tower with weights away from their initial values, its constraints restored as training does."""
    model = vision.small_model(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vision.centre(model)
    return model


def test_the_stock_file_has_exactly_the_keys_and_shapes_the_stock_loader_builds():
    with torch.device("meta"):
        stock = comfy.clip_model.CLIPVisionModelProjection(STOCK, torch.float32, "meta", comfy.ops.manual_cast)
    built = vision.stock_state_dict(perturbed_small())
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert f"vision_model.encoder.layers.{STOCK['num_hidden_layers'] - 2}.layer_norm1.weight" in built  # ViT-L's key


def test_the_wide_model_computes_the_small_tower_exactly():
    small = perturbed_small(1)
    config = {**STOCK, "num_hidden_layers": 4}  # ViT-L's width and heads, fewer layers: the same padding, cheaper
    wide = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
    wide.load_state_dict(vision.stock_state_dict(small, config))
    images, _ = vision.renders(2, seed=5, include_benchmark_pairs=True)
    with torch.no_grad():
        expected = vision.tokens(small, images)
        penultimate = wide(pixel_values=vision.preprocess(images), intermediate_output=-2)[1]
    assert expected.abs().max() > 1
    assert (penultimate[..., :vision.SMALL["hidden_size"]] - expected).abs().max() < 1e-4
    assert penultimate[..., vision.SMALL["hidden_size"]:].abs().max() == 0


def test_the_constraints_refuse_a_width_the_stock_loader_never_builds():
    with pytest.raises(ValueError, match="STOCK_WIDTH"):
        vision.stock_state_dict(perturbed_small(), {**STOCK, "hidden_size": 512})


@pytest.mark.skipif(not vision.VISION_FILE.exists(), reason="the shipped vision tower is not built")
def test_the_shipped_tower_tells_colour_and_shape_apart_on_unseen_pairs():
    """A nearest-class-mean reader (cheaper than the build's probe, and no better) on the benchmark concepts' pairs,
    which the tower never saw: colour and shape from its mean token."""
    model = vision.load_small()
    train_x, train_y = vision.renders(270, seed=31, include_benchmark_pairs=False)
    test_x, test_y = vision.benchmark_renders(120, seed=32)
    train_f, test_f = vision.pooled_features(model, train_x), vision.pooled_features(model, test_x)
    for i, attribute in enumerate(("colour", "shape")):
        classes = sorted(set(train_y[:, i].tolist()))
        means = torch.stack([train_f[train_y[:, i] == c].mean(0) for c in classes])
        predicted = torch.tensor(classes)[torch.cdist(test_f, means).argmin(1)]
        accuracy = (predicted == test_y[:, i]).float().mean().item()
        assert accuracy >= 0.9, f"{attribute}: {accuracy:.2f} ({world.ATTRIBUTES})"

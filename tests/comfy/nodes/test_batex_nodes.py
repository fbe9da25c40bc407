"""BaTex in ComfyUI: the BaTex Options node, and the method trained through the real ComfyUI host."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node

tc = require_comfyui()

from concept_forge.nodes.batex import BaTexOptions  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import batex  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402

WIDTHS = {"sd1": {"l": 32}, "sdxl": {"l": 32, "g": 48}}  # tiny_comfy's TE_L and TE_G


def node_inputs(**overrides):
    inputs = dict(basis_size=720, ranking="dot", second_token="", target_rank=0, sum_to_one=0.0, weight_decay=0.01,
                  seed=0)
    return {**inputs, **overrides}


def span_residual(v, basis):
    """‖v − proj_rowspace(B) v‖ / ‖v‖, worst row, in float64."""
    v, basis = v.detach().double(), basis.detach().double()
    _, s, vh = torch.linalg.svd(basis, full_matrices=False)
    q = vh[: int((s > s[0] * 1e-10).sum())]
    return ((v - v @ q.T @ q).norm(dim=-1) / v.norm(dim=-1)).max().item()


def test_the_options_node_builds_batex_options_without_a_model():
    options = run_node(BaTexOptions, **node_inputs(basis_size=300, ranking="cosine", second_token=" toy ",
                                                   target_rank=500, sum_to_one=0.5, weight_decay=0.0, seed=3)).args[0]
    assert options == batex.Options(basis_size=300, ranking="cosine", second_token="toy", target_rank=500,
                                    sum_to_one=0.5, weight_decay=0.0, seed=3)
    assert (options.learning_rate, options.steps, options.flip_p) == (5e-4, 1000, 0.5)  # the paper's recipe
    assert run_node(BaTexOptions, **node_inputs()).args[0] == batex.Options()
    with pytest.raises(ValueError, match="BaTex Options: ranking must be one of dot, cosine, l2, random"):
        run_node(BaTexOptions, **node_inputs(ranking="manhattan"))


def train_batex(arch, options, steps=30):
    model, clip, vae = tc.tiny_model(arch), tc.tiny_clip(arch), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, arch) as host:
        method = batex.build(host, "dog", 0, options)
        (dog,) = host.token_ids("l", "dog")
        init = {k: host.vocabulary(k)[[host.token_ids(k, "dog")[0]]].detach().clone() for k in host.encoders}
        start = method.vectors()
        learning_rate = options.learning_rate * 4  # batch 4, as Learn Concept scales it
        result = train(method, host, TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES)),
                       LoopOptions(steps=steps, learning_rate=learning_rate, batch_size=4, heldout_draws=8))
    for key in init:  # step 0 is the init token's row exactly, read from ComfyUI's (inference-mode) table
        assert torch.equal(start[key].detach(), init[key])
    assert dog == method.ids["l"][0][0]
    return method, result, init


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_the_paper_recipe_lowers_the_heldout_loss_through_comfyui(arch):
    # tiny_comfy, seed 0, 30 steps at 2e-3: sd1 1.4613 → 1.4121 (-3.4%), sdxl 1.4778 → 1.3617 (-7.9%)
    method, result, _ = train_batex(arch, batex.Options())
    assert result.heldout_after < 0.99 * result.heldout_before
    # 720 rows of a 49408-row vocabulary span the whole (tiny) width, and the report says so
    assert method.report() == [f"Basis: M = 720 rows ranked by dot, rank(B) = {w} (clip_{k})"
                               for k, w in WIDTHS[arch].items()]
    for key, vectors in method.vectors().items():
        assert span_residual(vectors, method.bases[key][0]) < 1e-5


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_basis_narrower_than_d_keeps_the_concept_in_span_b_through_comfyui(arch):
    # M = 16 < d: rank(B) = 16 of 32 (l) and 48 (g). tiny_comfy, seed 0, 60 steps at 2e-3 effective:
    # sd1 1.46130 → 1.45889, sdxl 1.47782 → 1.47721 (a small gain: the subspace is narrow)
    method, result, init = train_batex(arch, batex.Options(basis_size=16), steps=60)
    assert result.heldout_after < result.heldout_before - 3e-4
    for key, vectors in method.vectors().items():
        basis = method.bases[key][0]
        assert method.ranks[key] == [16] and basis.shape == (16, WIDTHS[arch][key])
        assert not torch.equal(vectors.detach(), init[key])                                 # it trained...
        assert span_residual(vectors, basis) < 1e-5                                         # ...inside span(B)
        assert span_residual(torch.randn(4, basis.shape[1], generator=torch.Generator().manual_seed(0)), basis) > 0.3


def test_second_token_goes_through_comfyuis_tokenizer():
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = batex.build(host, "dog", 0, batex.Options(basis_size=50, second_token="cat"))
        (cat,) = host.token_ids("l", "cat")
        assert method.ids["l"][0][-1] == cat and len(method.ids["l"][0]) == 50
        with pytest.raises(ValueError, match="second_token 'teddy bear' splits into 2 tokens"):
            batex.build(host, "dog", 0, batex.Options(second_token="teddy bear"))

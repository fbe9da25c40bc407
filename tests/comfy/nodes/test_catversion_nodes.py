"""CatVersion in ComfyUI: training through the host, CatVersion Residual on real CLIPs, files."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node, ui_text

tc = require_comfyui()

from concept_forge.nodes.catversion import CatVersionOptions, CatVersionResidual  # noqa: E402
from concept_forge.nodes.files import LoadConcept, SaveConcept  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402
from concept_forge.nodes.learn import LearnConcept  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import create_method  # noqa: E402
from concept_forge.trainers.methods.catversion import Options, tensor_key  # noqa: E402

WIDTHS = {"sd1": {"l": 32}, "sdxl": {"l": 32, "g": 48}}


def concept(arch="sd1", name="teddy", layers=(1, 2), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {tensor_key(k, i, part): torch.randn(1, w, generator=g) * scale
               for k, w in WIDTHS[arch].items() for i in layers for part in ("keys", "values")}
    state = {"layers": {k: list(layers) for k in WIDTHS[arch]}, "tokens": 1, "mask_bias": 0.0, "class_word": "bear",
             "init_scale": 1.0}
    return Concept(name, "catversion", arch, {}, state=state, tensors=tensors)


def encode(clip, text="a photo of a bear on the beach"):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def residual(clip, c, strength=1.0, apply_to_negative=False):
    return run_node(CatVersionResidual, clip=clip, concept=c, strength=strength,
                    apply_to_negative=apply_to_negative).args[0]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_strength_zero_is_exactly_the_original_and_one_is_not(arch):
    clip = tc.tiny_clip(arch)
    original, original_pooled = encode(clip)
    zero, zero_pooled = encode(residual(clip, concept(arch), strength=0.0))
    assert (zero - original).abs().max() < 1e-6 and (zero_pooled - original_pooled).abs().max() < 1e-6
    full, _ = encode(residual(clip, concept(arch)))
    assert (full - original).abs().max() > 1e-3


def test_hidden_states_before_the_first_patched_layer_do_not_change():
    clip = tc.tiny_clip("sd1")
    patched = residual(clip, concept(layers=(2,)), strength=1.5)
    clip.clip_layer(-2)      # layer 1 of the three: before the patched layer 2
    patched.clip_layer(-2)
    assert torch.equal(encode(patched)[0], encode(clip)[0])


def test_the_input_clip_stays_unpatched_after_the_node_ran():
    clip = tc.tiny_clip("sd1")
    before, _ = encode(clip)
    encode(residual(clip, concept()))
    after, _ = encode(clip)
    assert torch.equal(before, after)


def test_only_prompts_that_mention_the_class_word_get_it_unless_the_negative_is_asked_for():
    clip = tc.tiny_clip("sd1")
    negative = "blurry, low quality"
    off = residual(clip, concept(), apply_to_negative=False)
    on = residual(clip, concept(), apply_to_negative=True)
    assert torch.equal(encode(off, negative)[0], encode(clip, negative)[0])
    assert not torch.allclose(encode(on, negative)[0], encode(clip, negative)[0])
    assert not torch.allclose(encode(off)[0], encode(clip)[0])                 # "bear" is in the default prompt
    assert not torch.allclose(encode(off, "a photo of teddy")[0], encode(clip, "a photo of teddy")[0])  # its name


def test_a_chained_pair_differs_from_either_concept_alone():
    clip = tc.tiny_clip("sd1")
    a, b = concept(name="a", seed=1), concept(name="b", seed=2)
    only_a, only_b = encode(residual(clip, a))[0], encode(residual(clip, b))[0]
    both = encode(residual(residual(clip, a), b))[0]
    assert (both - only_a).abs().max() > 1e-4 and (both - only_b).abs().max() > 1e-4


def test_residuals_for_another_model_are_refused():
    with pytest.raises(ValueError, match="CatVersion Residual: concept 'teddy' was learned on SDXL"):
        residual(tc.tiny_clip("sd1"), concept("sdxl"))
    wide = Concept("wide", "catversion", "sd1", {}, state={**concept().state, "layers": {"l": [2]}},
                   tensors={tensor_key("l", 2, p): torch.ones(1, 768) for p in ("keys", "values")})
    with pytest.raises(ValueError, match="768-wide residuals up to layer 2 for clip_l, but this CLIP's is 32-wide"):
        residual(tc.tiny_clip("sd1"), wide)
    ti = Concept("ti", "ti", "sd1", {"l": torch.ones(1, 32)})
    with pytest.raises(ValueError, match="connect it to Apply DTI Token"):
        residual(tc.tiny_clip("sd1"), ti)


def test_clip_skip_below_a_patched_layer_is_reported():
    clip = tc.tiny_clip("sd1")
    clip.clip_layer(-2)
    out = run_node(CatVersionResidual, clip=clip, concept=concept(layers=(1, 2)), strength=1.0,
                   apply_to_negative=False)
    assert "conditions on clip_l layer 1, so the residual of layer(s) [2] has no effect" in ui_text(out)


def test_catversion_lowers_the_heldout_loss_through_comfyui():
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = create_method("catversion", host, "dog", 0, Options(), seed=0)
        result = train(method, host, TrainingSet(tc.tiny_images(), ["dog"]),
                       LoopOptions(steps=50, learning_rate=0.01, batch_size=4, heldout_draws=8))
    assert result.heldout_after < result.heldout_before


def test_learn_concept_trains_only_the_residuals_and_saves_and_loads_bit_exactly(model_folders):
    options = run_node(CatVersionOptions, num_layers=2, tokens=1, mask_bias=0.0, init_scale=1.0).args[0]
    clip = tc.tiny_clip("sd1")
    weights = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    out = run_node(LearnConcept, model=tc.tiny_model("sd1"), clip=clip, vae=tc.tiny_vae(), images=tc.tiny_images(),
                   name="teddy", init_word="bear", method="catversion", steps=4, learning_rate=0.0, batch_size=2,
                   vectors=0, resolution=64, prompts="object", seed=0, precision="auto",
                   gradient_checkpointing=False, method_options=options)
    learned, learned_clip, _, _ = out.args
    assert sum(t.numel() for t in learned.tensors.values()) == 2 * 1 * 2 * 32  # layers × tokens × (k, v) × width
    assert learned.state["layers"] == {"l": [1, 2]} and learned.state["class_word"] == "bear"
    assert all(torch.equal(v, weights[k]) for k, v in clip.cond_stage_model.state_dict().items())
    assert not torch.allclose(encode(learned_clip)[0], encode(clip)[0])   # its CLIP output carries the residual
    summary = ui_text(out)
    assert summary.startswith("teddy: CATVERSION on SD 1.x, 4 steps") and "vector(s)" not in summary
    assert "Residual keys and values on clip_l layers 1–2: 128 numbers trained." in summary
    run_node(SaveConcept, concept=learned, name="", overwrite=False)
    assert (model_folders / "concepts" / "teddy.safetensors").exists()
    loaded = run_node(LoadConcept, file="concepts/teddy.safetensors", name="").args[0]
    assert loaded.state == learned.state
    assert all(torch.equal(loaded.tensors[k], v) for k, v in learned.tensors.items())

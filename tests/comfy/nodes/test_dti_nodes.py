"""DTI in ComfyUI: Learn Concept with method dti, Apply DTI Token and Concept Slerp as the executor runs them."""

import pytest
import torch
import torch.nn.functional as F
from comfy_tier import require_comfyui, run_node, ui_text

tc = require_comfyui()

from concept_forge.nodes.dti import ApplyDTIToken, ConceptSlerp, DTIOptions  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402
from concept_forge.nodes.learn import LearnConcept  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import create_method, method_options  # noqa: E402
from concept_forge.trainers.methods.dti import vocabulary_magnitude  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402


def learn_inputs(arch="sdxl", **overrides):
    inputs = dict(model=tc.tiny_model(arch), clip=tc.tiny_clip(arch), vae=tc.tiny_vae(), images=tc.tiny_images(),
                  name="dti_dog", init_word="dog", method="dti", steps=5, learning_rate=0.0, batch_size=2, vectors=0,
                  resolution=64, prompts="object", seed=0, precision="auto", gradient_checkpointing=False)
    return {**inputs, **overrides}


def m_star(clip):
    return {k: vocabulary_magnitude(getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings()
                                    .weight, "mean") for k in ("l", "g") if hasattr(clip.cond_stage_model, f"clip_{k}")}


def test_learn_concept_dti_keeps_each_encoder_on_its_own_vocabulary_norm(model_folders):
    options = run_node(DTIOptions, kappa=1e-4, magnitude="mean", magnitude_value=0.4, beta=0.0,
                       train_magnitude=False).args[0]
    inputs = learn_inputs(method_options=options)
    out = run_node(LearnConcept, **inputs)
    concept = out.args[0]
    expected = m_star(inputs["clip"])
    assert concept.method == "dti" and set(concept.vectors) == {"l", "g"}
    for key, vectors in concept.vectors.items():
        assert torch.allclose(vectors.norm(dim=-1), torch.tensor([expected[key]]), rtol=1e-4)
    assert concept.state["magnitude"] == pytest.approx(expected)
    assert "5 steps at learning rate 0.02 (0.01 per sample)" in ui_text(out)
    assert "m* =" in ui_text(out)


def test_options_of_another_method_are_refused(model_folders):
    options = run_node(DTIOptions, kappa=1e-4, magnitude="max", magnitude_value=0.4, beta=0.0,
                       train_magnitude=False).args[0]
    with pytest.raises(ValueError, match="Learn Concept: method_options are DTI options but the method is 'ti'"):
        run_node(LearnConcept, **learn_inputs(method="ti", method_options=options))


def test_custom_magnitude_is_used_as_given(model_folders):
    options = run_node(DTIOptions, kappa=1e-4, magnitude="custom", magnitude_value=0.25, beta=0.0,
                       train_magnitude=False).args[0]
    concept = run_node(LearnConcept, **learn_inputs(arch="sd1", method_options=options, steps=2)).args[0]
    assert torch.allclose(concept.vectors["l"].norm(dim=-1), torch.tensor([0.25]), rtol=1e-5)


def test_dti_lowers_the_heldout_loss_through_comfyui():
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = create_method("dti", host, "dog", 0, method_options("dti"))
        result = train(method, host, TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES)),
                       LoopOptions(steps=50, learning_rate=0.04, batch_size=4, heldout_draws=8))
    assert result.heldout_after < result.heldout_before


def ti_concept(arch="sd1", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = {"sd1": {"l": 32}, "sdxl": {"l": 32, "g": 48}}[arch]
    return Concept("shrek", "ti", arch, {k: torch.randn(2, w, generator=g) * scale for k, w in widths.items()})


def applied_vectors(clip, name="shrek"):
    tokens = clip.tokenize(f"a photo of embedding:{name}")
    return {k: torch.stack([t for t, _ in v[0] if torch.is_tensor(t)]) for k, v in tokens.items()}


def test_apply_keep_uses_the_vectors_as_learned_and_strength_scales_them():
    clip, concept = tc.tiny_clip("sd1"), ti_concept()
    kept = applied_vectors(run_node(ApplyDTIToken, clip=clip, concept=concept, strength=1.0, magnitude="keep").args[0])
    half = applied_vectors(run_node(ApplyDTIToken, clip=clip, concept=concept, strength=0.5, magnitude="keep").args[0])
    assert torch.equal(kept["l"], concept.vectors["l"]) and torch.allclose(half["l"], concept.vectors["l"] * 0.5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_in_distribution_puts_any_embedding_on_the_clips_vocabulary_norm(arch):
    clip, concept = tc.tiny_clip(arch), ti_concept(arch)
    out = run_node(ApplyDTIToken, clip=clip, concept=concept, strength=1.0, magnitude="in-distribution")
    expected = m_star(clip)
    for key, vectors in applied_vectors(out.args[0]).items():
        assert torch.allclose(vectors.norm(dim=-1), torch.full((2,), expected[key]), rtol=1e-5)
        assert torch.allclose(F.normalize(vectors, dim=-1), F.normalize(concept.vectors[key], dim=-1), atol=1e-6)
    assert "vocabulary mean" in ui_text(out)


def test_apply_refuses_other_architectures_and_catversion_concepts():
    mismatch = "Apply DTI Token: concept 'shrek' was learned on SDXL but this CLIP is SD 1.x"
    with pytest.raises(ValueError, match=mismatch):
        run_node(ApplyDTIToken, clip=tc.tiny_clip("sd1"), concept=ti_concept("sdxl"), strength=1.0, magnitude="keep")
    cv = Concept("cv", "catversion", "sd1", {}, tensors={"x": torch.ones(1)})
    with pytest.raises(ValueError, match="use CatVersion Residual"):
        run_node(ApplyDTIToken, clip=tc.tiny_clip("sd1"), concept=cv, strength=1.0, magnitude="keep")


def test_concept_slerp_node_returns_a_usable_concept_and_names_mismatches():
    a, b = ti_concept(seed=1), ti_concept(seed=2)
    blend = run_node(ConceptSlerp, concept_a=a, concept_b=b, t=0.0, name="start").args[0]
    assert blend.name == "start" and torch.equal(blend.vectors["l"], a.vectors["l"])
    with pytest.raises(ValueError, match="Concept Slerp: concept 'shrek' is SD 1.x but 'shrek' is SDXL"):
        run_node(ConceptSlerp, concept_a=a, concept_b=ti_concept("sdxl"), t=0.5, name="x")
    assert "path separator" in ConceptSlerp.validate_inputs(name="../x")

"""Tuning Encoder Dual Path: DATE's dual path at generation, through ComfyUI's own sampler (cond and uncond batched)."""

import dataclasses

import pytest
import torch
from comfy_tier import require_comfyui, run_node

tc = require_comfyui()

import comfy.sample  # noqa: E402
from concept_forge.nodes.dual_path import TuningEncoderDualPath, encode  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402
from concept_forge.nodes.tuning import model_with_offsets  # noqa: E402
from concept_forge.trainers.methods import tuning_encoder as tuning  # noqa: E402

TEXT = "a photo of embedding:pup on the beach"
REAL = "a photo of cat on the beach"  # the concept's nearest real word in its place: the hard prompt


def tuned():
    """The tiny SD 1.x model and CLIP, and a Tuning Encoder concept whose token is 'cat' plus a little noise (so its
    nearest real word is 'cat') with seeded offsets on every attention projection."""
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = tuning.build(host, "dog", 0, tuning.Options(rank=2), seed=0)
        cat = host.vocabulary("l")[host.token_ids("l", "cat")].float()
        method.embeddings["l"].copy_(cat + 0.05 * cat.norm() * torch.randn(cat.shape, generator=g) / cat.shape[1]
                                     ** 0.5)
        for up in method.ups:
            up.copy_(0.3 * torch.randn(up.shape, generator=g))
        concept = method.to_concept("pup", "sd1", {})
    return model, clip, concept


def sample(model, positive, negative):
    """Two euler steps at CFG 3 from seeded noise: the sampler batches the positive and negative chunks together."""
    latent = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 3.0, "euler", "normal",
                                   positive, negative, latent, disable_pbar=True, seed=0)


def generate(model, clip, concept, blend):
    dual_model, positive, concept_clip = run_node(TuningEncoderDualPath, model=model, clip=clip, concept=concept,
                                                  text=TEXT, blend=blend).args
    return sample(dual_model, positive, encode(concept_clip, "blurry")), concept_clip


def test_at_alpha_zero_it_is_the_original_model_on_the_nearest_real_word():
    model, clip, concept = tuned()
    dual, _ = generate(model, clip, concept, 0.0)
    with torch.inference_mode():
        plain = sample(model, encode(clip, REAL), encode(clip, "blurry"))
    assert torch.allclose(dual, plain, rtol=1e-4, atol=1e-5)


def test_at_alpha_one_it_is_the_tuning_encoders_own_model_and_in_between_it_blends():
    model, clip, concept = tuned()
    one, concept_clip = generate(model, clip, concept, 1.0)
    with torch.inference_mode():
        own = sample(model_with_offsets(model, concept), encode(concept_clip, TEXT), encode(concept_clip, "blurry"))
    assert torch.equal(one, own)
    zero, _ = generate(model, clip, concept, 0.0)
    half, _ = generate(model, clip, concept, 0.5)
    assert (one - zero).abs().max() > 1e-3
    assert min((half - one).abs().max(), (half - zero).abs().max()) > 1e-4


def test_the_dual_path_leaves_the_input_model_unpatched():
    model, clip, concept = tuned()
    with torch.inference_mode():
        before = sample(model, encode(clip, REAL), encode(clip, "blurry"))
    generate(model, clip, concept, 0.5)
    with torch.inference_mode():
        after = sample(model, encode(clip, REAL), encode(clip, "blurry"))
    assert torch.equal(before, after) and "model_function_wrapper" not in model.model_options


def test_refusals_name_the_node_and_the_fix():
    model, clip, concept = tuned()
    with pytest.raises(ValueError, match="Tuning Encoder Dual Path: the text does not mention embedding:pup"):
        run_node(TuningEncoderDualPath, model=model, clip=clip, concept=concept, text="a photo of a cat", blend=0.5)
    with pytest.raises(ValueError, match="this model already carries the offsets of concept 'pup'.*connect the "
                       "checkpoint's MODEL"):
        run_node(TuningEncoderDualPath, model=model_with_offsets(model, concept).clone(), clip=clip, concept=concept,
                 text=TEXT, blend=0.5)
    dual_model = run_node(TuningEncoderDualPath, model=model, clip=clip, concept=concept, text=TEXT, blend=0.5).args[0]
    with pytest.raises(ValueError, match="already carries the offsets of concept 'pup'"):  # no dual path on a dual path
        run_node(TuningEncoderDualPath, model=dual_model, clip=clip, concept=concept, text=TEXT, blend=0.5)
    ti = dataclasses.replace(concept, method="ti", tensors={})
    with pytest.raises(ValueError, match="was learned by ti; the dual path needs a Tuning Encoder concept"):
        run_node(TuningEncoderDualPath, model=model, clip=clip, concept=ti, text=TEXT, blend=0.5)
    with pytest.raises(ValueError, match="blend is nan"):
        run_node(TuningEncoderDualPath, model=model, clip=clip, concept=concept, text=TEXT, blend=float("nan"))
    assert TuningEncoderDualPath.validate_inputs(text=TEXT, blend=1.5) == \
        "Tuning Encoder Dual Path: blend is 1.5, outside its range 0 to 1."
    assert TuningEncoderDualPath.validate_inputs(text=None, blend=None) is True  # linked: checked when it runs

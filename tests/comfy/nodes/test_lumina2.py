"""Lumina 2, the LLM-conditioned family, on ComfyUI's own classes at tiny sizes: Gemma-2 conditions a NextDiT trained by
flow matching. Stock ComfyUI resolves no `embedding:` for Gemma, so a concept reaches prompts through Apply DTI Token's
CLIP; with it, Lumina 2's own prompt node (system prompt first) gives exactly the conditioning the concept trained
with."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node
from gradients import directional_check

tc = require_comfyui()

from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2  # noqa: E402
from concept_forge.nodes.apply import apply_concepts  # noqa: E402
from concept_forge.nodes.demo_families import GEMMA  # noqa: E402
from concept_forge.nodes.dti import ApplyDTIToken  # noqa: E402
from concept_forge.nodes.files import SaveConcept  # noqa: E402
from concept_forge.nodes.host import ComfyHost, detect_arch  # noqa: E402
from concept_forge.nodes.learn import LearnConcept  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402
from concept_forge.trainers.files import read_concept  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import init_vectors  # noqa: E402
from concept_forge.trainers.methods.dti import vocabulary_magnitude  # noqa: E402
from concept_forge.trainers.methods.ti import TextualInversion  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402

WIDTH = GEMMA["hidden_size"]


def models():
    return tc.tiny_model("lumina2"), tc.tiny_clip("lumina2"), tc.tiny_vae(latent_channels=16)


def training():
    return torch.inference_mode(False), torch.enable_grad()


def lumina_encode(clip, user_prompt, system_prompt="superior"):
    """What Lumina 2's own prompt node gives: the conditioning and its attention mask."""
    with torch.inference_mode():
        ((cond, extra),) = run_node(CLIPTextEncodeLumina2, clip=clip, user_prompt=user_prompt,
                                    system_prompt=system_prompt).args[0]
    return cond, extra


def random_vectors(n=2, seed=0):
    return {"gemma2_2b": torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.3}


def test_lumina2_is_recognised_and_refused_beside_another_family():
    model, clip, _ = models()
    assert detect_arch(model, clip, "Learn Concept") == "lumina2"
    with pytest.raises(ValueError, match="Learn Concept: the CLIP is Lumina 2 but the MODEL is Flux.1; connect both"):
        detect_arch(tc.tiny_model("flux"), clip, "Learn Concept")
    with pytest.raises(ValueError, match="Apply: concept 'my_dog' was learned on Lumina 2 but this CLIP is SDXL"):
        apply_concepts(tc.tiny_clip("sdxl"), [Concept("my_dog", "ti", "lumina2", random_vectors())], "Apply")


def test_training_conditioning_equals_lumina2s_prompt_node_on_a_clip_with_the_concept():
    model, clip, vae = models()
    vectors = random_vectors()
    applied = apply_concepts(clip, [Concept("my_dog", "ti", "lumina2", vectors)], "test")
    stock, extra = lumina_encode(applied, "a photo of embedding:my_dog on the beach")
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
        cond = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)], vectors)
        moved = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)],
                            {"gemma2_2b": vectors["gemma2_2b"] + 1})
    assert stock.shape == cond.cross_attn.shape and extra["attention_mask"].shape == stock.shape[:2]
    assert (cond.cross_attn - stock).abs().max() < 1e-5
    assert (moved.cross_attn - stock).abs().max() > 1e-3  # the vectors are in it
    # without the pack's CLIP, `embedding:` is plain text to Gemma's tokenizer, whatever the embeddings folder holds
    plain, _ = lumina_encode(clip, "a photo of embedding:my_dog on the beach")
    assert plain.shape != stock.shape or (plain - stock).abs().max() > 1e-3


def test_gradients_through_gemma_and_nextdit_match_finite_differences():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
        latents = host.encode_images(tc.tiny_images(2))
        prompts = [host.prepare_prompt("a photo of a {}", 1)] * 2
        g = torch.Generator().manual_seed(1)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.tensor([250, 600])
        start = init_vectors(host, "dog")["gemma2_2b"]
        analytic, numeric = directional_check(
            lambda vec: host.loss(latents, host.encode(prompts, {"gemma2_2b": vec}), noise, timesteps).sum(),
            start, 0.1 * float(start.norm()))
    assert analytic != 0 and abs(analytic - numeric) <= 0.03 * abs(analytic)


def test_the_loss_is_the_velocity_mse_each_prompt_at_its_own_length():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
        sigmas = host.denoiser.sigmas(torch.arange(host.num_timesteps))
        assert abs(float(sigmas[host.num_timesteps // 2]) - 6 / 7) < 2e-3  # t = 0.5 through shift 6: 6t/(1 + 5t)
        latents = host.encode_images(tc.tiny_images(2))
        vectors = init_vectors(host, "dog")
        prompts = [host.prepare_prompt(p, 1) for p in ("a photo of a {}", "a dark photo of the {} in a room")]
        cond = host.encode(prompts, vectors)
        assert cond.lengths[0] != cond.lengths[1] and cond.cross_attn.shape[1] == max(cond.lengths)  # padded, once
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        timesteps = torch.tensor([100, 800])
        ours = host.loss(latents, cond, noise, timesteps)
        sigma = host.denoiser.sigmas(timesteps)
        network = host.model.model.diffusion_model
        expected = []
        for i, prompt in enumerate(prompts):  # one prompt at a time, as ComfyUI's sampler conditions it
            alone = host.encode([prompt], vectors).cross_attn
            s = sigma[i].view(1, 1, 1, 1)
            noisy = s * noise[i:i + 1] + (1 - s) * latents[i:i + 1]
            velocity = network(noisy, sigma[i:i + 1], context=alone, num_tokens=alone.shape[1])
            expected.append(((velocity - (noise[i:i + 1] - latents[i:i + 1])) ** 2).mean())
    assert torch.allclose(ours, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_fifty_ti_steps_lower_the_heldout_loss():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
        method = TextualInversion(init_vectors(host, "dog"))
        data = TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES))
        result = train(method, host, data, LoopOptions(steps=50, learning_rate=0.02, batch_size=4, heldout_draws=8))
    assert result.heldout_after < result.heldout_before


def test_a_learned_concept_saves_loads_and_applies_with_the_conditioning_it_trained_with(model_folders):
    model, clip, vae = models()
    concept, concept_clip, _, _ = run_node(
        LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog", init_word="dog",
        method="ti", steps=3, learning_rate=0.0, batch_size=2, vectors=0, resolution=64, prompts="object", seed=1,
        precision="auto", gradient_checkpointing=True).args
    assert concept.arch == "lumina2" and set(concept.vectors) == {"gemma2_2b"}
    run_node(SaveConcept, concept=concept, name="", overwrite=False)
    path = model_folders / "embeddings" / "my_dog.safetensors"
    from safetensors.torch import load_file

    assert {k: tuple(v.shape) for k, v in load_file(path).items()} == {"gemma2_2b": (1, WIDTH)}
    loaded = read_concept(path)
    assert loaded.arch == "lumina2" and torch.equal(loaded.vectors["gemma2_2b"], concept.vectors["gemma2_2b"])
    applied = run_node(ApplyDTIToken, clip=clip, concept=loaded, strength=1.0, magnitude="keep").args[0]
    for clip_with_concept in (applied, concept_clip):  # Apply DTI Token's CLIP, and Learn Concept's own
        ours, _ = lumina_encode(clip_with_concept, "a photo of embedding:my_dog")
        a, b = training()
        with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
            trained = host.encode([host.prepare_prompt("a photo of {}", 1)], concept.vectors).cross_attn
        assert (ours - trained).abs().max() < 1e-5


def test_dti_keeps_gemmas_own_vocabulary_norm(model_folders):
    model, clip, vae = models()
    concept = run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                       init_word="dog", method="dti", steps=3, learning_rate=0.0, batch_size=2, vectors=0,
                       resolution=64, prompts="object", seed=1, precision="auto",
                       gradient_checkpointing=False).args[0]
    table = clip.cond_stage_model.gemma2_2b.transformer.get_input_embeddings().weight
    m_star = vocabulary_magnitude(table, "mean")
    assert concept.state["magnitude"]["gemma2_2b"] == pytest.approx(m_star, rel=1e-4)
    assert torch.allclose(concept.vectors["gemma2_2b"].norm(dim=-1), torch.tensor(m_star), rtol=1e-4)


@pytest.mark.parametrize("method", ["catversion", "tuning_encoder"])
def test_methods_made_for_unets_refuse_lumina2(model_folders, method):
    model, clip, vae = models()
    with pytest.raises(ValueError, match=r"only .* for Lumina 2 choose ti, dti or batex"):
        run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                 init_word="dog", method=method, steps=1, learning_rate=0.0, batch_size=2, vectors=0, resolution=64,
                 prompts="object", seed=1, precision="auto", gradient_checkpointing=False)


def test_the_init_word_is_read_as_a_word_of_a_prompt_and_a_preview_samples():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "lumina2") as host:
        # Gemma's tokenizer adds no leading space: "photo" alone is two inner-word pieces, " photo" the word's own
        ids = host.token_ids("gemma2_2b", "photo")
        tokenizer = clip.tokenizer.gemma2_2b.tokenizer
        assert len(ids) == 1 and tokenizer.tokenizer.id_to_piece(ids[0]) == "\u2581photo"
        image = host.sample("a photo of {}", init_vectors(host, "dog"), 64, steps=2)
    assert image.shape == (1, 64, 64, 3) and bool(image.isfinite().all())

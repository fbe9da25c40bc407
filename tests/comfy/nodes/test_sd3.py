"""SD 3.5 (CLIP-L, CLIP-G, T5-XXL; MMDiT trained by flow matching) on ComfyUI's own classes at tiny sizes: the
training conditioning is stock's, gradients reach every encoder's vectors, the loss is the velocity loss at SD 3's
time draws, and a learned concept is a file that stock `embedding:` reads back exactly."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node

tc = require_comfyui()

from concept_forge.nodes.apply import apply_concepts, encoder_tables  # noqa: E402
from concept_forge.nodes.dti import prepared_for_clip  # noqa: E402
from concept_forge.nodes.files import SaveConcept  # noqa: E402
from concept_forge.nodes.host import ComfyHost, detect_arch  # noqa: E402
from concept_forge.nodes.learn import LearnConcept  # noqa: E402
from concept_forge.trainers.concept import ENCODER_NAMES, Concept  # noqa: E402
from concept_forge.trainers.files import read_concept  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import init_vectors  # noqa: E402
from concept_forge.trainers.methods.dti import vocabulary_magnitude  # noqa: E402
from concept_forge.trainers.methods.ti import TextualInversion  # noqa: E402
from concept_forge.trainers.slerp import slerp_concepts  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402

WIDTHS = {"l": tc.TE_L["hidden_size"], "g": tc.TE_G["hidden_size"], "t5xxl": 4096}


def models():
    return tc.tiny_model("sd3"), tc.tiny_clip("sd3"), tc.tiny_vae(latent_channels=16)


def training():
    return torch.inference_mode(False), torch.enable_grad()


def random_vectors(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g) * 0.3 for k, w in WIDTHS.items()}


def test_sd3_is_recognised_and_refused_beside_another_family():
    model, clip, _ = models()
    assert detect_arch(model, clip, "Learn Concept") == "sd3"
    with pytest.raises(ValueError, match="Learn Concept: the CLIP is SD 3.5 but the MODEL is SDXL; connect both"):
        detect_arch(tc.tiny_model("sdxl"), clip, "Learn Concept")
    concept = Concept("my_dog", "ti", "sd3", random_vectors())
    with pytest.raises(ValueError, match="Apply: concept 'my_dog' was learned on SD 3.5 but this CLIP is SDXL"):
        apply_concepts(tc.tiny_clip("sdxl"), [concept], "Apply")


def test_training_conditioning_equals_stock_encoding_with_every_encoder():
    model, clip, vae = models()
    vectors = random_vectors()
    applied = apply_concepts(clip, [Concept("my_dog", "ti", "sd3", vectors)], "test")
    with torch.inference_mode():
        stock, stock_pooled = applied.encode_from_tokens(applied.tokenize("a photo of embedding:my_dog on the beach"),
                                                         return_pooled=True)
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "sd3") as host:
        cond = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)], vectors)
        plain = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)],
                            {**vectors, "t5xxl": vectors["t5xxl"] + 1})
    # [CLIP-L | CLIP-G] padded to 4096 over 77 tokens, then T5's 77: the layout SD3ClipModel makes
    assert stock.shape == (1, 154, 4096) and stock_pooled.shape == (1, 80)
    assert (cond.cross_attn - stock).abs().max() < 1e-5 and (cond.pooled - stock_pooled).abs().max() < 1e-5
    assert (plain.cross_attn[:, 77:] - stock[:, 77:]).abs().max() > 1e-3  # T5's tokens carry T5's vectors


def directional_check(f, v, eps, seed=7):
    """f's gradient at v along a random unit direction, and the central finite difference there."""
    v = v.detach().clone().requires_grad_(True)
    f(v).backward()
    d = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
    d /= d.norm()
    with torch.no_grad():
        numeric = (f(v + eps * d) - f(v - eps * d)) / (2 * eps)
    return float((v.grad * d).sum()), float(numeric)


def test_gradients_reaching_each_encoders_vectors_match_finite_differences():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "sd3") as host:
        latents = host.encode_images(tc.tiny_images(2))
        prompts = [host.prepare_prompt("a photo of a {}", 1)] * 2
        g = torch.Generator().manual_seed(1)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.tensor([250, 600])
        start = init_vectors(host, "dog")
        for key in ("l", "g"):  # through the text encoder and the MMDiT to the loss
            analytic, numeric = directional_check(
                lambda vec, key=key: host.loss(latents, host.encode(prompts, {**start, key: vec}), noise,
                                               timesteps).sum(), start[key], 0.15 * float(start[key].norm()))
            assert analytic != 0 and abs(analytic - numeric) <= 0.03 * abs(analytic), key
        # through T5's blocks (patched out of place) to its part of the conditioning; one token among 154 moves
        # the loss too little for a float32 difference quotient, so a fixed projection of T5's output is checked
        weights = torch.randn(1, 77, 4096, generator=g)
        analytic, numeric = directional_check(
            lambda vec: (host.encode(prompts[:1], {**start, "t5xxl": vec}).cross_attn[:, 77:] * weights).sum(),
            start["t5xxl"], 1e-2 * float(start["t5xxl"].norm()))
        assert analytic != 0 and abs(analytic - numeric) <= 0.02 * abs(analytic)


def test_the_loss_is_the_velocity_mse_at_logit_normal_shifted_times():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "sd3") as host:
        sampling = host.model.model.model_sampling
        sigmas = host.denoiser.sigmas(torch.arange(host.num_timesteps))
        # the median time 0.5, shifted by SD 3's 3.0: 3·0.5 / (1 + 2·0.5)
        assert abs(float(sigmas[host.num_timesteps // 2]) - 0.75) < 2e-3
        assert bool((sigmas.diff() > 0).all()) and 0 < float(sigmas[0]) and float(sigmas[-1]) < 1
        latents = host.encode_images(tc.tiny_images(2))
        cond = host.encode([host.prepare_prompt("a photo of a {}", 1)] * 2, init_vectors(host, "dog"))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        timesteps = torch.tensor([100, 800])
        ours = host.loss(latents, cond, noise, timesteps)
        sigma = host.denoiser.sigmas(timesteps)
        noisy = sigma.view(-1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1)) * latents
        velocity = host.model.model.diffusion_model(noisy, sampling.timestep(sigma), context=cond.cross_attn,
                                                    y=cond.pooled)
        expected = ((velocity - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_fifty_ti_steps_lower_the_heldout_loss():
    model, clip, vae = models()
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "sd3") as host:
        method = TextualInversion(init_vectors(host, "dog"))
        data = TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES))
        result = train(method, host, data, LoopOptions(steps=50, learning_rate=0.02, batch_size=4, heldout_draws=8))
    assert result.heldout_after < result.heldout_before


def test_a_learned_concept_is_a_file_stock_embedding_reads_back_exactly(model_folders):
    model, clip, vae = models()
    concept, concept_clip, _, _ = run_node(
        LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog", init_word="dog",
        method="ti", steps=3, learning_rate=0.0, batch_size=2, vectors=0, resolution=64, prompts="object", seed=1,
        precision="auto", gradient_checkpointing=True).args
    assert concept.arch == "sd3" and set(concept.vectors) == set(WIDTHS)
    run_node(SaveConcept, concept=concept, name="", overwrite=False)
    path = model_folders / "embeddings" / "my_dog.safetensors"
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(path).items()}
    assert shapes == {ENCODER_NAMES[k]: (1, w) for k, w in WIDTHS.items()}  # the keys SD3's tokenizers read
    loaded = read_concept(path)
    assert loaded.arch == "sd3" and all(torch.equal(loaded.vectors[k], concept.vectors[k]) for k in WIDTHS)
    stock_clip = tc.tiny_clip("sd3", embedding_directory=str(model_folders / "embeddings"))
    text = "a photo of embedding:my_dog"
    with torch.inference_mode():
        stock = stock_clip.encode_from_tokens(stock_clip.tokenize(text), return_pooled=True)
        ours = concept_clip.encode_from_tokens(concept_clip.tokenize(text), return_pooled=True)
    assert all((s - o).abs().max() < 1e-5 for s, o in zip(stock, ours, strict=True))


def test_dti_keeps_each_encoders_own_vocabulary_norm(model_folders):
    model, clip, vae = models()
    concept = run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                       init_word="dog", method="dti", steps=3, learning_rate=0.0, batch_size=2, vectors=0,
                       resolution=64, prompts="object", seed=1, precision="auto",
                       gradient_checkpointing=False).args[0]
    for key in WIDTHS:
        table = getattr(clip.cond_stage_model, ENCODER_NAMES[key]).transformer.get_input_embeddings().weight
        m_star = vocabulary_magnitude(table, "mean")
        assert concept.state["magnitude"][key] == pytest.approx(m_star, rel=1e-4)
        assert torch.allclose(concept.vectors[key].norm(dim=-1), torch.tensor(m_star), rtol=1e-4)


def test_the_in_distribution_fix_and_slerp_use_each_encoders_own_norm():
    clip = tc.tiny_clip("sd3")
    m_star = {k: vocabulary_magnitude(t, "mean") for k, t in encoder_tables(clip).items()}
    assert set(m_star) == set(WIDTHS) and m_star["t5xxl"] != pytest.approx(m_star["l"], rel=0.1)
    a, b = Concept("a", "ti", "sd3", random_vectors(seed=1)), Concept("b", "ti", "sd3", random_vectors(seed=2))
    fixed, report = prepared_for_clip(a, clip, 1.0, "in-distribution")
    assert "t5xxl: 2 vector(s)" in report
    for key, v in fixed.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.tensor(m_star[key]), rtol=1e-5)
    on_shell = [prepared_for_clip(c, clip, 1.0, "in-distribution")[0] for c in (a, b)]
    blend = slerp_concepts(*on_shell, 0.3, "blend")
    for key, v in blend.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.tensor(m_star[key]), rtol=1e-5)


@pytest.mark.parametrize("method", ["catversion", "tuning_encoder"])
def test_methods_made_for_unets_refuse_sd3_saying_which_to_choose(model_folders, method):
    model, clip, vae = models()
    with pytest.raises(ValueError, match=r"only .* for SD 3.5 choose ti, dti or batex"):
        run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                 init_word="dog", method=method, steps=1, learning_rate=0.0, batch_size=2, vectors=0, resolution=64,
                 prompts="object", seed=1, precision="auto", gradient_checkpointing=False)

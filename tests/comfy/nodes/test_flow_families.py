"""The flow-matching families on ComfyUI's own classes at tiny sizes — SD 3.5 (CLIP-L, CLIP-G, T5-XXL; MMDiT) and
Flux.1 dev (CLIP-L for the pooled vector, T5-XXL; guidance-distilled): the training conditioning is stock's,
gradients reach every encoder's vectors, the loss is the velocity loss at the time draws of SD 3's training, and a
learned concept is a file that stock `embedding:` reads back exactly."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node
from gradients import directional_check

tc = require_comfyui()

from concept_forge.nodes.apply import apply_concepts, encoder_tables  # noqa: E402
from concept_forge.nodes.demo_families import T5_FLUX  # noqa: E402
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

FAMILIES = ["sd3", "flux"]
L, G = tc.TE_L["hidden_size"], tc.TE_G["hidden_size"]
WIDTHS = {"sd3": {"l": L, "g": G, "t5xxl": 4096}, "flux": {"l": L, "t5xxl": T5_FLUX["d_model"]}}
# the stock conditioning's shapes for one short prompt: SD 3.5 [CLIP-L | CLIP-G] padded to 4096 over 77 tokens, then
# T5's 77; Flux T5's 256 tokens alone. Pooled: [CLIP-L | CLIP-G], or CLIP-L's.
STOCK_SHAPES = {"sd3": ((1, 154, 4096), (1, L + G)), "flux": ((1, 256, T5_FLUX["d_model"]), (1, L))}
T5_TOKENS = {"sd3": slice(77, None), "flux": slice(None)}   # where T5's tokens are in the conditioning
# the median time t = 0.5 through each model's shift: SD 3.5's 3·t / (1 + 2·t), Flux's e^1.15 / (e^1.15 + 1/t − 1)
MEDIAN_SIGMA = {"sd3": 0.75, "flux": 0.7595}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def models(family):
    return tc.tiny_model(family), tc.tiny_clip(family), tc.tiny_vae(latent_channels=16)


def training():
    return torch.inference_mode(False), torch.enable_grad()


def random_vectors(family, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g) * 0.3 for k, w in WIDTHS[family].items()}


def test_each_family_is_recognised_and_refused_beside_another():
    label = {"sd3": "SD 3.5", "flux": "Flux.1"}
    for family, other in (("sd3", "flux"), ("flux", "sd3")):
        model, clip, _ = models(family)
        assert detect_arch(model, clip, "Learn Concept") == family
        with pytest.raises(ValueError, match=f"Learn Concept: the CLIP is {label[family]} but the MODEL is "
                                             f"{label[other]}; connect both"):
            detect_arch(tc.tiny_model(other), clip, "Learn Concept")
        concept = Concept("my_dog", "ti", family, random_vectors(family))
        with pytest.raises(ValueError, match=f"Apply: concept 'my_dog' was learned on {label[family]} but this "
                                             "CLIP is SDXL"):
            apply_concepts(tc.tiny_clip("sdxl"), [concept], "Apply")


def test_training_conditioning_equals_stock_encoding_with_every_encoder(family):
    model, clip, vae = models(family)
    vectors = random_vectors(family)
    applied = apply_concepts(clip, [Concept("my_dog", "ti", family, vectors)], "test")
    with torch.inference_mode():
        stock, stock_pooled = applied.encode_from_tokens(applied.tokenize("a photo of embedding:my_dog on the beach"),
                                                         return_pooled=True)
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, family) as host:
        cond = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)], vectors)
        other = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)],
                            {**vectors, "t5xxl": vectors["t5xxl"] + 1})
    assert (tuple(stock.shape), tuple(stock_pooled.shape)) == STOCK_SHAPES[family]
    assert (cond.cross_attn - stock).abs().max() < 1e-5 and (cond.pooled - stock_pooled).abs().max() < 1e-5
    t5 = T5_TOKENS[family]
    assert (other.cross_attn[:, t5] - stock[:, t5]).abs().max() > 1e-3  # T5's tokens carry T5's vectors


def test_gradients_reaching_each_encoders_vectors_match_finite_differences(family):
    model, clip, vae = models(family)
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, family) as host:
        latents = host.encode_images(tc.tiny_images(2))
        prompts = [host.prepare_prompt("a photo of a {}", 1)] * 2
        g = torch.Generator().manual_seed(1)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.tensor([250, 600])
        start = init_vectors(host, "dog")
        for key in set(WIDTHS[family]) - {"t5xxl"}:  # through a CLIP and the transformer to the loss
            analytic, numeric = directional_check(
                lambda vec, key=key: host.loss(latents, host.encode(prompts, {**start, key: vec}), noise,
                                               timesteps).sum(), start[key], 0.15 * float(start[key].norm()))
            assert analytic != 0 and abs(analytic - numeric) <= 0.03 * abs(analytic), key
        # through T5's blocks (patched out of place) to its part of the conditioning; one token among hundreds
        # moves the loss too little for a float32 difference quotient, so a fixed projection of T5's output is
        # checked
        t5 = T5_TOKENS[family]
        weights = torch.randn(host.encode(prompts[:1], start).cross_attn[:, t5].shape, generator=g)
        analytic, numeric = directional_check(
            lambda vec: (host.encode(prompts[:1], {**start, "t5xxl": vec}).cross_attn[:, t5] * weights).sum(),
            start["t5xxl"], 1e-2 * float(start["t5xxl"].norm()))
        assert analytic != 0 and abs(analytic - numeric) <= 0.02 * abs(analytic)


def test_the_loss_is_the_velocity_mse_at_logit_normal_shifted_times(family):
    model, clip, vae = models(family)
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, family) as host:
        sampling = host.model.model.model_sampling
        sigmas = host.denoiser.sigmas(torch.arange(host.num_timesteps))
        assert abs(float(sigmas[host.num_timesteps // 2]) - MEDIAN_SIGMA[family]) < 2e-3
        assert bool((sigmas.diff() > 0).all()) and 0 < float(sigmas[0]) and float(sigmas[-1]) < 1
        latents = host.encode_images(tc.tiny_images(2))
        cond = host.encode([host.prepare_prompt("a photo of a {}", 1)] * 2, init_vectors(host, "dog"))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        timesteps = torch.tensor([100, 800])
        ours = host.loss(latents, cond, noise, timesteps)
        sigma = host.denoiser.sigmas(timesteps)
        noisy = sigma.view(-1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1)) * latents
        extra = {"guidance": torch.full((2,), 3.5)} if family == "flux" else {}  # ComfyUI's default at inference
        velocity = host.model.model.diffusion_model(noisy, sampling.timestep(sigma), context=cond.cross_attn,
                                                    y=cond.pooled, **extra)
        expected = ((velocity - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_fifty_ti_steps_lower_the_heldout_loss(family):
    model, clip, vae = models(family)
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, family) as host:
        method = TextualInversion(init_vectors(host, "dog"))
        data = TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES))
        result = train(method, host, data, LoopOptions(steps=50, learning_rate=0.02, batch_size=4, heldout_draws=8))
    assert result.heldout_after < result.heldout_before


def test_a_learned_concept_is_a_file_stock_embedding_reads_back_exactly(model_folders, family):
    model, clip, vae = models(family)
    concept, concept_clip, _, _ = run_node(
        LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog", init_word="dog",
        method="ti", steps=3, learning_rate=0.0, batch_size=2, vectors=0, resolution=64, prompts="object", seed=1,
        precision="auto", gradient_checkpointing=True).args
    assert concept.arch == family and set(concept.vectors) == set(WIDTHS[family])
    run_node(SaveConcept, concept=concept, name="", overwrite=False)
    path = model_folders / "embeddings" / "my_dog.safetensors"
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(path).items()}
    assert shapes == {ENCODER_NAMES[k]: (1, w) for k, w in WIDTHS[family].items()}  # the keys the tokenizers read
    loaded = read_concept(path)
    assert loaded.arch == family and all(torch.equal(loaded.vectors[k], concept.vectors[k]) for k in WIDTHS[family])
    stock_clip = tc.tiny_clip(family, embedding_directory=str(model_folders / "embeddings"))
    text = "a photo of embedding:my_dog"
    with torch.inference_mode():
        stock = stock_clip.encode_from_tokens(stock_clip.tokenize(text), return_pooled=True)
        ours = concept_clip.encode_from_tokens(concept_clip.tokenize(text), return_pooled=True)
    assert all((s - o).abs().max() < 1e-5 for s, o in zip(stock, ours, strict=True))


def test_dti_keeps_each_encoders_own_vocabulary_norm(model_folders, family):
    model, clip, vae = models(family)
    concept = run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                       init_word="dog", method="dti", steps=3, learning_rate=0.0, batch_size=2, vectors=0,
                       resolution=64, prompts="object", seed=1, precision="auto",
                       gradient_checkpointing=False).args[0]
    for key in WIDTHS[family]:
        table = getattr(clip.cond_stage_model, ENCODER_NAMES[key]).transformer.get_input_embeddings().weight
        m_star = vocabulary_magnitude(table, "mean")
        assert concept.state["magnitude"][key] == pytest.approx(m_star, rel=1e-4)
        assert torch.allclose(concept.vectors[key].norm(dim=-1), torch.tensor(m_star), rtol=1e-4)


def test_the_in_distribution_fix_and_slerp_use_each_encoders_own_norm(family):
    clip = tc.tiny_clip(family)
    m_star = {k: vocabulary_magnitude(t, "mean") for k, t in encoder_tables(clip).items()}
    assert set(m_star) == set(WIDTHS[family]) and m_star["t5xxl"] != pytest.approx(m_star["l"], rel=0.1)
    a = Concept("a", "ti", family, random_vectors(family, seed=1))
    b = Concept("b", "ti", family, random_vectors(family, seed=2))
    fixed, report = prepared_for_clip(a, clip, 1.0, "in-distribution")
    assert "t5xxl: 2 vector(s)" in report
    for key, v in fixed.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.tensor(m_star[key]), rtol=1e-5)
    on_shell = [prepared_for_clip(c, clip, 1.0, "in-distribution")[0] for c in (a, b)]
    blend = slerp_concepts(*on_shell, 0.3, "blend")
    for key, v in blend.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.tensor(m_star[key]), rtol=1e-5)


@pytest.mark.parametrize("method", ["catversion", "tuning_encoder"])
def test_methods_made_for_unets_refuse_flow_families_saying_which_to_choose(model_folders, family, method):
    model, clip, vae = models(family)
    label = {"sd3": "SD 3.5", "flux": "Flux.1"}[family]
    with pytest.raises(ValueError, match=rf"only .* for {label} choose ti, dti or batex"):
        run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                 init_word="dog", method=method, steps=1, learning_rate=0.0, batch_size=2, vectors=0, resolution=64,
                 prompts="object", seed=1, precision="auto", gradient_checkpointing=False)


def saved_for_backward(run):
    """run()'s result and the bytes of the tensors autograd kept for its backward pass (each storage once);
    what a checkpointed block recomputes instead is not kept."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(kept.values())


@pytest.mark.parametrize("family", [*FAMILIES, "lumina2"])
def test_gradient_checkpointing_changes_nothing_but_memory(family):
    results = []
    for checkpointing in (False, True):
        model, clip, vae = models(family)
        a, b = training()
        with a, b, ComfyHost(model, clip, vae, family, gradient_checkpointing=checkpointing) as host:
            latents = host.encode_images(tc.tiny_images(2))
            vectors = {k: v.requires_grad_(True) for k, v in init_vectors(host, "dog").items()}
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
            prompts = [host.prepare_prompt("a photo of a {}", 1)] * 2
            cond = host.encode(prompts, vectors)
            losses, kept = saved_for_backward(lambda h=host, x=latents, c=cond, n=noise:
                                              h.loss(x, c, n, torch.tensor([300, 700])))
            losses.sum().backward()
            results.append((float(losses.sum().detach()), {k: v.grad.clone() for k, v in vectors.items()}, kept))
    (plain, plain_grads, plain_kept), (checkpointed, checkpointed_grads, checkpointed_kept) = results
    assert plain == checkpointed
    assert all(torch.allclose(plain_grads[k], checkpointed_grads[k], rtol=1e-5, atol=1e-9) for k in plain_grads)
    assert checkpointed_kept < 0.8 * plain_kept  # the blocks' activations are recomputed, not kept


def test_text_encoders_clip_only_keeps_t5_at_the_init_words_vectors(model_folders):
    from concept_forge.nodes.training import TrainingOptions

    model, clip, vae = models("flux")
    concept = run_node(LearnConcept, model=model, clip=clip, vae=vae, images=tc.tiny_images(), name="my_dog",
                       init_word="dog", method="ti", steps=3, learning_rate=0.05, batch_size=2, vectors=0,
                       resolution=64, prompts="object", seed=1, precision="auto", gradient_checkpointing=False,
                       training_options=TrainingOptions(checkpoint_every=0, text_encoders="CLIP only")).args[0]
    a, b = training()
    with a, b, ComfyHost(model, clip, vae, "flux") as host:
        start = init_vectors(host, "dog")
    assert torch.equal(concept.vectors["t5xxl"], start["t5xxl"].cpu())
    assert (concept.vectors["l"] - start["l"].cpu()).abs().max() > 1e-4
    assert concept.provenance["text_encoders"] == "CLIP only"
    with pytest.raises(ValueError, match="Learn Concept: text_encoders is 'T5 / LLM only' but this SDXL CLIP has no "
                                         "such encoder; choose family default"):
        run_node(LearnConcept, model=tc.tiny_model("sdxl"), clip=tc.tiny_clip("sdxl"), vae=tc.tiny_vae(),
                 images=tc.tiny_images(), name="my_dog", init_word="dog", method="ti", steps=1, learning_rate=0.0,
                 batch_size=2, vectors=0, resolution=64, prompts="object", seed=1, precision="auto",
                 gradient_checkpointing=False, training_options=TrainingOptions(text_encoders="T5 / LLM only"))

"""The host adapter on ComfyUI's real CLIP, UNet and VAE classes (tiny sizes)."""

import pytest
import torch
from comfy_tier import require_comfyui

tc = require_comfyui()

from concept_forge.nodes.apply import apply_concepts  # noqa: E402
from concept_forge.nodes.host import ComfyHost, detect_arch  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import init_vectors  # noqa: E402
from concept_forge.trainers.methods.ti import TextualInversion  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402

ARCHS = ["sd1", "sd2", "sdxl"]


def models(arch, v_prediction=False):
    return tc.tiny_model(arch, v_prediction), tc.tiny_clip(arch), tc.tiny_vae()


def training():
    return torch.inference_mode(False), torch.enable_grad()


def test_architecture_comes_from_clip_and_model_and_must_agree():
    assert detect_arch(tc.tiny_model("sdxl"), tc.tiny_clip("sdxl"), "Learn Concept") == "sdxl"
    with pytest.raises(ValueError, match="Learn Concept: the CLIP is SD 1.x but the MODEL is SDXL; connect both"):
        detect_arch(tc.tiny_model("sdxl"), tc.tiny_clip("sd1"), "Learn Concept")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_conditioning_equals_stock_encoding_of_the_applied_concept(arch):
    model, clip, vae = models(arch)
    g = torch.Generator().manual_seed(0)
    vectors = {k: torch.randn(2, clip.cond_stage_model.__getattr__(f"clip_{k}").transformer.get_input_embeddings()
                              .weight.shape[1], generator=g) for k in ("l", "g", "h")
               if hasattr(clip.cond_stage_model, f"clip_{k}")}
    applied = apply_concepts(clip, [Concept("my_dog", "ti", arch, vectors)], "test")
    with torch.inference_mode():
        stock, stock_pooled = applied.encode_from_tokens(applied.tokenize("a photo of embedding:my_dog on the beach"),
                                                         return_pooled=True)
    a, b = torch.inference_mode(False), torch.enable_grad()
    with a, b, ComfyHost(model, clip, vae, arch) as host:
        cond = host.encode([host.prepare_prompt("a photo of {} on the beach", 2)], vectors)
    assert (cond.cross_attn - stock).abs().max() < 1e-6
    if arch == "sdxl":
        assert (cond.pooled - stock_pooled).abs().max() < 1e-6


def test_gradient_reaching_the_vector_matches_finite_differences():
    model, clip, vae = models("sd1")
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        latents = host.encode_images(tc.tiny_images(2))
        prompts = [host.prepare_prompt("a photo of a {}", 1)] * 2
        g = torch.Generator().manual_seed(1)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.tensor([250, 600])
        v = init_vectors(host, "dog")["l"].requires_grad_(True)

        def loss(vec):
            return host.loss(latents, host.encode(prompts, {"l": vec}), noise, timesteps).sum()

        loss(v).backward()
        for seed in range(3):
            d = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
            d /= d.norm()
            eps = 1e-3  # ~1% of the vector's norm: small against curvature, large against fp32 noise
            with torch.no_grad():
                numeric = (loss(v + eps * d) - loss(v - eps * d)) / (2 * eps)
            analytic = (v.grad * d).sum()
            assert abs(float(analytic - numeric)) <= 0.02 * abs(float(analytic)) + 1e-4


@pytest.mark.parametrize("arch, v_prediction", [("sd1", False), ("sd2", True), ("sdxl", False)])
def test_a_hundred_ti_steps_lower_the_heldout_loss(arch, v_prediction):
    # The tiny models' loss depends little on the prompt (SD2's v-prediction least: 0.006–0.047 of 0.7 after 100
    # steps, by seed), so one 50-step run's gain is within a change of torch's kernels of zero; three seeds' mean is not
    gains = []
    for seed in range(3):
        model, clip, vae = models(arch, v_prediction)
        with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, arch) as host:
            method = TextualInversion(init_vectors(host, "dog"))
            data = TrainingSet(tc.tiny_images(), list(OBJECT_TEMPLATES))
            # 0.02: TI's default at batch 4 (0.005 per sample)
            result = train(method, host, data, LoopOptions(steps=100, learning_rate=0.02, batch_size=4,
                                                           heldout_draws=32, seed=seed))
        gains.append(result.heldout_before - result.heldout_after)
    assert sum(gains) / len(gains) > 0.01, gains


def test_v_prediction_loss_is_the_mse_of_the_velocity():
    model, clip, vae = models("sd2", v_prediction=True)
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd2") as host:
        latents = host.encode_images(tc.tiny_images(2))
        cond = host.encode([host.prepare_prompt("a photo of a {}", 1)] * 2, init_vectors(host, "dog"))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        timesteps = torch.tensor([100, 800])
        ours = host.loss(latents, cond, noise, timesteps)
        # the velocity target straight from the UNet output: x0 = c_skip·x − c_out·v
        sampling, base = host.model.model.model_sampling, host.model.model
        sigma = sampling.sigma(timesteps.float()).view(-1, 1, 1, 1)
        noisy = latents + sigma * noise
        raw = base.diffusion_model(sampling.calculate_input(sigma, noisy), sampling.timestep(sigma.flatten()).float(),
                                   context=cond.cross_attn)
        c_skip, c_out = 1 / (sigma ** 2 + 1), sigma / (sigma ** 2 + 1) ** 0.5
        target = (c_skip * noisy - latents) / c_out
        expected = ((raw - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_training_leaves_the_users_clip_and_model_untouched():
    model, clip, vae = models("sd1")
    prompt = clip.tokenize("a photo of a dog")
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0])
    with torch.inference_mode():
        cond_before = clip.encode_from_tokens(prompt)
        out_before = model.model.apply_model(x, sigma, c_crossattn=cond_before)
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = TextualInversion(init_vectors(host, "dog"))
        train(method, host, TrainingSet(tc.tiny_images(2), ["a {}"]), LoopOptions(steps=3, learning_rate=0.1))
    with torch.inference_mode():
        import comfy.model_management as mm
        mm.load_models_gpu([model])
        cond_after = clip.encode_from_tokens(prompt)
        out_after = model.model.apply_model(x, sigma, c_crossattn=cond_after)
    assert torch.equal(cond_before, cond_after) and torch.equal(out_before, out_after)
    layer = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0]
    assert getattr(layer.forward, "__func__", None) is type(layer).forward  # the out-of-place patch is gone
    assert all(not getattr(m, "weight_function", []) for m in model.model.modules())


def vector_gradient(**host_options):
    model, clip, vae = models("sd1")
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1", **host_options) as host:
        latents = host.encode_images(tc.tiny_images(2))
        v = init_vectors(host, "dog")["l"].requires_grad_(True)
        cond = host.encode([host.prepare_prompt("a photo of a {}", 1)] * 2, {"l": v})
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
        loss = host.loss(latents, cond, noise, torch.tensor([300, 700])).sum()
        loss.backward()
    return loss.item(), v.grad


def test_gradient_checkpointing_recomputes_the_same_gradient():
    plain_loss, plain_grad = vector_gradient()
    checkpointed_loss, checkpointed_grad = vector_gradient(gradient_checkpointing=True)
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)
    assert torch.allclose(checkpointed_grad, plain_grad, atol=1e-6)


def saved_activation_bytes(**host_options):
    """Bytes autograd keeps for the backward pass of one loss."""
    model, clip, vae = models("sd1")
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1", **host_options) as host:
        latents = host.encode_images(tc.tiny_images(2))
        v = init_vectors(host, "dog")["l"].requires_grad_(True)
        cond = host.encode([host.prepare_prompt("a photo of a {}", 1)] * 2, {"l": v})
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            host.loss(latents, cond, noise, torch.tensor([300, 700])).sum()
    return sum(saved)


def test_gradient_checkpointing_keeps_fewer_activations():
    plain, checkpointed = saved_activation_bytes(), saved_activation_bytes(gradient_checkpointing=True)
    assert checkpointed < 0.3 * plain


def test_bf16_precision_trains_close_to_fp32():
    fp32_loss, fp32_grad = vector_gradient()
    bf16_loss, bf16_grad = vector_gradient(precision="bf16")
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(bf16_grad.flatten(), fp32_grad.flatten(), dim=0)
    assert cosine > 0.9


def test_sdxl_adm_vector_equals_comfyuis_own_and_stays_on_the_device():
    model, clip, vae = models("sdxl")
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sdxl") as host:
        pooled = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
        ours = host.denoiser._adm(pooled, 64, 96)
        stock = host.model.model.encode_adm(pooled_output=pooled, width=96, height=64, crop_w=0, crop_h=0,
                                            target_width=96, target_height=64)
    assert torch.equal(ours, stock) and ours.device == pooled.device

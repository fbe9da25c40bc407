"""The tuning encoder through ComfyUI: identity at zero, tuning lowers the loss, the exported LoRA reproduces it."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node, ui_text

tc = require_comfyui()

import folder_paths  # noqa: E402
from concept_forge.nodes.apply import apply_concepts  # noqa: E402
from concept_forge.nodes.files import SaveConcept  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402
from concept_forge.nodes.tuning import FEATURE_TIMESTEP, TuningEncoderNode, model_with_offsets  # noqa: E402
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train  # noqa: E402
from concept_forge.trainers.methods import tuning_encoder as tuning  # noqa: E402
from concept_forge.trainers.templates import OBJECT_TEMPLATES  # noqa: E402
from concept_forge.trainers.tuning_encoder import (  # noqa: E402
    EncoderConfig,
    TuningEncoder,
    save_encoder,
    signature_image,
    vision_metadata,
)


def unet_output(model, cond, seed=0):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        import comfy.model_management as mm
        mm.load_models_gpu([model])
        return model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond)


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text))


def untrained(arch="sd1"):
    model, clip, vae = tc.tiny_model(arch), tc.tiny_clip(arch), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, arch) as host:
        concept = tuning.build(host, "dog", 0, tuning.Options(), seed=0).to_concept("pup", arch, {})
    return model, clip, concept


def test_zero_offsets_and_the_class_word_leave_model_and_clip_exactly_as_they_were():
    model, clip, concept = untrained()
    cond = encode(clip, "a photo of a dog")
    assert torch.equal(encode(apply_concepts(clip, [concept], "test"), "a photo of a embedding:pup"), cond)
    assert torch.equal(unet_output(model_with_offsets(model, concept), cond), unet_output(model, cond))
    # (up, down, alpha) × q/k/v/out × (attn1, attn2) × the tiny UNet's 7 transformer blocks
    assert len(concept.tensors) == 3 * 4 * 2 * 7


def test_twelve_tuning_steps_lower_the_heldout_loss():
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        method = tuning.build(host, "dog", 0, tuning.Options(), seed=0)
        result = train(method, host, TrainingSet(tc.tiny_images(1), list(OBJECT_TEMPLATES)),
                       LoopOptions(steps=12, learning_rate=3e-3, batch_size=1, heldout_draws=16))
    assert result.heldout_after < result.heldout_before


def tuning_inputs(**overrides):
    inputs = dict(model=tc.tiny_model("sd1"), clip=tc.tiny_clip("sd1"), vae=tc.tiny_vae(), image=tc.tiny_images(1),
                  name="pup", class_word="dog", encoder="none", tuning_steps=3, learning_rate=0.0,
                  targets="attention q/k/v/out", rank=2, blend=1.0, contrastive=0.01, resolution=64, seed=0)
    return {**inputs, **overrides}


def test_the_exported_lora_loaded_by_the_stock_loader_reproduces_the_nodes_model(model_folders):
    import nodes

    loras = model_folders / "loras"
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], folder_paths.supported_pt_extensions)
    inputs = tuning_inputs()
    out = run_node(TuningEncoderNode, **inputs)
    tuned_model, tuned_clip, concept, _ = out.args
    assert "No encoder weights: started from the class word 'dog'" in ui_text(out)
    # without weights, the summary and the encoder's tooltip say plainly what the node then is and what it needs
    assert "a plain LoRA + embedding tuner, which needs up to 100 steps (fewer were not measured), not 12" \
        in ui_text(out)
    encoder_input = next(i for i in TuningEncoderNode.define_schema().inputs if i.id == "encoder")
    assert "a plain LoRA + embedding tuner, which needs up to 100 steps (fewer were not measured), not 12" \
        in encoder_input.tooltip
    saved = run_node(SaveConcept, concept=concept, name="", overwrite=False, export_stock_files=True)
    assert "loras/pup.safetensors (Load LoRA)" in ui_text(saved)
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        stock_model, _ = nodes.LoraLoader().load_lora(inputs["model"], inputs["clip"], "pup.safetensors", 1.0, 0.0)
    cond = encode(tuned_clip, "a photo of embedding:pup")
    ours, stock = unet_output(tuned_model, cond), unet_output(stock_model, cond)
    assert (ours - stock).abs().max() < 1e-4 and (ours - unet_output(inputs["model"], cond)).abs().max() > 1e-6
    stock_clip = tc.tiny_clip("sd1", embedding_directory=str(model_folders / "embeddings"))
    assert torch.allclose(encode(stock_clip, "a photo of embedding:pup"), cond, atol=1e-5)


def record(concept):
    return tuple(concept.provenance[k] for k in ("batch_size", "gradient_accumulation", "learning_rate"))


def test_samples_per_step_are_passes_over_the_images_at_one_rate_per_step():
    one = run_node(TuningEncoderNode, **tuning_inputs(tuning_steps=2)).args[2]
    three = run_node(TuningEncoderNode, **tuning_inputs(tuning_steps=2, batch_size=3)).args[2]
    assert record(one) == (1, 1, 1e-3)    # 0: one sample per image
    assert record(three) == (1, 3, 1e-3)  # one image: three passes of one sample, the memory of one, the same rate
    assert not torch.equal(one.vectors["l"], three.vectors["l"])
    captioned = run_node(TuningEncoderNode, **tuning_inputs(tuning_steps=1, captions="a photo of {} on grass")).args[2]
    assert record(captioned)[:2] == (1, 8) and captioned.provenance["prompts"] == "captions"
    pair = run_node(TuningEncoderNode, **tuning_inputs(tuning_steps=1, image=tc.tiny_images(2), batch_size=3)).args[2]
    assert record(pair)[:2] == (2, 2)     # whole passes over the two images: 4 samples


def test_the_new_inputs_are_checked_before_the_run_and_may_be_linked():
    check = TuningEncoderNode.validate_inputs
    assert check(batch_size=65) == "Tuning Encoder: batch_size is 65, outside its range 0 to 64."
    assert check(captions=None, batch_size=None, name=None, class_word=None) is True  # linked: known at run time
    assert check(name="pup", captions="a photo of a dog") == (
        "Tuning Encoder: captions: line 1 ('a photo of a dog') mentions neither {} nor 'pup', so the concept would "
        "learn nothing from it.")
    assert check(name="pup", captions="a photo of pup\n\na {} on grass") is True


def test_an_encoder_predicts_the_start_and_a_mismatched_one_is_refused(model_folders, tmp_path):
    vision = tc.tiny_clip_vision(str(tmp_path))
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    training = torch.inference_mode(False), torch.enable_grad()
    with training[0], training[1], ComfyHost(model, clip, vae, "sd1", clip_vision=vision) as host:
        latent = host.encode_images(tc.tiny_images(1))
        unet = host.unet_features(latent, torch.randn(latent.shape), torch.tensor([FEATURE_TIMESTEP]))
        features = host.image_features(tc.tiny_images(1))
        signed = vision_metadata("tiny_vision.safetensors", host.image_features(signature_image()))
        config = EncoderConfig(features.shape[-1], unet.shape[-1], {"l": 32}, host.unet_targets("attention q/k/v"),
                               rank=2, hidden=16)
    encoder = TuningEncoder(config, seed=1)
    with torch.no_grad():
        for head in [*encoder.embedding_heads.values(), *encoder.up_heads, *encoder.down_heads]:
            head.weight.normal_(0, 0.5)
    folder = model_folders / "concept_encoders"
    save_encoder(encoder, folder / "tiny.safetensors", {"checkpoint": "tiny_sd1.safetensors", **signed})
    (folder / "torn.safetensors").write_bytes((folder / "tiny.safetensors").read_bytes()[:200])
    folder_paths.filename_list_cache.clear()
    inputs = tuning_inputs(model=model, clip=clip, vae=vae, encoder="tiny.safetensors", targets="attention q/k/v",
                           clip_vision=vision)
    out = run_node(TuningEncoderNode, **{**inputs, "tuning_steps": 2})
    assert "Started from the encoder tiny.safetensors." in ui_text(out)
    assert out.args[2].provenance["base_learning_rate"] == 1e-2  # the default from encoder weights (0.001 without)
    prediction = run_node(TuningEncoderNode, **{**inputs, "tuning_steps": 0})  # the prediction as it is
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    class_word = table[clip.tokenize("dog")["l"][0][1][0]]
    assert "No training step" in ui_text(prediction)
    assert (prediction.args[2].vectors["l"][0] - class_word.float()).abs().max() > 1e-3  # the heads moved it
    assert not torch.equal(prediction.args[2].vectors["l"], out.args[2].vectors["l"])   # tuning moved it on
    with pytest.raises(ValueError, match="^Tuning Encoder: the encoder tiny.safetensors was made for another model: 42 "
                                         "LoRA targets \\(the model has 56 of this kind\\). It was pretrained on "
                                         "tiny_sd1.safetensors."):
        run_node(TuningEncoderNode, **tuning_inputs(encoder="tiny.safetensors", clip_vision=vision))
    with pytest.raises(ValueError, match="connect a CLIP Vision Loader"):
        run_node(TuningEncoderNode, **tuning_inputs(encoder="tiny.safetensors"))
    another_vision = tc.tiny_clip_vision(str(tmp_path), seed=4)  # as wide as the first: only the signature tells
    with pytest.raises(ValueError, match="^Tuning Encoder: the encoder tiny.safetensors was made for another model: "
                                         "the CLIP vision model wired to clip_vision is not the one it was pretrained "
                                         "with, tiny_vision.safetensors. It was pretrained on tiny_sd1"):
        run_node(TuningEncoderNode, **{**inputs, "clip_vision": another_vision})
    with pytest.raises(ValueError, match="^Tuning Encoder: torn.safetensors is not a usable Concept Forge tuning "
                                         "encoder: .* Choose another encoder, or none.$"):
        run_node(TuningEncoderNode, **{**inputs, "encoder": "torn.safetensors"})


# -- the dual path (DATE, docs/METHODS.md §6.2): per attention branch α·soft + (1 − α)·hard --------------------------
PROMPT = "a photo of {} on the beach"


def dual_path_setup(host, soft=True):
    """Seeded rank-2 offsets on every attention projection (installed when `soft`), a random soft embedding, the
    hard vectors (the word "dog") and fixed draws."""
    g = torch.Generator().manual_seed(0)
    table = host.vocabulary("l")
    hard = {"l": table[host.token_ids("l", "dog")].detach().float()}
    embedding = torch.nn.Parameter(torch.randn(1, table.shape[1], generator=g))
    targets = host.unet_targets("attention q/k/v/out")
    factors = [(torch.nn.Parameter(torch.randn(o, 2, generator=g) * 0.3),
                torch.nn.Parameter(torch.randn(2, i, generator=g) * 0.3)) for _, o, i in targets]
    if soft:
        host.wrap_unet_weights({key: f for (key, _, _), f in zip(targets, factors, strict=True)}, 1.0)
    draws = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    return embedding, factors, hard, draws


def dual_path_loss(alpha=None, soft=True, checkpointing=False):
    """The tiny SD 1.x loss of `dual_path_setup`'s prompt. `alpha` None: no dual path; `soft` False: neither offsets
    nor the soft embedding but the hard prompt itself (the unpatched model's loss on it). Returns the loss, the hard
    prompt's cross-attention tensor and the gradients of (embedding, first up, first down)."""
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.enable_grad():
        with ComfyHost(model, clip, vae, "sd1", gradient_checkpointing=checkpointing) as host:
            embedding, factors, hard, (latents, noise, timesteps) = dual_path_setup(host, soft)
            if alpha is not None:
                host.set_dual_path(alpha, lambda: hard)
            cond = host.encode([host.prepare_prompt(PROMPT, 1)], {"l": embedding} if soft else hard)
            loss = host.loss(latents, cond, noise, timesteps).sum()
            if loss.requires_grad:
                loss.backward()
            with torch.no_grad():
                hard_context = host.encode([host.prepare_prompt(PROMPT, 1)], hard).cross_attn
            grads = [embedding.grad, *factors[0]]
            grads[1:] = [p.grad for p in grads[1:]]
    return float(loss.detach()), hard_context, grads


def test_the_dual_path_at_alpha_one_changes_nothing():
    plain, _, plain_grads = dual_path_loss()
    same, _, same_grads = dual_path_loss(alpha=1.0)
    assert same == plain and all(torch.equal(a, b) for a, b in zip(same_grads, plain_grads, strict=True))


def test_the_dual_path_at_alpha_zero_is_the_unpatched_model_on_the_hard_prompt():
    hard_only, hard_context, grads = dual_path_loss(alpha=0.0)
    unpatched, unpatched_context, _ = dual_path_loss(soft=False)
    soft, _, _ = dual_path_loss()
    assert hard_only == pytest.approx(unpatched, rel=1e-6, abs=1e-7) and abs(soft - unpatched) > 1e-4
    assert torch.equal(hard_context, unpatched_context)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)  # the soft branch weighs nothing


def test_the_dual_path_blends_every_attention_branch_and_trains_the_soft_one():
    half, _, grads = dual_path_loss(alpha=0.5)
    soft, _, _ = dual_path_loss()
    hard, _, _ = dual_path_loss(soft=False)
    assert min(abs(half - soft), abs(half - hard)) > 1e-5
    assert all(g is not None and g.abs().max() > 0 for g in grads)  # the embedding, an up and a down
    checkpointed, _, checkpointed_grads = dual_path_loss(alpha=0.5, checkpointing=True)
    assert checkpointed == pytest.approx(half, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(checkpointed_grads, grads, strict=True))


def test_the_whole_output_blend_is_gone_and_flow_models_refuse_the_dual_path():
    from concept_forge.nodes.host.flow import FlowDiT

    assert not hasattr(ComfyHost, "set_reference")
    with pytest.raises(ValueError, match="Tuning Encoder: the dual path \\(blend < 1\\) runs on the UNet families"):
        FlowDiT.enable_dual_path(object.__new__(FlowDiT))
    model, clip, vae = tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae()
    with torch.inference_mode(False), torch.no_grad(), ComfyHost(model, clip, vae, "sd1") as host:
        embedding, _, hard, (latents, noise, timesteps) = dual_path_setup(host)
        prompt = [host.prepare_prompt(PROMPT, 1)]
        cond, hard_cond = host.encode(prompt, {"l": embedding}), host.encode(prompt, hard)
        noisy, sigma, soft = host.denoiser.predict(latents, cond, noise, timesteps)
        with host.denoiser.offsets.disabled():
            reference = host.denoiser.predict(latents, hard_cond, noise, timesteps)[2]
        output_blend = float(host.denoiser.loss(latents, noisy, sigma, 0.5 * soft + 0.5 * reference, noise))
        host.set_dual_path(0.5, lambda: hard)
        assert abs(float(host.loss(latents, cond, noise, timesteps)) - output_blend) > 1e-4 * output_blend
        with pytest.raises(ValueError, match="α \\(blend\\) must be within \\[0, 1\\], got 1.5"):
            host.set_dual_path(1.5, None)
        with pytest.raises(ValueError, match="needs the hard prompt's vectors"):
            host.set_dual_path(0.5, None)

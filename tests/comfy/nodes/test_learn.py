"""Learn Concept as ComfyUI runs it: values, errors, Cancel and the NaN guard."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node, ui_text

tc = require_comfyui()

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
from concept_forge.nodes.learn import LearnConcept  # noqa: E402
from concept_forge.trainers.files import read_concept  # noqa: E402


def learn_inputs(arch="sd1", **overrides):
    inputs = dict(model=tc.tiny_model(arch), clip=tc.tiny_clip(arch), vae=tc.tiny_vae(), images=tc.tiny_images(),
                  name="my_dog", init_word="dog", method="ti", steps=6, learning_rate=0.0, batch_size=2, vectors=0,
                  resolution=64, prompts="object", seed=1, precision="auto", gradient_checkpointing=False)
    inputs.update(overrides)
    return inputs


def slot_vectors(clip, text="a photo of embedding:my_dog"):
    tokens = clip.tokenize(text)
    return {k: torch.stack([t for t, _ in v[0] if torch.is_tensor(t)]) for k, v in tokens.items()}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_learn_concept_returns_a_concept_a_ready_clip_and_the_loss(model_folders, arch):
    inputs = learn_inputs(arch)
    out = run_node(LearnConcept, **inputs)
    concept, clip, loss, plot = out.args
    assert concept.method == "ti" and concept.arch == arch and concept.name == "my_dog"
    assert len(loss["loss"]) == 6 and all(v > 0 for v in loss["loss"])
    assert set(slot_vectors(clip)) == set(concept.vectors)
    for key, vectors in slot_vectors(clip).items():
        assert torch.equal(vectors, concept.vectors[key])
        init = inputs["clip"].cond_stage_model.__getattr__(f"clip_{key}").transformer.get_input_embeddings() \
            .weight[inputs["clip"].tokenize("dog")[key][0][1][0]]
        assert not torch.allclose(vectors[0], init.float())  # every encoder trained
    assert plot.shape == (1, 384, 768, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    assert out.ui["loss"] == loss["loss"]
    text = ui_text(out)
    assert "6 steps at learning rate 0.01 (0.005 per sample)" in text and "Held-out loss" in text
    assert concept.provenance["init_word"] == "dog" and concept.provenance["seed"] == 1
    saved = sorted(p.relative_to(model_folders) for p in model_folders.rglob("*.safetensors"))
    assert [str(p) for p in saved] == ["concepts/checkpoints/my_dog/my_dog.safetensors",
                                        "concepts/checkpoints/my_dog/training_state.safetensors"]
    assert not (model_folders / "embeddings" / "my_dog.safetensors").exists()  # only Save Concept writes there


def test_the_same_seed_learns_the_same_concept_and_another_seed_does_not(model_folders):
    a = run_node(LearnConcept, **learn_inputs(seed=3)).args[0]
    b = run_node(LearnConcept, **learn_inputs(seed=3)).args[0]
    c = run_node(LearnConcept, **learn_inputs(seed=4)).args[0]
    assert torch.equal(a.vectors["l"], b.vectors["l"]) and not torch.equal(a.vectors["l"], c.vectors["l"])


def test_a_multi_token_init_word_gives_one_vector_per_token(model_folders):
    concept = run_node(LearnConcept, **learn_inputs(init_word="teddy bear", steps=1)).args[0]
    assert concept.vectors["l"].shape == (2, 32)


@pytest.mark.parametrize("overrides, message", [
    (dict(images=torch.zeros(0, 64, 64, 3)), "Learn Concept: images: the batch is empty"),
    (dict(name="../dog"), "Learn Concept: '../dog' contains a path separator"),
    (dict(init_word="  "), "Learn Concept: init_word is empty"),
    (dict(prompts="captions"), "Learn Concept: captions: prompt mode is 'captions' but no captions were given"),
    (dict(model="sdxl"), "Learn Concept: the CLIP is SD 1.x but the MODEL is SDXL"),
    (dict(clip=None), "Learn Concept: the CLIP input is empty"),
    (dict(resolution=60), "Learn Concept: resolution: 60 must be a positive multiple of 8"),
])
def test_bad_input_gets_an_error_naming_the_node_and_the_fix(model_folders, overrides, message):
    if overrides.get("model") == "sdxl":
        overrides["model"] = tc.tiny_model("sdxl")
    with pytest.raises(ValueError) as info:
        run_node(LearnConcept, **learn_inputs(**overrides))
    assert message in str(info.value)


def test_validation_catches_widget_mistakes_before_the_run():
    assert "path separator" in LearnConcept.validate_inputs(name="a/b")
    assert "init_word is empty" in LearnConcept.validate_inputs(init_word="")
    assert "captions box is empty" in LearnConcept.validate_inputs(prompts="captions", captions=" ")
    assert LearnConcept.validate_inputs(name="ok_name", init_word="dog") is True


def test_captions_train_with_one_prompt_per_image(model_folders):
    captions = "a photo of my_dog\nmy_dog on grass\n{} asleep\na drawing of my_dog"
    concept = run_node(LearnConcept, **learn_inputs(prompts="captions", captions=captions, steps=2)).args[0]
    assert concept.provenance["prompts"] == "captions"


def test_cancel_stops_within_a_step_writes_nothing_and_the_next_run_works(model_folders):
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    inputs = learn_inputs(steps=50)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(LearnConcept, **inputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [1, 2, 3]
    assert not any(model_folders.rglob("*.safetensors"))  # no checkpoint was due yet (every 100 steps)
    concept = run_node(LearnConcept, **{**inputs, "steps": 2}).args[0]  # same CLIP/MODEL objects: still usable
    assert concept.is_finite()


def test_a_nan_loss_stops_names_the_step_and_keeps_the_last_finite_concept(model_folders, monkeypatch):
    from concept_forge.nodes.host import ComfyHost

    loss, calls = ComfyHost.loss, []

    def nan_from_the_fourth_step(self, *args, **kwargs):  # as fp16 overflow or a diverging rate would
        value = loss(self, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not the held-out loss
            calls.append(1)
        return value * float("nan") if len(calls) >= 4 else value

    monkeypatch.setattr(ComfyHost, "loss", nan_from_the_fourth_step)
    with pytest.raises(RuntimeError) as info:
        run_node(LearnConcept, **learn_inputs(steps=10))
    message = str(info.value)
    assert message.startswith("Learn Concept: the loss became nan at step 4 ")
    step = int(message.split("at step ")[1].split(" ")[0])
    assert f"recovered/my_dog-step{step - 1}.safetensors" in message and "lower learning rate" in message
    recovered = read_concept(model_folders / "concepts" / "recovered" / f"my_dog-step{step - 1}.safetensors")
    assert recovered.is_finite() and recovered.provenance["steps"] == step - 1


def test_a_cancelled_run_resumes_to_the_uninterrupted_result(model_folders):
    from concept_forge.nodes.training import TrainingOptions

    def interrupt_at(step):
        def hook(value, total, preview, prompt_id=None, node_id=None):
            if value == step:
                mm.interrupt_current_processing(True)
        return hook

    uninterrupted = run_node(LearnConcept, **learn_inputs(steps=12, name="full",
                                                          training_options=TrainingOptions(checkpoint_every=4))).args[0]
    comfy.utils.set_progress_bar_global_hook(interrupt_at(6))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(LearnConcept, **learn_inputs(steps=12, name="cut", training_options=TrainingOptions(
                checkpoint_every=4)))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    kept = read_concept(model_folders / "concepts" / "checkpoints" / "cut" / "cut.safetensors")
    assert kept.provenance["steps"] == 4  # cancelled at step 7: the step-4 checkpoint is what was kept
    resumed = run_node(LearnConcept, **learn_inputs(steps=12, name="cut", training_options=TrainingOptions(
        checkpoint_every=4, resume=True))).args[0]
    assert (resumed.vectors["l"] - uninterrupted.vectors["l"]).abs().max() < 1e-6


def test_resume_without_a_checkpoint_or_with_other_settings_says_so(model_folders):
    from concept_forge.nodes.training import TrainingOptions

    with pytest.raises(ValueError, match="Learn Concept: resume is on but there is no checkpoint at .*fresh"):
        run_node(LearnConcept, **learn_inputs(name="fresh", training_options=TrainingOptions(resume=True)))
    run_node(LearnConcept, **learn_inputs(steps=4, name="fresh", training_options=TrainingOptions(checkpoint_every=2)))
    with pytest.raises(ValueError, match="cannot resume 'fresh': .*seed: checkpoint 1, now 9.*turn resume off"):
        run_node(LearnConcept, **learn_inputs(steps=8, seed=9, name="fresh",
                                              training_options=TrainingOptions(resume=True)))


def test_previews_reach_the_progress_bar_every_n_steps(model_folders):
    previews = {}

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if preview is not None:
            previews[value] = preview

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        run_node(LearnConcept, **learn_inputs(steps=4, preview_every=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert sorted(previews) == [2, 4]
    kind, image, size = previews[2]
    assert kind == "JPEG" and image.size == (64, 64) and size == 512


def test_the_loss_history_is_kept_for_a_reloaded_page(model_folders):
    from concept_forge.nodes.progress import LOSS_HISTORY

    out = run_node(LearnConcept, **learn_inputs(steps=5))
    history = LOSS_HISTORY["7"]
    assert history["steps"] == [1, 2, 3, 4, 5] and history["losses"] == out.args[2]["loss"]
    assert history["running"] is False and history["total"] == 5


def test_a_full_disk_at_a_checkpoint_keeps_training_and_returns_the_concept(model_folders, monkeypatch):
    from concept_forge.trainers import atomic

    def disk_full(tensors, filename, metadata=None):
        raise atomic_error("Error while serializing: IoError(No space left on device)")

    atomic_error = type("SafetensorError", (Exception,), {})  # what safetensors raises: no OSError
    monkeypatch.setattr(atomic, "save_file", disk_full)
    from concept_forge.nodes.training import TrainingOptions

    out = run_node(LearnConcept, **learn_inputs(steps=4, training_options=TrainingOptions(checkpoint_every=2)))
    concept = out.args[0]
    assert concept.is_finite() and concept.provenance["steps"] == 4  # the run finished: nothing was lost
    assert not [p for p in model_folders.rglob("*") if p.is_file()]  # and no temporary file was left behind


def test_cancel_while_preparing_stops_before_the_first_step(model_folders, monkeypatch):
    from concept_forge.nodes.host import ComfyHost

    seen, encoded = [], []
    monkeypatch.setattr(ComfyHost, "encode_images", lambda self, images: encoded.append(1))
    mm.interrupt_current_processing(True)  # Cancel pressed while the images are still being prepared
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.utils.set_progress_bar_global_hook(lambda value, *a, **k: seen.append(value))
            run_node(LearnConcept, **learn_inputs(steps=50))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [] and encoded == []  # stopped before the VAE ran, not at the first step


def test_a_dataset_nodes_lists_train_one_concept_from_images_of_mixed_sizes_and_their_captions(model_folders):
    # what ComfyUI sends with is_input_list: every input a list; images and captions from a dataset node, one each
    scalars = {k: [v] for k, v in learn_inputs(steps=3, prompts="captions").items() if k != "images"}
    images = [tc.tiny_images(1, size=size, seed=i) for i, size in enumerate((64, 96, 48))]
    captions = ["a photo of my_dog on grass", "my_dog\nasleep", "{} in the snow"]
    concept = run_node(LearnConcept, **{**scalars, "images": images, "captions": captions}).args[0]
    assert concept.name == "my_dog" and concept.provenance["images"] == 3 and concept.provenance["steps"] == 3
    with pytest.raises(ValueError, match="captions: got 2 lines for 3 images"):
        run_node(LearnConcept, **{**scalars, "images": images, "captions": captions[:2]})

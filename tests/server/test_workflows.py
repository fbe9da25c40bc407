"""The pack in a real headless ComfyUI server: it loads, the shipped workflows run, and Cancel works."""

import json
import re

import pytest
from comfy_tier import require_comfyui

tc = require_comfyui()

from concept_forge.nodes.headless import demo_overrides  # noqa: E402
from concept_forge.trainers.files import read_concept  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from ui_workflow import FAMILY_WORKFLOWS, WORKFLOWS, api_prompt  # noqa: E402

# The workflows only need to run end to end here (the comfy tier tests what training learns): a few steps each.
PATH_ONLY = {"ConceptForgeLearnConcept": {"steps": 3}, "ConceptForgeTuningEncoder": {"tuning_steps": 2},
             "KSampler": {"steps": 2}}
NODE_IDS = {"ConceptForgeLearnConcept", "ConceptForgeTrainingOptions", "ConceptForgeSaveConcept",
            "ConceptForgeLoadConcept"}


def test_the_pack_loads_without_errors_under_one_category(server, object_info):
    assert NODE_IDS <= set(object_info)
    ours = {n for n in object_info if n.startswith("ConceptForge")}
    assert {object_info[n]["category"].split("/")[0] for n in ours} == {"concept_forge"}
    log = server.log()
    failures = [line for line in log.splitlines() if "Cannot import" in line or "FAILED" in line]
    assert not [line for line in failures if "concept_forge" in line]
    for node in ours:
        specs = [spec for section in ("required", "optional") for spec in object_info[node]["input"]
                 .get(section, {}).values()]
        assert all(len(spec) > 1 and spec[1].get("tooltip") for spec in specs), f"{node}: an input lacks a tooltip"


def test_every_node_has_a_help_page_and_appears_in_a_shipped_workflow_with_a_thumbnail(object_info):
    root = WORKFLOWS[0].parent.parent
    used = {node["type"] for path in WORKFLOWS for node in json.loads(path.read_text())["nodes"]}
    for node in (n for n in object_info if n.startswith("ConceptForge")):
        assert (root / "web" / "docs" / f"{node}.md").exists(), f"{node} has no help page"
        assert node in used, f"{node} is in no example workflow"
    assert all(path.with_suffix(".jpg").exists() for path in WORKFLOWS)


SERVER_WORKFLOWS = [p for p in WORKFLOWS if p not in FAMILY_WORKFLOWS]  # those on the stock demo checkpoint


@pytest.mark.parametrize("path", SERVER_WORKFLOWS, ids=[p.stem for p in SERVER_WORKFLOWS])
def test_example_workflow_runs(server, object_info, path):
    prompt = api_prompt(path, object_info, **PATH_ONLY)
    outcome, messages = server.run(prompt, f"the example workflow {path.name}")
    assert outcome == "execution_success", server.log()[-3000:]
    history = server.history(messages[-1]["data"]["prompt_id"])
    images = [image for output in history["outputs"].values() for image in output.get("images", [])]
    assert images and all((server.base / "output" / i["subfolder"] / i["filename"]).exists() for i in images)
    progress = [m for m in messages if m["type"] == "progress"]
    learn_nodes = [k for k, v in prompt.items() if v["class_type"] == "ConceptForgeLearnConcept"]
    for node_id in learn_nodes:
        steps = [m["data"]["value"] for m in progress if m["data"]["node"] == node_id]
        assert steps == list(range(1, prompt[node_id]["inputs"]["steps"] + 1))


def test_saved_concept_is_a_stock_embedding_a_new_graph_uses(server, object_info):
    with safe_open(str(server.base / "models" / "embeddings" / "my_dog.safetensors"), framework="pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {"emb_params": (1, 768)}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo_overrides({})
                                                                 ["CheckpointLoaderSimple"]["ckpt_name"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of embedding:my_dog"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
    }
    before = server.log()
    outcome, _ = server.run(prompt, "a stock graph prompting embedding:my_dog")
    assert outcome == "execution_success"
    assert "embedding:my_dog does not exist" not in server.log()[len(before):]


def test_interrupt_stops_training_within_two_steps_and_the_next_prompt_runs(server, object_info):
    path = next(p for p in WORKFLOWS if p.stem == "learn_concept_ti")
    prompt = api_prompt(path, object_info, ConceptForgeLearnConcept={"steps": 500, "name": "interrupted", "seed": 5},
                        ConceptForgeSaveConcept={"name": "interrupted"})
    state = {"sent_at": None, "after": 0}

    def on_message(message):
        if message["type"] != "progress" or prompt[message["data"]["node"]]["class_type"] != "ConceptForgeLearnConcept":
            return
        if state["sent_at"] is None and message["data"]["value"] >= 2:
            state["sent_at"] = message["data"]["value"]
            server.post("/interrupt")
        elif state["sent_at"] is not None:
            state["after"] += 1

    outcome, messages = server.run(prompt, "a 500-step run to interrupt", on_message)
    assert outcome == "execution_interrupted"
    assert state["sent_at"] is not None and state["after"] <= 2
    assert not (server.base / "models" / "embeddings" / "interrupted.safetensors").exists()
    again = api_prompt(path, object_info, ConceptForgeLearnConcept={"steps": 2, "name": "after_cancel", "seed": 6},
                       ConceptForgeSaveConcept={"name": "after_cancel"})
    outcome, _ = server.run(again, "a 2-step run after the interrupted one")
    assert outcome == "execution_success"
    assert (server.base / "models" / "embeddings" / "after_cancel.safetensors").exists()


def test_a_prompt_that_outlives_its_time_is_interrupted_and_reported_with_its_progress(server, object_info):
    path = next(p for p in WORKFLOWS if p.stem == "learn_concept_ti")
    prompt = api_prompt(path, object_info, ConceptForgeLearnConcept={"steps": 500, "name": "too_slow", "seed": 7},
                        ConceptForgeSaveConcept={"name": "too_slow"})
    with pytest.raises(pytest.fail.Exception) as failed:
        server.run(prompt, "a deliberately slow run", timeout=20)
    message = str(failed.value)
    assert message.startswith("a deliberately slow run: the prompt did not finish within 20 s and was interrupted")
    assert re.search(r"of its \d+ nodes had started; node \d+ \(ConceptForgeLearnConcept\) was running at step "
                     r"\d+/500", message), message
    queue = server.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"]  # the next test finds an idle server


def test_a_dataset_folder_trains_one_concept_not_one_per_image(server, object_info):
    if "LoadImageTextDataSetFromFolder" not in object_info:
        pytest.skip("this ComfyUI has no dataset nodes (they came after 0.3.64)")
    folder = server.base / "input" / "dog_set"
    folder.mkdir(exist_ok=True)
    for i, size in enumerate((64, 96, 48)):  # mixed sizes, one caption each
        Image.fromarray(tc.tiny_images(1, size=size, seed=i)[0].mul(255).byte().numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of my_set_dog, view {i}")
    loader = demo_overrides({})["CheckpointLoaderSimple"]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": loader},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "dog_set"}},
        "3": {"class_type": "ConceptForgeLearnConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "captions": ["2", 1],
            "name": "my_set_dog", "init_word": "dog", "method": "ti", "steps": 2, "learning_rate": 0.0,
            "batch_size": 2, "vectors": 0, "resolution": 64, "prompts": "captions", "seed": 0, "precision": "auto",
            "gradient_checkpointing": False}},
        "4": {"class_type": "ConceptForgeSaveConcept", "inputs": {"concept": ["3", 0], "name": "", "overwrite": True}},
    }
    outcome, messages = server.run(prompt, "Learn Concept on a dataset folder")
    assert outcome == "execution_success", server.log()[-3000:]
    steps = [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert steps == [1, 2]  # one run over all three images, not three runs
    concept = read_concept(server.base / "models" / "embeddings" / "my_set_dog.safetensors")
    assert concept.provenance["images"] == 3 and concept.provenance["prompts"] == "captions"

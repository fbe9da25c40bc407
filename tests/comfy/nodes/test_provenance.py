from comfy_tier import require_comfyui

require_comfyui()

from concept_forge.nodes.provenance import upstream_checkpoint  # noqa: E402


def test_the_checkpoint_is_traced_through_model_patch_nodes():
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/dreamshaper.safetensors"}},
        "9": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x"}},
        "7": {"class_type": "ConceptForgeLearnConcept", "inputs": {"model": ["9", 0]}},
    }
    assert upstream_checkpoint(prompt, "7") == "sd15/dreamshaper.safetensors"
    assert upstream_checkpoint(prompt, "4") is None
    assert upstream_checkpoint(None, "7") is None
    cyclic = {"1": {"inputs": {"model": ["2", 0]}}, "2": {"inputs": {"model": ["1", 0]}}}
    assert upstream_checkpoint(cyclic, "1") is None

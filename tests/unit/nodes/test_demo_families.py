"""Which flow family a workflow's demo needs, read from its CLIP loaders (no ComfyUI needed)."""

from concept_forge.nodes.demo_families import FAMILY_DEMO_FILES, demo_family, demo_file_overrides


def node(kind, **inputs):
    return {"class_type": kind, "inputs": inputs}


def test_the_family_comes_from_the_clip_loaders_and_a_linked_type_is_not_one():
    assert demo_family({"1": node("DualCLIPLoader", type="flux")}) == "flux"
    assert demo_family({"1": node("TripleCLIPLoader")}) == "sd3"
    assert demo_family({"1": node("CLIPLoader", type="lumina2")}) == "lumina2"
    assert demo_family({"1": node("CLIPLoader", type=["5", 0])}) is None  # a link from another node
    assert demo_family({"1": node("CheckpointLoaderSimple", ckpt_name="v1-5.safetensors")}) is None
    overrides = demo_file_overrides("flux")
    assert overrides["UNETLoader"] == {"unet_name": FAMILY_DEMO_FILES["flux"]}
    assert overrides["VAELoader"] == {"vae_name": "taef1"}

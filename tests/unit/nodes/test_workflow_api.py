"""UI-format workflows → API prompts, as the frontend converts them (no ComfyUI needed: the definitions are data)."""

import pytest
from concept_forge.nodes.workflow_api import is_api_prompt, widgets, workflow_to_prompt

DEFS = {
    "Loader": {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"], {})}},
    "LoadImage": {"required": {"image": (["x.png"], {"image_upload": True})}},
    "Sampler": {"required": {"model": ("MODEL", {}), "seed": ("INT", {"control_after_generate": True}),
                             "steps": ("INT", {"default": 20}), "text": ("STRING", {"forceInput": True})},
                "optional": {"denoise": ("FLOAT", {"default": 1.0})}},
    "Sink": {"required": {"model": ("MODEL", {}), "prefix": ("STRING", {})}},
}


def node(id, type, widgets_values=(), inputs=(), mode=0, outputs=()):
    return {"id": id, "type": type, "mode": mode, "widgets_values": list(widgets_values),
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs]}


def convert(nodes, links):
    return workflow_to_prompt({"nodes": nodes, "links": links}, DEFS.get)


def test_widget_values_skip_the_seed_control_and_the_upload_button():
    assert [(w.name, w.extra_values) for w in widgets(DEFS["Sampler"])] == [("seed", 1), ("steps", 0), ("denoise", 0)]
    assert [(w.name, w.extra_values) for w in widgets(DEFS["LoadImage"])] == [("image", 1)]
    prompt = convert([node(1, "Loader", ["b.safetensors"], outputs=["MODEL"]),
                      node(2, "Sampler", [7, "randomize", 30, 0.5], [("model", "MODEL", 10)])],
                     [[10, 1, 0, 2, 0, "MODEL"]])
    assert prompt["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert prompt["2"]["inputs"] == {"seed": 7, "steps": 30, "denoise": 0.5, "model": ["1", 0]}


def test_notes_are_dropped_and_reroutes_and_bypassed_nodes_pass_through():
    nodes = [node(1, "Loader", ["a.safetensors"], outputs=["MODEL"]),
             node(2, "Reroute", inputs=[("", "*", 10)], outputs=["MODEL"]),
             node(3, "Sampler", [1, "fixed", 5, 1.0], [("model", "MODEL", 11)], mode=4, outputs=["MODEL"]),
             node(4, "Sink", ["out"], [("model", "MODEL", 12)]),
             node(5, "MarkdownNote", ["hello"])]
    links = [[10, 1, 0, 2, 0, "MODEL"], [11, 2, 0, 3, 0, "MODEL"], [12, 3, 0, 4, 0, "MODEL"]]
    prompt = convert(nodes, links)
    assert sorted(prompt) == ["1", "4"]
    assert prompt["4"]["inputs"] == {"prefix": "out", "model": ["1", 0]}


def test_muted_nodes_and_their_links_are_left_out():
    nodes = [node(1, "Loader", ["a.safetensors"], mode=2, outputs=["MODEL"]),
             node(2, "Sink", ["out"], [("model", "MODEL", 10)])]
    assert convert(nodes, [[10, 1, 0, 2, 0, "MODEL"]]) == {
        "2": {"class_type": "Sink", "inputs": {"prefix": "out"}, "_meta": {"title": "Sink"}}}


def test_dict_widget_values_and_unknown_nodes():
    assert convert([{**node(1, "Loader"), "widgets_values": {"ckpt_name": "b.safetensors"}}],
                   [])["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    with pytest.raises(ValueError, match="node 1 is a 'Missing', which is not installed"):
        convert([node(1, "Missing")], [])


def test_api_prompts_are_recognised():
    assert is_api_prompt({"1": {"class_type": "Loader", "inputs": {}}})
    assert not is_api_prompt({"nodes": [], "links": []})


def test_overrides_merge_input_by_input_and_never_replace_links():
    from concept_forge.nodes.headless import apply_overrides, merge_overrides

    merged = merge_overrides({"Sampler": {"steps": 4, "seed": 1}}, {"Sampler": {"steps": 30}, "2": {"seed": 9}})
    assert merged == {"Sampler": {"steps": 30, "seed": 1}, "2": {"seed": 9}}
    prompt = {"2": {"class_type": "Sampler", "inputs": {"steps": 20, "seed": 0, "model": ["1", 0]}}}
    changed = []
    apply_overrides(prompt, {**merged, "Sampler": {**merged["Sampler"], "model": "x"}}, changed)
    assert prompt["2"]["inputs"] == {"steps": 30, "seed": 9, "model": ["1", 0]}
    assert len(changed) == 3

#!/usr/bin/env python3
"""Write example_workflows/*.json (ComfyUI's UI format) and their thumbnails from the graphs described below.

Widget values are laid out from each node's own input definitions, as the frontend saves them, so the files stay
right when a node gains an input. Needs ComfyUI: COMFYUI_PATH=/path/to/ComfyUI python tools/make_example_workflows.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
SIZES = {"MarkdownNote": (400, 260), "CLIPTextEncode": (400, 160), "LoadImage": (315, 314), "KSampler": (315, 262),
         "SaveImage": (315, 270), "ConceptForgeLearnConcept": (360, 0)}


class Graph:
    def __init__(self, node_classes: dict[str, Any]):
        self.classes = node_classes
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def note(self, text: str, pos: tuple[int, int], size: tuple[int, int] = SIZES["MarkdownNote"]) -> None:
        self.nodes.append({"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": list(pos), "size": list(size),
                           "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                           "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})

    def node(self, kind: str, pos: tuple[int, int], title: str | None = None, **values: Any) -> int:
        from concept_forge.nodes.workflow_api import widgets

        cls = self.classes[kind]
        types = cls.INPUT_TYPES()
        node_id = len(self.nodes) + 1
        inputs, widget_values = [], []
        spec = {name: s for section in ("required", "optional") for name, s in types.get(section, {}).items()}
        widget_list = widgets(types)
        widget_names = {w.name for w in widget_list}
        for name, s in spec.items():
            if name in widget_names:
                continue
            link = None
            if name in values:
                source, slot = values.pop(name)
                link = len(self.links) + 1
                source_type = self.nodes[source - 1]["outputs"][slot]["type"]
                self.links.append([link, source, slot, node_id, len(inputs), source_type])
                self.nodes[source - 1]["outputs"][slot]["links"].append(link)
            inputs.append({"name": name, "type": str(s[0]), "link": link})
        for w in widget_list:
            options = spec[w.name][1] if len(spec[w.name]) > 1 else {}
            choices = spec[w.name][0] if isinstance(spec[w.name][0], list) else options.get("options") or [None]
            default = options.get("default", (choices or [None])[0])
            widget_values.append(values.pop(w.name, default))
            widget_values += ["fixed" if options.get("control_after_generate") or w.name.endswith("seed") else
                              "image"][: w.extra_values]
        if values:
            raise ValueError(f"{kind}: unknown inputs {sorted(values)}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": str(n), "type": str(t), "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES, strict=True))]
        rows = len(inputs) + len(widget_values) + len(outputs)
        width, height = SIZES.get(kind, (320, 0))
        self.nodes.append({"id": node_id, "type": kind, "pos": list(pos),
                           "size": [width, height or 46 + 24 * rows], "flags": {}, "order": node_id,
                           "mode": 0, "inputs": inputs, "outputs": outputs,
                           "properties": {"Node name for S&R": kind}, "widgets_values": widget_values,
                           **({"title": title} if title else {})})
        return node_id

    def workflow(self) -> dict[str, Any]:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [20, 20]}},
                "version": 0.4}


def learn_concept_ti(g: Graph) -> None:
    g.note("## Learn a concept with Textual Inversion\n\n1. Pick your SD 1.5, SD 2.x or SDXL checkpoint.\n"
           "2. Load 3–5 photos of your subject (add Image Batch nodes for more).\n"
           "3. Set **name** and an **init_word** close to the subject.\n4. Queue. The loss shows on Learn Concept; "
           "Cancel stops it.\n\nThe prompt uses `embedding:my_dog`. Save Concept writes "
           "`models/embeddings/my_dog.safetensors`, usable in any workflow.", (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    images = [g.node("LoadImage", (450 + 340 * (i % 2), 20 + 350 * (i // 2)), image=f"my_dog_{i + 1}.png")
              for i in range(4)]
    first = g.node("ImageBatch", (1130, 40), image1=(images[0], 0), image2=(images[1], 0))
    second = g.node("ImageBatch", (1130, 190), image1=(images[2], 0), image2=(images[3], 0))
    batch = g.node("ImageBatch", (1130, 340), image1=(first, 0), image2=(second, 0))
    learn = g.node("ConceptForgeLearnConcept", (1480, 40), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2),
                   images=(batch, 0), name="my_dog", init_word="dog", method="ti", steps=400)
    g.node("ConceptForgeSaveConcept", (1480, 720), concept=(learn, 0))
    positive = g.node("CLIPTextEncode", (1880, 40), clip=(learn, 1), text="a photo of embedding:my_dog on the beach")
    negative = g.node("CLIPTextEncode", (1880, 240), clip=(learn, 1), text="blurry, low quality")
    latent = g.node("EmptyLatentImage", (1880, 440), width=512, height=512, batch_size=1)
    sampled = g.node("KSampler", (2320, 40), model=(ckpt, 0), positive=(positive, 0), negative=(negative, 0),
                     latent_image=(latent, 0), seed=42, steps=25, cfg=7.0, scheduler="normal")
    decoded = g.node("VAEDecode", (2680, 40), samples=(sampled, 0), vae=(ckpt, 2))
    g.node("SaveImage", (2680, 160), images=(decoded, 0), filename_prefix="concept_forge/my_dog")


WORKFLOWS = {"learn_concept_ti": learn_concept_ti}


def thumbnail(workflow: dict[str, Any], path: Path) -> None:
    """A schematic of the graph: node boxes with their titles, links as lines."""
    from PIL import Image, ImageDraw

    boxes = {n["id"]: (*n["pos"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in workflow["nodes"]}
    x0, y0 = min(b[0] for b in boxes.values()) - 20, min(b[1] for b in boxes.values()) - 20
    x1, y1 = max(b[2] for b in boxes.values()) + 20, max(b[3] for b in boxes.values()) + 20
    scale = 800 / (x1 - x0)
    image = Image.new("RGB", (800, max(200, int((y1 - y0) * scale))), "#202020")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[int, int]:
        return int((x - x0) * scale), int((y - y0) * scale)

    for _, src, _, dst, _, _ in workflow["links"]:
        a, b = boxes[src], boxes[dst]
        draw.line([at(a[2], a[1] + 40), at(b[0], b[1] + 40)], fill="#8fb3ff", width=2)
    for node in workflow["nodes"]:
        b = boxes[node["id"]]
        concept = node["type"].startswith("ConceptForge")
        draw.rounded_rectangle([at(b[0], b[1]), at(b[2], b[3])], radius=6, fill="#3a2d5c" if concept else "#353535",
                               outline="#b197fc" if concept else "#555555", width=2)
        draw.text(at(b[0] + 10, b[1] + 8), node.get("title") or node["type"].replace("ConceptForge", ""),
                  fill="#ffffff")
    image.save(path, quality=90)


def main() -> None:
    comfyui = os.environ.get("COMFYUI_PATH") or sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401 — as ComfyUI's main.py, before nodes.py shadows `utils`

    import nodes

    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = package
    spec.loader.exec_module(package)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(str(ROOT)))
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        graph = Graph(nodes.NODE_CLASS_MAPPINGS)
        build(graph)
        workflow = graph.workflow()
        (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        thumbnail(workflow, OUT / f"{name}.jpg")
        print(f"wrote {OUT / name}.json and .jpg")


if __name__ == "__main__":
    main()

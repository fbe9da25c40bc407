#!/usr/bin/env python3
"""Write example_workflows/*.json (ComfyUI's UI format) from the graphs described below; their thumbnails are
rendered by tools/make_thumbnails.py.

Widget values are laid out from each node's own input definitions, as the frontend saves them, so the files stay
right when a node gains an input. Needs ComfyUI: COMFYUI_PATH=/path/to/ComfyUI python tools/make_example_workflows.py
"""

from __future__ import annotations

import asyncio
import functools
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

    def node(self, kind: str, pos: tuple[int, int], title: str | None = None, size: tuple[int, int] | None = None,
             **values: Any) -> int:
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
        width, height = size or SIZES.get(kind, (320, 0))
        # the pack's web extension adds a report line to its nodes, and a loss chart to Learn Concept
        extra = 240 if kind == "ConceptForgeLearnConcept" else 40 if kind.startswith("ConceptForge") else 0
        self.nodes.append({"id": node_id, "type": kind, "pos": list(pos),
                           "size": [width, (height or 46 + 24 * rows) + extra], "flags": {}, "order": node_id,
                           "mode": 0, "inputs": inputs, "outputs": outputs,
                           "properties": {"Node name for S&R": kind}, "widgets_values": widget_values,
                           **({"title": title} if title else {})})
        return node_id

    def workflow(self) -> dict[str, Any]:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [20, 20]}},
                "version": 0.4}


def image_batch(g: Graph, names: list[str], x: int, y: int) -> int:
    """Load Image nodes for `names`, two per row, joined into one batch by a column of Image Batch nodes."""
    loaded = [g.node("LoadImage", (x + 340 * (i % 2), y + 350 * (i // 2)), image=name) for i, name in enumerate(names)]
    row = 0
    while len(loaded) > 1:
        merged = []
        for i in range(0, len(loaded) - 1, 2):
            merged.append(g.node("ImageBatch", (x + 680, y + 20 + 150 * row), image1=(loaded[i], 0),
                                 image2=(loaded[i + 1], 0)))
            row += 1
        loaded = merged + loaded[len(loaded) - len(loaded) % 2:]
    return loaded[0]


def generate(g: Graph, ckpt: int, clip: tuple[int, int], text: str, x: int, y: int, prefix: str,
             model: tuple[int, int] | None = None, positive: tuple[int, int] | None = None) -> None:
    """Text → image with the stock nodes: two prompts (or the negative one, given the `positive` conditioning), an
    empty latent, KSampler, decode and save."""
    positive = positive or (g.node("CLIPTextEncode", (x, y), clip=clip, text=text), 0)
    negative = g.node("CLIPTextEncode", (x, y + 200), clip=clip, text="blurry, low quality")
    latent = g.node("EmptyLatentImage", (x, y + 400), width=512, height=512, batch_size=1)
    sampled = g.node("KSampler", (x + 440, y), model=model or (ckpt, 0), positive=positive,
                     negative=(negative, 0), latent_image=(latent, 0), seed=42, steps=25, cfg=7.0, scheduler="normal")
    decoded = g.node("VAEDecode", (x + 800, y), samples=(sampled, 0), vae=(ckpt, 2))
    g.node("SaveImage", (x + 800, y + 120), images=(decoded, 0), filename_prefix=prefix)


def learn_and_generate(g: Graph, method: str, name: str, note: str, options: str | None = None,
                       training_options: bool = False) -> None:
    g.note(note, (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    batch = image_batch(g, [f"my_dog_{i}.png" for i in range(1, 5)], 450, 20)
    extra = {}
    if options:
        extra["method_options"] = (g.node(options, (1130, 560)), 0)
    if training_options:
        extra["training_options"] = (g.node("ConceptForgeTrainingOptions", (1130, 560)), 0)
    learn = g.node("ConceptForgeLearnConcept", (1480, 40), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2),
                   images=(batch, 0), name=name, init_word="dog", method=method, steps=400, **extra)
    g.node("ConceptForgeSaveConcept", (1480, 1120), concept=(learn, 0))  # below Learn Concept's chart and report
    generate(g, ckpt, (learn, 1), f"a photo of embedding:{name} on the beach", 1880, 40, f"concept_forge/{name}")


TI_NOTE = """## Learn a concept with Textual Inversion

1. Pick your SD 1.5, SD 2.x or SDXL checkpoint.
2. Load 3–5 photos of your subject (add Image Batch nodes for more).
3. Set **name** and an **init_word** close to the subject.
4. Queue. The loss shows on Learn Concept; Cancel stops it.

The prompt uses `embedding:my_dog`. Save Concept writes `models/embeddings/my_dog.safetensors`, usable in any
workflow."""

DTI_NOTE = """## Directional Textual Inversion

DTI keeps every learned vector at the length of the model's own words and learns only its direction, so the
concept does not drown the rest of the prompt. 400 steps at batch 4 is the paper's recipe.

DTI Options sets the prior strength κ and the length m*. Save Concept writes a stock embedding
(`embedding:my_dog_dti`); Apply DTI Token can also put any older embedding on the same length."""


def learn_concept_ti(g: Graph) -> None:
    learn_and_generate(g, "ti", "my_dog", TI_NOTE, training_options=True)


BATEX_NOTE = """## BaTex

BaTex learns the concept as a weighted sum of the M vocabulary embeddings closest to the init word: only the M
weights train, so the concept stays among words the model knows. The paper reports better text alignment and
faster convergence than TI; 1000 steps at 0.0005 × batch.

BaTex Options sets M, the ranking and an optional target rank. Save Concept writes a stock embedding
(`embedding:my_dog_batex`) that also keeps the basis and weights; Concept Info lists the strongest basis words."""


def learn_concept_batex(g: Graph) -> None:
    learn_and_generate(g, "batex", "my_dog_batex", BATEX_NOTE, options="ConceptForgeBaTexOptions")


def learn_concept_dti(g: Graph) -> None:
    learn_and_generate(g, "dti", "my_dog_dti", DTI_NOTE, options="ConceptForgeDTIOptions")


CATVERSION_NOTE = """## CatVersion

CatVersion learns residual keys and values in the last layers of the text encoder instead of a new word. Its
prompt is the class word itself: write **init_word** as the class ("teddy bear"), and prompt with it
("a teddy bear on the beach").

CatVersion Residual applies a concept to any CLIP (chain two to combine concepts). Prompts that do not mention
the class word — the negative prompt here — stay as they were. Save Concept writes `models/concepts/`."""


def learn_concept_catversion(g: Graph) -> None:
    g.note(CATVERSION_NOTE, (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    batch = image_batch(g, [f"my_teddy_{i}.png" for i in range(1, 5)], 450, 20)
    options = g.node("ConceptForgeCatVersionOptions", (1130, 560))
    learn = g.node("ConceptForgeLearnConcept", (1480, 40), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2),
                   images=(batch, 0), name="my_teddy", init_word="teddy bear", method="catversion", steps=1000,
                   method_options=(options, 0))
    g.node("ConceptForgeSaveConcept", (1480, 1120), concept=(learn, 0))  # below Learn Concept's chart and report
    patched = g.node("ConceptForgeCatVersionResidual", (1880, 660), clip=(ckpt, 1), concept=(learn, 0))
    generate(g, ckpt, (patched, 0), "a photo of a teddy bear on the beach", 1880, 40, "concept_forge/my_teddy")


TOOLS_NOTE = """## Use a concept you already have

Load Concept reads any embedding — yours, A1111 `.pt`, kohya, diffusers, SDXL `clip_l`/`clip_g` — or a Concept
Forge file. Concept Info tells what it is: method, norms against the checkpoint's vocabulary, nearest words, how
it was made.

Apply DTI Token makes `embedding:<name>` mean it on this CLIP. With magnitude *in-distribution*, an over-long TI
embedding is put back at the length of the model's own words (the DTI paper's fix)."""


def concept_tools(g: Graph) -> None:
    g.note(TOOLS_NOTE, (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    loaded = g.node("ConceptForgeLoadConcept", (450, 20), file="embeddings/my_dog.safetensors")
    g.node("ConceptForgeConceptInfo", (450, 200), concept=(loaded, 0), clip=(ckpt, 1), size=(420, 300))
    clip = g.node("ConceptForgeApplyDTIToken", (900, 20), clip=(ckpt, 1), concept=(loaded, 0),
                  magnitude="in-distribution")
    generate(g, ckpt, (clip, 0), "a photo of embedding:my_dog on the beach", 1260, 20, "concept_forge/my_dog_loaded")


ONE_IMAGE_NOTE = """## One image, a dozen steps

Tuning Encoder learns a concept from a single photo: an encoder predicts a token and LoRA offsets for the UNet,
then 12 tuning steps refine them. Without encoder weights (encoder: none) it starts from the class word and zero
offsets — a fast LoRA + embedding tuner. With weights pretrained by `tools/pretrain_encoder.py` (in
models/concept_encoders), connect a CLIP Vision Loader to clip_vision. Say what else the photo shows in
captions ('a photo of {} on a sofa'): the tuning then leaves that to the prompt and takes 8 samples of the photo a
step, which in this pack's toy world gave the most likeness and obedience (README).

Use both outputs: the MODEL carries the offsets, the CLIP the token. Save Concept with export_stock_files also
writes a stock LoRA and embedding.

The lower row generates through Tuning Encoder Dual Path: the checkpoint's own MODEL, the concept and the prompt,
blended in every attention block with the prompt's nearest real words (blend 1 = the row above). Lower blend obeys
the rest of the prompt more and resembles the concept less."""


def one_image_personalization(g: Graph) -> None:
    g.note(ONE_IMAGE_NOTE, (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    image = g.node("LoadImage", (450, 20), image="my_dog.png")
    tuned = g.node("ConceptForgeTuningEncoder", (820, 20), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2),
                   image=(image, 0), name="my_dog_1shot", class_word="dog")
    g.node("ConceptForgeSaveConcept", (820, 720), concept=(tuned, 2), export_stock_files=True)
    text = "a photo of embedding:my_dog_1shot on the beach"
    generate(g, ckpt, (tuned, 1), text, 1220, 20, "concept_forge/my_dog_1shot", model=(tuned, 0))
    dual = g.node("ConceptForgeTuningEncoderDualPath", (820, 1000), model=(ckpt, 0), clip=(ckpt, 1),
                  concept=(tuned, 2), text=text, blend=0.8)
    generate(g, ckpt, (dual, 2), text, 1220, 800, "concept_forge/my_dog_1shot_dual_path", model=(dual, 0),
             positive=(dual, 1))


def concept_slerp(g: Graph) -> None:
    g.note("## Blend two concepts\n\nTwo DTI concepts are learned, then Concept Slerp turns one into the other "
           "along the sphere: t = 0, 0.25, 0.5, 0.75 and 1 give the row of images, all with the same seed.\n\n"
           "Load Concept works as input too: any two concepts of one checkpoint type with the same number of "
           "vectors.", (20, 20))
    ckpt = g.node("CheckpointLoaderSimple", (20, 310), ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    concepts = []
    for row, (name, word) in enumerate((("my_dog", "dog"), ("my_cat", "cat"))):
        y = 20 + 960 * row
        batch = image_batch(g, [f"{name}_{i}.png" for i in (1, 2)], 450, y)
        concepts.append(g.node("ConceptForgeLearnConcept", (1480, y), model=(ckpt, 0), clip=(ckpt, 1),
                               vae=(ckpt, 2), images=(batch, 0), name=name, init_word=word, method="dti", steps=400))
    negative = g.node("CLIPTextEncode", (1880, 1560), clip=(ckpt, 1), text="blurry, low quality")
    latent = g.node("EmptyLatentImage", (1880, 1760), width=512, height=512, batch_size=1)
    images = []
    for i, t in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        y = 20 + 300 * i
        name = f"blend_{int(t * 100)}"
        blend = g.node("ConceptForgeConceptSlerp", (1880, y), concept_a=(concepts[0], 0), concept_b=(concepts[1], 0),
                       t=t, name=name)
        clip = g.node("ConceptForgeApplyDTIToken", (2240, y), clip=(ckpt, 1), concept=(blend, 0))
        positive = g.node("CLIPTextEncode", (2600, y), clip=(clip, 0), text=f"a photo of embedding:{name}")
        sampled = g.node("KSampler", (3040, y), model=(ckpt, 0), positive=(positive, 0), negative=(negative, 0),
                         latent_image=(latent, 0), seed=42, steps=25, cfg=7.0, scheduler="normal")
        images.append(g.node("VAEDecode", (3400, y), samples=(sampled, 0), vae=(ckpt, 2)))
    row = images[0]
    for i, image in enumerate(images[1:]):
        row = g.node("ImageBatch", (3740, 20 + 150 * i), image1=(row, 0), image2=(image, 0))
    g.node("SaveImage", (4080, 20), images=(row, 0), filename_prefix="concept_forge/slerp_row")


FAMILY_NOTES = {
    "flux": """## Learn a concept on Flux.1

Flux.1 dev or schnell, loaded as its parts: the transformer, CLIP-L + T5-XXL, and its VAE. Learn Concept trains
a T5 vector (what conditions the image) and a CLIP-L vector (the pooled one) with Flux's own flow-matching loss at
guidance 3.5. Turn on gradient_checkpointing on a 24 GB card; Training Options' text_encoders = CLIP only saves
the backward pass through T5.

Save Concept writes `clip_l` + `t5xxl`: stock `embedding:my_dog` works in any Flux workflow. Sample at CFG 1
with Flux Guidance, as usual for dev.""",
    "sd3": """## Learn a concept on SD 3.5

SD 3.5 Large or Medium, loaded as its parts: the MMDiT, CLIP-L + CLIP-G + T5-XXL, and its VAE. Learn Concept
trains a vector for each of the three encoders with SD 3's own flow-matching loss (logit-normal times through the
model's shift). A checkpoint without T5 works too.

Save Concept writes `clip_l` + `clip_g` + `t5xxl`: stock `embedding:my_dog` works in any SD 3.5 workflow.""",
    "lumina2": """## Learn a concept on Lumina 2

Lumina Image 2.0, loaded as its parts: the NextDiT, Gemma-2-2B, and Flux's VAE. Learn Concept trains a Gemma
vector on the prompts CLIP Text Encode for Lumina2 sends (its system prompt first).

Stock ComfyUI resolves no `embedding:` for Gemma: use the concept through a CLIP that has it — Learn Concept's
own clip output, as here, or Load Concept → Apply DTI Token in any later workflow. Save Concept writes
`gemma2_2b`.""",
}
# each family as people load it: the model file, the text encoders' loader and files, the VAE, and the sampler
FAMILY_FILES = {"flux": ("flux1-dev.safetensors", ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors",
                                                                      "clip_name2": "t5xxl_fp16.safetensors",
                                                                      "type": "flux"}), "ae.safetensors"),
                "sd3": ("sd3.5_medium.safetensors", ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors",
                                                                          "clip_name2": "clip_g.safetensors",
                                                                          "clip_name3": "t5xxl_fp16.safetensors"}),
                        "sd35_vae.safetensors"),
                "lumina2": ("lumina_2_model_bf16.safetensors",
                            ("CLIPLoader", {"clip_name": "gemma_2_2b_fp16.safetensors", "type": "lumina2"}),
                            "ae.safetensors")}
SAMPLING = {"flux": dict(cfg=1.0, sampler_name="euler", scheduler="simple", steps=20),
            "sd3": dict(cfg=4.5, sampler_name="euler", scheduler="sgm_uniform", steps=28),
            "lumina2": dict(cfg=4.0, sampler_name="res_multistep", scheduler="simple", steps=25)}


def learn_concept_family(g: Graph, family: str) -> None:
    """Learn Concept on a flow family's parts, Save Concept, and the family's own text → image graph."""
    model_file, (clip_loader, clip_files), vae_file = FAMILY_FILES[family]
    g.note(FAMILY_NOTES[family], (20, 20))
    model = g.node("UNETLoader", (20, 310), unet_name=model_file)
    clip = g.node(clip_loader, (20, 450), **clip_files)
    vae = g.node("VAELoader", (20, 640), vae_name=vae_file)
    batch = image_batch(g, [f"my_dog_{i}.png" for i in range(1, 5)], 450, 20)
    learn = g.node("ConceptForgeLearnConcept", (1480, 40), model=(model, 0), clip=(clip, 0), vae=(vae, 0),
                   images=(batch, 0), name="my_dog", init_word="dog", method="ti", steps=400,
                   gradient_checkpointing=True)
    g.node("ConceptForgeSaveConcept", (1480, 1120), concept=(learn, 0))
    text, x = "a photo of embedding:my_dog on the beach", 1880
    if family == "lumina2":  # its own prompt node: the system prompt, then the user's prompt
        positive = g.node("CLIPTextEncodeLumina2", (x, 40), clip=(learn, 1), user_prompt=text)
        negative = g.node("CLIPTextEncodeLumina2", (x, 240), clip=(learn, 1), user_prompt="blurry, low quality")
    else:
        positive = g.node("CLIPTextEncode", (x, 40), clip=(learn, 1), text=text)
        negative = g.node("CLIPTextEncode", (x, 240), clip=(learn, 1), text="")
    if family == "flux":
        positive = g.node("FluxGuidance", (x, 440), conditioning=(positive, 0), guidance=3.5)
    latent = g.node("EmptySD3LatentImage", (x, 560), width=1024, height=1024, batch_size=1)
    sampled = g.node("KSampler", (x + 440, 40), model=(model, 0), positive=(positive, 0), negative=(negative, 0),
                     latent_image=(latent, 0), seed=42, **SAMPLING[family])
    decoded = g.node("VAEDecode", (x + 800, 40), samples=(sampled, 0), vae=(vae, 0))
    g.node("SaveImage", (x + 800, 160), images=(decoded, 0), filename_prefix=f"concept_forge/my_dog_{family}")


WORKFLOWS = {"learn_concept_ti": learn_concept_ti, "learn_concept_dti": learn_concept_dti,
             "learn_concept_batex": learn_concept_batex,
             "learn_concept_catversion": learn_concept_catversion, "concept_slerp": concept_slerp,
             "concept_tools": concept_tools, "one_image_personalization": one_image_personalization,
             **{f"learn_concept_{family}": functools.partial(learn_concept_family, family=family)
                for family in FAMILY_FILES}}


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
        print(f"wrote {OUT / name}.json")


if __name__ == "__main__":
    main()

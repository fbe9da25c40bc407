#!/usr/bin/env python3
"""Render example_workflows/<name>.jpg, the template browser's thumbnails, as what each workflow really makes.

Each example workflow's graph is run on the toy world (bench/toyworld: one coloured shape on grey, tiny models
built from ComfyUI's own classes, shipped weights) through the pack's node classes and ComfyUI's stock nodes, as
its graph wires them, with fixed training and sampler seeds; the JPG shows what goes in (the references, or the
loaded concept's info) and what the graph then generates. Run it with the Python that runs ComfyUI:

    COMFYUI_PATH=/opt/comfyui python tools/make_thumbnails.py [names...]     # all seven by default

The toy world changes what a real checkpoint would not need: 64 px training and images, the concept and class
words of world.CONCEPTS instead of "my_dog on the beach", an empty negative prompt (its unconditional caption)
and its sampler settings (euler, 20 steps, CFG 5). Training keeps the workflows' steps (STEPS); all seven take
about six minutes on one CPU core. Whatever the graphs save goes to a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
sys.path.insert(0, str(ROOT / "bench"))   # `pack_import` and `toyworld`, as the benchmark imports them

from pack_import import import_pack  # noqa: E402

# The concept each graph learns: a known-word control, which every method learns in the benchmark
# (bench/results/toyworld.json), and not the same one everywhere, so that the thumbnails tell the workflows apart.
CONCEPT_OF = {"ti": "purpletriangle", "dti": "orangesquare", "batex": "purpletriangle", "catversion": "orangesquare"}
NAMES = {"ti": "{}", "dti": "{}_dti", "batex": "{}_batex", "catversion": "{}"}   # as the workflows name them
SLERP = ("orangesquare", "pinkheart")   # other colour and other shape, so the blend shows both turning
ONE_IMAGE = "tealstar"
STEPS = {"ti": 400, "dti": 400, "batex": 1000, "catversion": 1000}   # as the workflows ask; ~40-90 s each on a CPU
SAMPLER_SEEDS = (42, 43, 44, 45)   # the workflows' KSampler seed 42, and three more
SEEDS = ", ".join(map(str, SAMPLER_SEEDS))   # PIL's default font has no en dash
TRAIN_SEED = 0
SIZE = (512, 384)
BACKGROUND, TEXT, DIM = "#1c1c1c", "#f0f0f0", "#a0a0a0"
METHOD_TITLES = {"ti": "Textual Inversion", "dti": "Directional Textual Inversion", "batex": "BaTex",
                 "catversion": "CatVersion"}


# -- running the graphs --------------------------------------------------------------------------------------------
@functools.cache
def models() -> tuple[Any, Any, Any]:
    """The toy world's (MODEL, CLIP, VAE), as a Load Checkpoint node gives them."""
    from toyworld.models import load_clip, load_model, load_vae

    return load_model(), load_clip(), load_vae()


def references(concept: str, n: int = 4) -> torch.Tensor:
    """The concept's references as an IMAGE batch [n, H, W, 3] in 0..1 (the workflows' Load Image nodes)."""
    from toyworld import world

    return torch.from_numpy(world.concept_references(concept)[:n]).float() / 255


def defaults(node_class: Any) -> dict[str, Any]:
    from toyworld.benchmark import node_defaults

    return node_defaults(node_class)


def run(node_class: Any, **inputs: Any) -> Any:
    """The node's outputs at its defaults updated by `inputs`, run as ComfyUI's executor runs it."""
    from toyworld.benchmark import run_node

    return run_node(node_class, **{**defaults(node_class), **inputs})


def images(model: Any, clip: Any, text: str) -> list[torch.Tensor]:
    """One image [H, W, 3] per sampler seed: CLIP Text Encode → KSampler → VAE Decode, the stock nodes."""
    from toyworld.sampling import generate

    return [generate(model, clip, models()[2], text, 1, seed)[0] for seed in SAMPLER_SEEDS]


@functools.cache
def learned(method: str, concept: str, name: str, n_references: int = 4, bare: bool = False) -> tuple[Any, Any]:
    """Learn Concept's (CONCEPT, CLIP) for `method` on the concept's first references, as the learn_concept_*
    graphs run it: its options node at its defaults before it, Save Concept after it (`bare`: neither, as in
    concept_slerp). Cached, so concept_tools loads the file that learn_concept_ti saved."""
    from concept_forge.nodes.batex import BaTexOptions
    from concept_forge.nodes.catversion import CatVersionOptions
    from concept_forge.nodes.dti import DTIOptions
    from concept_forge.nodes.files import SaveConcept
    from concept_forge.nodes.learn import LearnConcept, TrainingOptionsNode
    from toyworld import world
    from toyworld.benchmark import CLASS_WORD

    options_node = {"ti": TrainingOptionsNode, "dti": DTIOptions, "batex": BaTexOptions,
                    "catversion": CatVersionOptions}[method]
    key = "training_options" if method == "ti" else "method_options"
    model, clip, vae = models()
    extra = {} if bare else {key: run(options_node)[0]}
    concept_out, clip_out, _, _ = run(LearnConcept, model=model, clip=clip, vae=vae,
                                      images=references(concept, n_references), name=name,
                                      init_word=CLASS_WORD[concept], method=method, steps=STEPS[method],
                                      resolution=world.RES, seed=TRAIN_SEED, **extra)
    if not bare:
        run(SaveConcept, concept=concept_out)
    return concept_out, clip_out


# -- drawing -------------------------------------------------------------------------------------------------------
def to_pil(image: torch.Tensor, size: int) -> Any:
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(pixels).resize((size, size), Image.BICUBIC)


class Canvas:
    """A landscape thumbnail: a title line, then image grids, labels and arrows placed by pixel."""

    def __init__(self, title: str):
        from PIL import Image, ImageDraw, ImageFont

        self.image = Image.new("RGB", SIZE, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(size=15)
        self.small = ImageFont.load_default(size=13)
        self.text(title, (SIZE[0] // 2, 22), self.font, TEXT)

    def text(self, text: str, centre: tuple[int, int], font: Any = None, fill: str = DIM) -> None:
        self.draw.text(centre, text, font=font or self.small, fill=fill, anchor="mm")

    def grid(self, tiles: list[torch.Tensor], x: int, y: int, size: int, columns: int = 2, gap: int = 4) -> None:
        for i, tile in enumerate(tiles):
            self.image.paste(to_pil(tile, size), (x + (size + gap) * (i % columns), y + (size + gap) * (i // columns)))

    def paragraph(self, text: str, x: int, y: int, size: int) -> None:
        """`text` wrapped into a size × size box, cut at its bottom."""
        lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 32, subsequent_indent="  ")]
        self.draw.rectangle([x, y, x + size, y + size], fill="#2a2a2a")
        self.draw.multiline_text((x + 8, y + 8), "\n".join(lines[:(size - 16) // 15]), font=self.small, fill=TEXT,
                                 spacing=2)

    def arrow(self, x0: int, x1: int, y: int) -> None:
        self.draw.line([(x0, y), (x1, y)], fill=TEXT, width=3)
        self.draw.polygon([(x1 + 4, y), (x1 - 8, y - 7), (x1 - 8, y + 7)], fill=TEXT)


def before_after(title: str, left: list[torch.Tensor] | str, left_label: str, right: list[torch.Tensor] | str,
                 right_label: str, caption: str) -> Any:
    """On the left up to four images (the references) or a text, an arrow, on the right four generated images (or a
    text)."""
    canvas = Canvas(title)
    tile, top = 100, 96
    grid = 2 * tile + 4
    if isinstance(left, str):
        canvas.paragraph(left, 24, top, grid)
    else:
        canvas.grid(left, 24, top, grid if len(left) == 1 else tile)   # a single reference fills the grid's square
    if isinstance(right, str):
        canvas.paragraph(right, SIZE[0] - 24 - grid, top, grid)
    else:
        canvas.grid(right, SIZE[0] - 24 - grid, top, tile)
    canvas.arrow(24 + grid + 12, SIZE[0] - 24 - grid - 16, top + grid // 2)
    canvas.text(left_label, (24 + grid // 2, top - 14))
    canvas.text(right_label, (SIZE[0] - 24 - grid // 2, top - 14))
    canvas.text(caption, (SIZE[0] // 2, top + grid + 34))
    return canvas.image


# -- the workflows -------------------------------------------------------------------------------------------------
def learned_for(method: str) -> tuple[str, Any, Any]:
    """The name, CONCEPT and CLIP of the learn_concept_<method> graph's Learn Concept node."""
    name = NAMES[method].format(CONCEPT_OF[method])
    return (name, *learned(method, CONCEPT_OF[method], name))


def learn_and_generate(method: str) -> Any:
    """learn_concept_{ti,dti,batex}: Learn Concept → Save Concept, its CLIP → `embedding:<name>` → KSampler."""
    name, _, clip = learned_for(method)
    prompt = f"a photo of a embedding:{name}"
    return before_after(f"{METHOD_TITLES[method]} · {STEPS[method]} steps", list(references(CONCEPT_OF[method])),
                        "4 references", images(models()[0], clip, prompt), f"embedding:{name}",
                        f'"{prompt}", seeds {SEEDS}')


def learn_concept_catversion() -> Any:
    """Learn Concept (catversion) → Save Concept; CatVersion Residual on the checkpoint's CLIP, prompted by the
    class word."""
    from concept_forge.nodes.catversion import CatVersionResidual
    from toyworld.benchmark import CLASS_WORD

    _, concept, _ = learned_for("catversion")
    model, clip, _ = models()
    patched = run(CatVersionResidual, clip=clip, concept=concept)[0]
    prompt = f"a photo of a {CLASS_WORD[CONCEPT_OF['catversion']]}"
    return before_after(f"CatVersion · {STEPS['catversion']} steps", list(references(CONCEPT_OF["catversion"])),
                        "4 references", images(model, patched, prompt), "CatVersion Residual",
                        f'"{prompt}", seeds {SEEDS}')


def concept_slerp() -> Any:
    """Two DTI concepts from two references each; Concept Slerp at t = 0 … 1 → Apply DTI Token → KSampler."""
    from concept_forge.nodes.dti import ApplyDTIToken, ConceptSlerp

    model, clip, _ = models()
    a, b = (learned("dti", concept, concept, 2, bare=True)[0] for concept in SLERP)
    canvas = Canvas(f"Concept Slerp · two DTI concepts, {STEPS['dti']} steps each")
    canvas.grid(list(references(SLERP[0], 2)), 24, 56, 64)
    canvas.grid(list(references(SLERP[1], 2)), SIZE[0] - 24 - 132, 56, 64)
    canvas.text("concept a", (24 + 66, 134))
    canvas.text("concept b", (SIZE[0] - 24 - 66, 134))
    canvas.arrow(24 + 150, SIZE[0] - 24 - 160, 88)
    tile, ts = 88, (0.0, 0.25, 0.5, 0.75, 1.0)
    x0 = (SIZE[0] - 5 * tile - 4 * 6) // 2
    for i, t in enumerate(ts):
        name = f"blend_{int(t * 100)}"
        blend = run(ConceptSlerp, concept_a=a, concept_b=b, t=t, name=name)[0]
        blended_clip = run(ApplyDTIToken, clip=clip, concept=blend)[0]
        column = images(model, blended_clip, f"a photo of a embedding:{name}")[:2]
        canvas.grid(column, x0 + (tile + 6) * i, 152, tile, columns=1, gap=6)
        canvas.text(f"t = {t:g}", (x0 + (tile + 6) * i + tile // 2, 152 + 2 * tile + 18))
    return canvas.image


def concept_tools() -> Any:
    """Load Concept (the file learn_concept_ti's Save Concept wrote) → Concept Info, and Apply DTI Token
    (in-distribution) → KSampler."""
    from concept_forge.nodes.dti import ApplyDTIToken
    from concept_forge.nodes.files import LoadConcept
    from concept_forge.nodes.info import ConceptInfo

    name, _, _ = learned_for("ti")
    model, clip, _ = models()
    loaded = run(LoadConcept, file=f"embeddings/{name}.safetensors")[0]
    info = run(ConceptInfo, concept=loaded, clip=clip)[0]
    applied = run(ApplyDTIToken, clip=clip, concept=loaded, magnitude="in-distribution")[0]
    prompt = f"a photo of a embedding:{name}"
    # the info's first three lines: what the file is, the vocabulary's norms, the vector's norm and nearest words
    return before_after("Load Concept · Concept Info · Apply DTI Token", "\n".join(info.splitlines()[:3]),
                        "Concept Info", images(model, applied, prompt), "in-distribution",
                        f'"{prompt}", at the vocabulary\'s norm')


def one_image_personalization() -> Any:
    """Tuning Encoder (encoder: none) on one reference → Save Concept; its MODEL and CLIP → KSampler."""
    from concept_forge.nodes.files import SaveConcept
    from concept_forge.nodes.tuning import TuningEncoderNode
    from toyworld import world
    from toyworld.benchmark import CLASS_WORD

    model, clip, vae = models()
    name = f"{ONE_IMAGE}_1shot"
    reference = references(ONE_IMAGE, 1)
    tuned_model, tuned_clip, concept, _ = run(TuningEncoderNode, model=model, clip=clip, vae=vae, image=reference,
                                              name=name, class_word=CLASS_WORD[ONE_IMAGE], resolution=world.RES,
                                              seed=TRAIN_SEED)
    run(SaveConcept, concept=concept, export_stock_files=True)
    steps = defaults(TuningEncoderNode)["tuning_steps"]
    return before_after(f"Tuning Encoder · 1 image, {steps} steps", list(reference), "1 reference",
                        images(tuned_model, tuned_clip, f"a photo of a embedding:{name}"), f"embedding:{name}",
                        "no encoder weights: it starts from the class word and learns little")


# The flow families' graphs, drawn as what they wire and write: the toy world is a UNet family, and a demo run of
# these graphs (random weights) would draw nothing worth showing.
FAMILY_CARDS = {
    "flux": ("Flux.1 · Learn Concept", "Load Diffusion Model\nDualCLIPLoader (flux):\n  clip_l, t5xxl\nLoad VAE\n"
             "4 references", "Save Concept:\n  clip_l + t5xxl\n\nembedding:my_dog\nFlux Guidance 3.5\nKSampler CFG 1"),
    "sd3": ("SD 3.5 · Learn Concept", "Load Diffusion Model\nTripleCLIPLoader:\n  clip_l, clip_g, t5xxl\nLoad VAE\n"
            "4 references", "Save Concept:\n  clip_l + clip_g\n  + t5xxl\n\nembedding:my_dog\nKSampler CFG 4.5"),
    "lumina2": ("Lumina 2 · Learn Concept", "Load Diffusion Model\nLoad CLIP (lumina2):\n  Gemma-2-2B\nLoad VAE\n"
                "4 references", "Save Concept: gemma2_2b\n\nLearn Concept's clip\n(or Apply DTI Token)\n"
                "embedding:my_dog in\nCLIP Text Encode\nfor Lumina2"),
}


def family_card(family: str) -> Any:
    title, graph, result = FAMILY_CARDS[family]
    return before_after(title, graph, "the graph", result, "what it writes", "flow matching on the family's own loss")


WORKFLOWS: dict[str, Callable[[], Any]] = {
    "learn_concept_ti": lambda: learn_and_generate("ti"), "learn_concept_dti": lambda: learn_and_generate("dti"),
    "learn_concept_batex": lambda: learn_and_generate("batex"), "learn_concept_catversion": learn_concept_catversion,
    "concept_slerp": concept_slerp, "concept_tools": concept_tools,
    "one_image_personalization": one_image_personalization,
    **{f"learn_concept_{family}": functools.partial(family_card, family) for family in FAMILY_CARDS}}


def scratch_folders(scratch: Path) -> None:
    """Point every model folder the graphs read or write at `scratch`, so ComfyUI's own models/ stay untouched."""
    import folder_paths
    from concept_forge.nodes.paths import CONCEPTS, EMBEDDINGS, ENCODERS

    for folder in (CONCEPTS, ENCODERS, EMBEDDINGS, "loras"):
        folder_paths.folder_names_and_paths[folder] = ([str(scratch / folder)], {".safetensors"})


def main() -> None:
    torch.set_num_threads(1)   # thumbnails are small; leave the other cores to whatever else runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows to render (default: all): {', '.join(WORKFLOWS)}")
    names = parser.parse_args().names or list(WORKFLOWS)
    unknown = sorted(set(names) - set(WORKFLOWS))
    if unknown:
        parser.error(f"unknown workflows {unknown}; choose from {list(WORKFLOWS)}")
    import toyworld.models  # noqa: F401 — configures ComfyUI (CPU, fp32) before the pack imports it

    import_pack()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    with tempfile.TemporaryDirectory(prefix="concept-forge-thumbnails-") as scratch:
        scratch_folders(Path(scratch))
        for name in names:
            start = time.time()
            WORKFLOWS[name]().save(OUT / f"{name}.jpg", quality=90)
            print(f"wrote {OUT / name}.jpg ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

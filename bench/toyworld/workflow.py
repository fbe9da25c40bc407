"""The one-image example workflow on the toy world, under the headless runner: a pretrained encoder and the vision
tower wired through stock loaders.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/workflow.py                      # blue star, unseen
    COMFYUI_PATH=/opt/comfyui python bench/toyworld/workflow.py --pair green cross --prompt "a small {} on the left"

The graph is example_workflows/one_image_personalization.json with a stock Load CLIP Vision added and wired into
the Tuning Encoder's clip_vision, and the toy world's files in its loaders. Load CLIP Vision reads the vision
tower's stock ViT-L file as it reads any other (bench/toyworld/vision.py); ComfyUI's checkpoint loader cannot build
a UNet this small, so only while the runner runs, Load Checkpoint builds the toy world's models when it is given
`toyworld.safetensors` (any other file loads as always). The base folder is a scratch folder (--base-directory to
keep it); the run prints every file it writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from pack_import import import_pack  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "example_workflows" / "one_image_personalization.json"
CHECKPOINT = "toyworld.safetensors"
ENCODER_FILE = Path(__file__).resolve().parent / "weights" / "encoder.safetensors"
ENCODER = "toyworld_encoder.safetensors"
REFERENCE = "toyworld_reference.png"


def toy_prompt(pair: tuple[str, str], class_word: str, text: str, steps: int) -> dict[str, Any]:
    """The example workflow as an API prompt, turned into the toy-world one."""
    import asyncio

    from concept_forge.nodes.extension import ConceptForgeExtension
    from concept_forge.nodes.paths import register_model_folders
    from concept_forge.nodes.workflow_api import workflow_to_prompt

    from toyworld import vision, world

    register_model_folders()

    import nodes

    pack = asyncio.run(ConceptForgeExtension().get_node_list())
    classes = {**nodes.NODE_CLASS_MAPPINGS, **{c.define_schema().node_id: c for c in pack}}
    prompt = workflow_to_prompt(json.loads(EXAMPLE.read_text()),
                                lambda kind: classes[kind].INPUT_TYPES() if kind in classes else None)
    ids = {v["class_type"]: k for k, v in prompt.items()}
    vision_id = str(max(int(k) for k in prompt) + 1)
    tower = vision.encoder_tower(ENCODER_FILE)
    prompt[vision_id] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": tower.stock_name}}
    name = f"toy_{'_'.join(pair)}"
    encoder = prompt[ids["ConceptForgeTuningEncoder"]]["inputs"]
    encoder.update(clip_vision=[vision_id, 0], encoder=ENCODER, name=name, class_word=class_word,
                   tuning_steps=steps, resolution=64, captions=world.layout_caption(*world.CENTRED_LAYOUT))
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = CHECKPOINT
    prompt[ids["LoadImage"]]["inputs"]["image"] = REFERENCE
    prompt[ids["ConceptForgeSaveConcept"]]["inputs"]["overwrite"] = True
    for node in prompt.values():  # both rows: the Tuning Encoder's model, and the dual path's
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=4)
        elif node["class_type"] == "KSampler":
            inputs.update(steps=20, cfg=5.0)
        elif node["class_type"] in ("CLIPTextEncode", "ConceptForgeTuningEncoderDualPath"):
            inputs["text"] = text.format(f"embedding:{name}") if "embedding:" in inputs["text"] else ""
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = inputs["filename_prefix"].replace("my_dog_1shot", name)
    return prompt


def install(base: Path, pair: tuple[str, str]) -> None:
    """The toy world's files in the base folder's models/ and input/."""
    import folder_paths
    import numpy as np
    from concept_forge.trainers.atomic import write_safetensors
    from PIL import Image
    from safetensors.torch import load_file

    from toyworld import vision, world
    from toyworld.models import WEIGHTS

    vision.install(Path(folder_paths.get_folder_paths("clip_vision")[0]), vision.encoder_tower(ENCODER_FILE))
    checkpoint = Path(folder_paths.get_folder_paths("checkpoints")[0]) / CHECKPOINT
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        parts = {prefix: load_file(str(WEIGHTS / f"{part}.safetensors"))
                 for prefix, part in (("unet.", "unet"), ("clip.", "clip"), ("vae.", "vae"))}
        write_safetensors({p + k: v for p, sd in parts.items() for k, v in sd.items()}, checkpoint,
                          {"concept_forge_toyworld": "1"})
    encoders = base / "models" / "concept_encoders"
    encoders.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ENCODER_FILE, encoders / ENCODER)
    colour, shape = pair
    image = world.render((colour, shape, *world.CENTRED_LAYOUT), np.random.default_rng(world.REFERENCE_SEED))[0]
    Image.fromarray(image).save(Path(folder_paths.get_input_directory()) / REFERENCE)


@contextlib.contextmanager
def toy_checkpoint_loader() -> Iterator[None]:
    """While open, Load Checkpoint builds the toy world's models from `toyworld.safetensors`."""
    import comfy.sd
    from safetensors import safe_open
    from safetensors.torch import save_file

    from toyworld import models

    stock = comfy.sd.load_checkpoint_guess_config

    def load(ckpt_path: str, *args: Any, embedding_directory: Any = None, **kwargs: Any) -> Any:
        with safe_open(ckpt_path, framework="pt") as f:
            if "concept_forge_toyworld" not in (f.metadata() or {}):
                return stock(ckpt_path, *args, embedding_directory=embedding_directory, **kwargs)
            parts: dict[str, dict[str, Any]] = {"unet.": {}, "clip.": {}, "vae.": {}}
            for key in f.keys():
                prefix = key.split(".", 1)[0] + "."
                parts[prefix][key[len(prefix):]] = f.get_tensor(key)
        folder = tempfile.mkdtemp(prefix="toyworld-ckpt-")
        try:
            paths = {}
            for prefix, state in parts.items():  # the toy world's builders read one file per model
                paths[prefix] = Path(folder) / f"{prefix[:-1]}.safetensors"
                save_file(state, str(paths[prefix]))
            directory = embedding_directory[0] if isinstance(embedding_directory, list) else embedding_directory
            return (models.load_model(paths["unet."]), models.load_clip(paths["clip."], directory),
                    models.load_vae(paths["vae."]), None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    comfy.sd.load_checkpoint_guess_config = load
    try:
        yield
    finally:
        comfy.sd.load_checkpoint_guess_config = stock


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", nargs=2, default=["blue", "star"], metavar=("COLOUR", "SHAPE"))
    parser.add_argument("--prompt", default="a photo of a {}", help="the positive prompt; {} is the concept")
    parser.add_argument("--steps", type=int, default=12, help="tuning steps")
    parser.add_argument("--base-directory", type=Path, help="ComfyUI base folder (default: a scratch folder)")
    opts = parser.parse_args(argv)
    comfyui = os.environ.get("COMFYUI_PATH", "")
    base = (opts.base_directory or Path(tempfile.mkdtemp(prefix="toyworld-workflow-"))).resolve()
    for folder in ("custom_nodes", "input", "output", "models"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    import_pack()
    from concept_forge.nodes import headless

    headless.bootstrap(comfyui, base, cpu=True)
    import execution  # noqa: F401 — ComfyUI's modules, configured by bootstrap

    from toyworld.pretrain import class_word

    pair = (opts.pair[0], opts.pair[1])
    install(base, pair)
    prompt_file = base / "toyworld_one_image.json"
    prompt_file.write_text(json.dumps(toy_prompt(pair, class_word(pair[1]), opts.prompt, opts.steps),
                                      indent=1))
    ns = headless.parse_args([str(prompt_file), "--comfyui", comfyui, "--base-directory", str(base), "--cpu"])
    with toy_checkpoint_loader():
        return headless.run(ns)


if __name__ == "__main__":
    sys.exit(main())

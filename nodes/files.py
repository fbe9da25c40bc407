"""Save Concept and Load Concept: concept files where ComfyUI's own loaders find them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..trainers.atomic import write_safetensors
from ..trainers.concept import Concept, name_problem
from ..trainers.files import read_concept, save_concept
from .paths import display_path, file_choices, resolve_choice, target_path
from .tuning import lora_of
from .types import CATEGORY, ConceptIO
from .validation import schema_problem

SAVE = "Save Concept"
LOAD = "Load Concept"


def _written(path: Path, overwrite: bool, write: Callable[[], Any]) -> None:
    """Run `write` for `path`, turning its failures into Save Concept's messages."""
    try:
        write()
    except FileExistsError as e:
        raise FileExistsError(f"{SAVE}: {display_path(path)} already exists; turn on overwrite to replace it or "
                              "choose another name.") from e
    except OSError as e:
        raise OSError(f"{SAVE}: could not write {display_path(path)} ({e.strerror or e}); nothing was written. "
                      "Free some disk space or check the folder's permissions, then queue again.") from e


def save(concept: Concept, name: str, overwrite: bool, export_stock_files: bool = False) -> str:
    """Write `concept` as `name` to its folder (and, asked for, its stock LoRA + embedding); the node's message."""
    name = name.strip() or concept.name
    problem = name_problem(name)
    if problem:
        raise ValueError(f"{SAVE}: {problem}. Use letters, digits, '_', '-' or '.'.")
    concept = concept.renamed(name)
    path = target_path(concept, name)
    _written(path, overwrite, lambda: save_concept(concept, path, overwrite=overwrite))
    if concept.is_token_concept:
        return (f"Saved to {display_path(path)}. Any CLIP Text Encode can now use embedding:{name} "
                "(A1111 and kohya read the file too).")
    lines = [f"Saved to {display_path(path)}. Load it with Load Concept."]
    if export_stock_files and concept.method == "tuning_encoder":
        lora = Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"
        _written(lora, overwrite, lambda: write_safetensors(lora_of(concept), lora, {"concept_forge_concept": name},
                                                            overwrite))
        token = Concept(name, "ti", concept.arch, concept.vectors, provenance=concept.provenance)
        embedding = target_path(token, name)
        _written(embedding, overwrite, lambda: save_concept(token, embedding, overwrite=overwrite))
        lines.append(f"Exported {display_path(lora)} (Load LoRA) and {display_path(embedding)} (embedding:{name}): "
                     "usable without Concept Forge.")
    return "\n".join(lines)


def optional_name_problem(node: str, name: str) -> str | None:
    """A refusal for a name input that may stay empty (then the concept's or file's own name is used)."""
    problem = name_problem(name.strip()) if name and name.strip() else None
    return f"{node}: {problem}. Use letters, digits, '_', '-' or '.'." if problem else None


def load(choice: str, name: str) -> Concept:
    path = resolve_choice(choice)
    if path is None:
        raise FileNotFoundError(f"{LOAD}: {choice} was not found; refresh the page to update the file list.")
    problem = optional_name_problem(LOAD, name)
    if problem:
        raise ValueError(problem)
    name = name.strip()
    try:
        return read_concept(path, name or None)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{LOAD}: {display_path(path)} cannot be used as a concept: {e} Choose another file; "
                         "this one was left as it is.") from e


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeSaveConcept",
            display_name=SAVE,
            category=CATEGORY,
            description="Saves a concept: TI, DTI and BaTex as a stock embedding in models/embeddings, the others "
                        "in models/concepts.",
            inputs=[
                ConceptIO.Input("concept", tooltip="The concept to save."),
                io.String.Input("name", default="", tooltip="File name without extension; prompts call it "
                                "embedding:<name>. Empty keeps the concept's own name."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name. Off refuses "
                                 "to touch an existing file."),
                io.Boolean.Input("export_stock_files", default=False, optional=True, tooltip="For Tuning Encoder "
                                 "concepts: also write models/loras/<name>.safetensors (stock Load LoRA) and "
                                 "models/embeddings/<name>.safetensors, usable without this pack. Off: only the "
                                 "concept file. Other concepts ignore it."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str = "") -> bool | str:
        return schema_problem(cls, SAVE, name=name) or optional_name_problem(SAVE, name) or True

    @classmethod
    def execute(cls, concept, name, overwrite, export_stock_files=False) -> io.NodeOutput:
        return io.NodeOutput(ui=ui.PreviewText(save(concept, name, overwrite, export_stock_files)))


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeLoadConcept",
            display_name=LOAD,
            category=CATEGORY,
            description="Loads a concept file, or any embedding (A1111 .pt, kohya, diffusers, SDXL clip_l/clip_g).",
            inputs=[
                io.Combo.Input("file", options=file_choices(), tooltip="A file in models/embeddings or "
                               "models/concepts. Third-party embeddings load as TI concepts."),
                io.String.Input("name", default="", tooltip="The name prompts use (embedding:<name>). Empty uses "
                                "the file's name."),
            ],
            outputs=[ConceptIO.Output("concept", display_name="concept", tooltip="The loaded concept.")],
        )

    @classmethod
    def validate_inputs(cls, file: str = "", name: str = "") -> bool | str:
        problem = schema_problem(cls, LOAD, name=name)  # file: a path that exists, whether listed yet or not
        if problem:
            return problem
        if not isinstance(file, str) or (file and resolve_choice(file) is None):
            return f"{LOAD}: {file} was not found; refresh the page to update the file list."
        return optional_name_problem(LOAD, name) or True

    @classmethod
    def fingerprint_inputs(cls, file: str, name: str = "", **_: Any) -> Any:
        path = resolve_choice(file)
        return (os.path.getmtime(path) if path else None, name)  # a re-saved file is read again

    @classmethod
    def execute(cls, file, name) -> io.NodeOutput:
        concept = load(file, name)
        info = (f"{concept.name}: {concept.method.upper()} concept for {concept.arch}, "
                f"{concept.num_vectors} vector(s) per encoder.")
        return io.NodeOutput(concept, ui=ui.PreviewText(info))


NODES = [SaveConcept, LoadConcept]

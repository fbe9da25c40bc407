"""Where concept files live: `models/embeddings` for token concepts (found by stock `embedding:<name>`) and the
registered `models/concepts` folder for everything else (docs/COMFYUI.md §6)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..trainers.concept import Concept
from ..trainers.files import EXTENSIONS

CONCEPTS = "concepts"
ENCODERS = "concept_encoders"
STATE_FILE = "training_state.safetensors"  # a checkpoint's optimizer state: not a concept
EMBEDDINGS = "embeddings"


def register_model_folders() -> None:
    """Register `models/concepts` and `models/concept_encoders`, merging with entries that extra_model_paths.yaml
    may already have made."""
    for name, extensions in ((CONCEPTS, set(EXTENSIONS)), (ENCODERS, {".safetensors"})):
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, default)
            paths, _ = folder_paths.folder_names_and_paths[name]
            folder_paths.folder_names_and_paths[name] = (paths, extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], extensions)


def folder_for(concept: Concept) -> str:
    return EMBEDDINGS if concept.is_token_concept else CONCEPTS


def target_path(concept: Concept, name: str) -> Path:
    """The file a concept saved under `name` goes to: the first folder of its kind."""
    return Path(folder_paths.get_folder_paths(folder_for(concept))[0]) / f"{name}.safetensors"


def checkpoint_dir(name: str) -> Path:
    """Where Learn Concept keeps the checkpoints of the latest run of `name`."""
    return Path(folder_paths.get_folder_paths(CONCEPTS)[0]) / "checkpoints" / name


def recovery_path(name: str, step: int) -> Path:
    """Where a run that stopped on a NaN keeps its last finite concept."""
    return Path(folder_paths.get_folder_paths(CONCEPTS)[0]) / "recovered" / f"{name}-step{step}.safetensors"


def file_choices() -> list[str]:
    """Every loadable file, as `<folder>/<relative path>` (the Load Concept list)."""
    choices = []
    for folder in (EMBEDDINGS, CONCEPTS):
        if folder in folder_paths.folder_names_and_paths:
            names = folder_paths.get_filename_list(folder)
            choices += [f"{folder}/{n}" for n in names if n.lower().endswith(EXTENSIONS) and not n.endswith(STATE_FILE)]
    return choices


def resolve_choice(choice: str) -> Path | None:
    folder, _, name = choice.partition("/")
    if folder not in (EMBEDDINGS, CONCEPTS) or not name:
        return None
    full = folder_paths.get_full_path(folder, name)
    return Path(full) if full else None


def display_path(path: Path) -> str:
    """A path relative to ComfyUI's base folder when it is inside it, for messages."""
    try:
        return str(path.relative_to(Path(folder_paths.base_path)))
    except ValueError:
        return str(path)

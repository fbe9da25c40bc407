"""What a concept records about how it was made: the checkpoint it was learned on (traced through the prompt
graph to its loader) with its SHA-256, the pack version and the time."""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Mapping

import folder_paths

from ..trainers import __version__

_hash_cache: dict[tuple[str, int, float], str] = {}


def upstream_checkpoint(prompt: Mapping[str, Any] | None, node_id: str | None, socket: str = "model") -> str | None:
    """The checkpoint file name that feeds `socket` of `node_id`, following MODEL links through patch nodes."""
    if not prompt or node_id is None:
        return None
    current, seen = str(node_id), set()
    while current in prompt and current not in seen:
        seen.add(current)
        inputs = prompt[current].get("inputs", {})
        link = inputs.get(socket)
        if not isinstance(link, list) or not link:
            return None
        current, socket = str(link[0]), "model"
        upstream = prompt.get(current, {}).get("inputs", {})
        for key in ("ckpt_name", "unet_name"):
            if isinstance(upstream.get(key), str):
                return upstream[key]
    return None


def file_sha256(folder: str, name: str) -> str | None:
    """SHA-256 of a model file, cached by path, size and modification time (hashing a 6 GB file takes seconds)."""
    path = folder_paths.get_full_path(folder, name)
    if not path:
        return None
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def provenance(prompt: Mapping[str, Any] | None, node_id: str | None, **fields: Any) -> dict[str, Any]:
    checkpoint = upstream_checkpoint(prompt, node_id)
    record: dict[str, Any] = dict(fields)
    if checkpoint:
        record["checkpoint"] = checkpoint
        folder = "checkpoints" if checkpoint in folder_paths.get_filename_list("checkpoints") else "diffusion_models"
        sha = file_sha256(folder, checkpoint)
        if sha:
            record["checkpoint_sha256"] = sha
    record["pack_version"] = __version__
    record["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record

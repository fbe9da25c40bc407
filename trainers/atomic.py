"""Atomic safetensors writes: a temporary file in the target's folder, fsync, then a rename.

A crash, a kill or a full disk mid-write leaves the previous file (or none) and never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

from safetensors.torch import save_file
from torch import Tensor


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write `tensors` (and string `metadata`) to `path` atomically.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        OSError: the write failed (a full disk); nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""Atomic safetensors writes: a temporary file in the target's folder, fsync, then a rename.

A crash, a kill or a full disk mid-write leaves the previous file (or none) and never a torn one. A temporary file
that a killed writer left behind carries its process id in its name and is removed by the next write to the same
folder once that process is gone.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

from safetensors.torch import save_file
from torch import Tensor

TEMPORARY = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write `tensors` (and string `metadata`) to `path` atomically, with the permissions the umask gives.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False (checked and written in one step, so a file that
            appears meanwhile is not replaced either).
        OSError: the write failed (a full disk, a read-only folder); nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                      metadata=dict(metadata or {}))
        except Exception as e:
            if isinstance(e, OSError):
                raise
            raise OSError(f"could not write {path.name}: {e}") from e  # safetensors' SafetensorError (a full disk)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; a saved concept is an ordinary file
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it: a hard link fails atomically when the name exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists") from None
    except OSError:  # a file system without hard links: the check above is all there is
        if path.exists():
            raise FileExistsError(f"{path} already exists") from None
        os.replace(tmp, path)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writers in `folder` whose process no longer runs."""
    for entry in folder.iterdir():
        match = TEMPORARY.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _running(int(match.group(1))):
            entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there; keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive but another user's, or a platform that cannot tell: keep its file
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

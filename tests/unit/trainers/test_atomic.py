"""Atomic writes: permissions from the umask, no overwrite without asking, a full disk as OSError with nothing left
behind, and temporary files of killed writers cleaned."""

import os
import subprocess
import sys

import pytest
import torch
from concept_forge.trainers import atomic
from concept_forge.trainers.atomic import write_safetensors


def test_a_written_file_gets_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_safetensors({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_an_existing_file_is_never_replaced_without_overwrite(tmp_path):
    path = write_safetensors({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(FileExistsError):
        write_safetensors({"x": torch.zeros(1)}, path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_safetensors_errors_become_oserror_and_leave_nothing(tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise type("SafetensorError", (Exception,), {})("IoError: No space left on device")

    monkeypatch.setattr(atomic, "save_file", full)
    with pytest.raises(OSError, match="could not write a.safetensors: IoError: No space left on device"):
        write_safetensors({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="process ids of dead writers are not checked on Windows")
def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.pid{int(dead.stdout)}.x1y2.tmp"
    alive = tmp_path / f".a.pid{os.getppid()}.x3y4.tmp"
    stale.write_bytes(b"0" * 100)
    alive.write_bytes(b"0" * 100)
    write_safetensors({"x": torch.ones(1)}, tmp_path / "b.safetensors")
    assert not stale.exists() and alive.exists()

"""Pretraining the tuning encoder with DDP: two CPU processes (gloo) on tiny models train, checkpoint, get killed,
resume, and end with exactly the parameters (the encoder's and the concept codes') of an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from comfy_tier import require_comfyui
from PIL import Image
from safetensors import safe_open

tc = require_comfyui()

from concept_forge.trainers.checkpoint import load_state  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "pretrain_tiny.py"


COLOURS = {"red": (0.9, 0.2, 0.1), "blue": (0.1, 0.3, 0.9)}


def image_folder(root):
    """Three dogs and three cats, each one red or one blue (the concept, in captions.txt's fourth column)."""
    lines = []
    for word in ("dog", "cat"):
        (root / word).mkdir(parents=True)
        for i in range(3):
            image, colour = tc.tiny_images(1, seed=i)[0].numpy(), "red" if i % 2 else "blue"
            image[16:48, 16:48] = COLOURS[colour]
            Image.fromarray((image * 255).astype(np.uint8)).save(root / word / f"{i}.png")
            lines.append(f"{word}/{i}.png\t{word}\t\t{colour} {word}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def torchrun(data, run_dir, steps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT), "--data", str(data),
               "--run-dir", str(run_dir), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.{time.time_ns()}.log", "w+")  # a pipe left unread would fill up
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    process.log = log
    return process


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGSTOP)  # no new workers while the tree is walked
    for child in children:
        kill_tree(int(child))
    os.kill(pid, signal.SIGKILL)


def finish(process, timeout=600):
    process.wait(timeout=timeout)
    process.log.seek(0)
    output = process.log.read()
    assert process.returncode == 0, output[-3000:]
    return output


def test_a_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    data = image_folder(tmp_path / "data")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    output = finish(torchrun(data, whole, steps=6))
    assert "rank 0 of 2 done" in output and "rank 1 of 2 done" in output
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [6] and np.isfinite(log[0]["loss"])

    process = torchrun(data, cut, steps=6)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill both workers once a checkpoint exists, mid-run
        state = cut / "state.safetensors"
        if state.exists() and load_state(state).step >= 2:
            break
        time.sleep(0.2)
    kill_tree(process.pid)
    process.wait()
    killed_at = load_state(cut / "state.safetensors").step
    assert 2 <= killed_at < 6

    output = finish(torchrun(data, cut, steps=6))
    assert f"resumed at step {killed_at}" in output
    reference, resumed = load_state(whole / "state.safetensors"), load_state(cut / "state.safetensors")
    assert resumed.step == reference.step == 6
    for a, b in zip(reference.parameters, resumed.parameters, strict=True):
        assert (a - b).abs().max() <= 1e-6
    with safe_open(str(cut / "encoder.safetensors"), framework="pt") as f:  # the file says how it was made
        made_with = json.loads(f.metadata()["pretraining"])
    expected = {"steps": 6, "batch_size": 2, "learning_rate": 1e-3, "seed": 3, "processes": 2, "blend": 0.8,
                "resolution": 64}  # tests/support/pretrain_tiny.py's
    assert {k: made_with[k] for k in expected} == expected


"""README's main job, as a newcomer pastes it: the headless runner on the TI example with --demo. The demo
checkpoint is built once and reused, and every file a run writes is printed with its absolute path."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_tier import require_comfyui

tc = require_comfyui()

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "tools/run_workflow.py", "example_workflows/learn_concept_ti.json", "--demo"]


def run(demo, *extra):
    env = {**os.environ, "COMFYUI_PATH": tc.COMFYUI_PATH, "CONCEPT_FORGE_DEMO_DIR": str(demo)}
    done = subprocess.run([*COMMAND, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = [Path(line.strip()) for line in done.stdout.split("Files written:\n", 1)[1].splitlines()]
    assert written and all(path.is_absolute() and path.is_file() for path in written)
    return done.stdout, written


def test_the_main_job_builds_the_demo_once_and_prints_every_file_it_writes(tmp_path):
    demo = tmp_path / "demo"
    out, written = run(demo)
    checkpoint = demo / "models" / "checkpoints" / "concept_forge_demo_sd15.safetensors"
    assert f"demo checkpoint: {checkpoint} (built in" in out
    assert checkpoint.stat().st_size < 320 * 2**20  # CLIP-L in fp16 is most of it
    assert re.search(r"my_dog: TI on SD 1.x, 1 vector\(s\) per encoder, 20 steps", out)
    assert {checkpoint, demo / "models" / "embeddings" / "my_dog.safetensors",
            demo / "output" / "concept_forge" / "my_dog_00001_.png"} <= set(written)

    out, written = run(demo, "--set", "ConceptForgeLearnConcept.steps=2", "--set", "KSampler.steps=1")
    assert f"demo checkpoint: {checkpoint} (built earlier" in out and checkpoint not in written
    assert {demo / "models" / "embeddings" / "my_dog.safetensors",  # the demo's own concept, replaced
            demo / "output" / "concept_forge" / "my_dog_00002_.png"} <= set(written)


@pytest.mark.parametrize("family, label, keys", [("flux", "Flux.1", {"clip_l", "t5xxl"}),
                                                 ("sd3", "SD 3.5", {"clip_l", "clip_g", "t5xxl"}),
                                                 ("lumina2", "Lumina 2", {"gemma2_2b"})])
def test_each_family_workflow_runs_through_the_stock_loaders_on_its_demo_file(tmp_path, family, label, keys):
    from safetensors.torch import load_file

    demo = tmp_path / "demo"
    env = {**os.environ, "COMFYUI_PATH": tc.COMFYUI_PATH, "CONCEPT_FORGE_DEMO_DIR": str(demo)}
    command = [sys.executable, "tools/run_workflow.py", f"example_workflows/learn_concept_{family}.json", "--demo",
               "--set", "ConceptForgeLearnConcept.steps=3", "--set", "KSampler.steps=2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(rf"my_dog: TI on {label}, 1 vector\(s\) per encoder, 3 steps", done.stdout)
    written = [Path(line.strip()) for line in done.stdout.split("Files written:\n", 1)[1].splitlines()]
    saved = demo / "models" / "embeddings" / "my_dog.safetensors"
    assert saved in written and set(load_file(saved)) == keys  # the keys the family's tokenizers read
    assert demo / "output" / "concept_forge" / f"my_dog_{family}_00001_.png" in written

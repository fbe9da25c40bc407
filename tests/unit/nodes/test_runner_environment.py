"""The headless runner outside ComfyUI's environment: a clear message and exit code 2, never a traceback."""

import subprocess
import sys
import venv
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[3] / "tools" / "run_workflow.py"
WORKFLOW = RUNNER.parents[1] / "example_workflows" / "learn_concept_ti.json"


def test_a_python_without_comfyuis_packages_is_told_which_python_to_use(tmp_path):
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # a Python with nothing installed: no torch, no yaml
    python = bare / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy").mkdir(parents=True)
    (comfyui / "comfy" / "sd.py").touch()
    run = subprocess.run([str(python), str(RUNNER), str(WORKFLOW), "--demo", "--comfyui", str(comfyui)],
                         capture_output=True, text=True, timeout=120, env={"CONCEPT_FORGE_DEMO_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert f"ComfyUI cannot start in this Python ({python}): No module named" in run.stderr
    assert f"{python} -m pip install -r {comfyui.resolve() / 'requirements.txt'}" in run.stderr


def test_clean_demo_deletes_the_demo_folder_and_says_what_it_freed(tmp_path):
    demo = tmp_path / "demo"
    (demo / "models" / "checkpoints").mkdir(parents=True)
    (demo / "models" / "checkpoints" / "demo.safetensors").write_bytes(b"0" * 2**20)
    env = {"CONCEPT_FORGE_DEMO_DIR": str(demo)}
    run = subprocess.run([sys.executable, str(RUNNER), "--clean-demo"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout == f"Deleted the demo folder {demo} (1 MB).\n"
    assert not demo.exists()
    again = subprocess.run([sys.executable, str(RUNNER), "--clean-demo"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "nothing to delete" in again.stdout

"""The headless runner: one workflow through ComfyUI's own executor, in this process, with a terminal progress bar.

    python tools/run_workflow.py example_workflows/learn_concept_ti.json --demo

`--demo` runs in the demo folder (`demo_folder()`), where a small random-weight SD 1.5-layout checkpoint (for a
SD 3.5, Flux.1 or Lumina 2 workflow, that family's small demo file, which the stock loaders build from while the demo
runs: nodes/demo_families.py) and four demo images are built on the first run and reused after, and shrinks the heavy
settings (steps, resolution), so a run takes well under a minute on a CPU; `--clean-demo` deletes that folder.
Without `--demo` the workflow runs as saved, against the models of the ComfyUI at --comfyui (or $COMFYUI_PATH). Every
file a run writes is printed with its absolute path.

Only the standard library is imported at module level: ComfyUI must be configured (CPU mode, base folder) before
any of its modules load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..trainers.concept import Arch

PACK_ROOT = Path(__file__).resolve().parents[1]
LEARN = "ConceptForgeLearnConcept"

# --demo: what makes the example workflows finish in well under a minute on a CPU with the demo checkpoint. The demo
# folder is the runner's own, so a run replaces the concept the previous demo run saved there.
DEMO_SETTINGS = {
    LEARN: {"steps": 20, "resolution": 64, "batch_size": 2},
    "ConceptForgeSaveConcept": {"overwrite": True},
    "ConceptForgeTuningEncoder": {"tuning_steps": 4, "resolution": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 4},
}


def demo_folder() -> Path:
    """Where the runner keeps the demo's ComfyUI base folder (checkpoint, images, outputs) between runs:
    $CONCEPT_FORGE_DEMO_DIR, else concept-forge/demo in the user's cache folder."""
    if os.environ.get("CONCEPT_FORGE_DEMO_DIR"):
        return Path(os.environ["CONCEPT_FORGE_DEMO_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return (Path(cache) if cache else Path.home() / ".cache") / "concept-forge" / "demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="run_workflow.py", description="Run a ComfyUI workflow headless.")
    ap.add_argument("workflow", type=Path, nargs="?",
                    help="a workflow .json (UI format as saved by ComfyUI, or API format)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default: $COMFYUI_PATH)")
    ap.add_argument("--demo", action="store_true", help="run in the demo folder, on a random-weight demo checkpoint "
                    "and images built there once, with settings small enough for a CPU")
    ap.add_argument("--clean-demo", action="store_true", help="delete the demo folder (checkpoint, images, outputs) "
                    "and exit")
    ap.add_argument("--checkpoint", help="use this file of models/checkpoints in every Load Checkpoint node")
    ap.add_argument("--base-directory", type=Path, help="ComfyUI base folder for models/, input/ and output/ "
                    "(default: the ComfyUI folder; with --demo the demo folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override an input, by node id or node type (e.g. --set KSampler.steps=30); repeatable")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return ap.parse_args(argv)


def bootstrap(comfyui: str, base_directory: Path, cpu: bool) -> None:
    """Make ComfyUI importable and configure it as its main.py would, before any of its modules load."""
    import torch

    sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    args.base_directory = str(base_directory)
    import utils.extra_config  # noqa: F401 — ComfyUI's `utils` package must load before nodes.py shadows it


def execute_node(node_class: Any, hidden: dict[Any, Any] | None = None, **inputs: Any) -> Any:
    """Run one V3 node outside a prompt, as ComfyUI's executor would: a class clone that holds its hidden inputs
    (unique_id "headless" unless given), in inference mode. Returns the node's NodeOutput."""
    import torch
    from comfy_api.v0_0_2 import io

    hidden_inputs = {io.Hidden.unique_id: "headless", **(hidden or {})}
    if hasattr(io.HiddenHolder, "from_v3_data"):  # ComfyUI >= 0.4 wraps the hidden inputs in a v3_data dict
        clone = node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden_inputs})
    else:
        clone = node_class.PREPARE_CLASS_CLONE(hidden_inputs)
    with torch.inference_mode():
        return clone.execute(**inputs)


def apply_overrides(prompt: dict[str, Any], overrides: dict[str, dict[str, Any]], out: list[str]) -> None:
    """Set inputs by node id or class type; `out` collects what changed, for the log."""
    for node_id, node in prompt.items():
        for target in (node["class_type"], node_id):  # a node id is more specific than its type
            for name, value in overrides.get(target, {}).items():
                if not isinstance(node["inputs"].get(name), list):  # never replace a link
                    node["inputs"][name] = value
                    out.append(f"{node['class_type']} {node_id}: {name} = {value!r}")


def demo_overrides(prompt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The --demo changes: the demo checkpoint (or a flow family's demo files) and images, and settings small enough
    for a CPU."""
    from .demo import DEMO_CHECKPOINT, DEMO_EMBEDDING, DEMO_IMAGES
    from .demo_families import demo_family, demo_file_overrides

    overrides = {kind: dict(values) for kind, values in DEMO_SETTINGS.items()}
    family = demo_family(prompt)
    if family:
        overrides.update(demo_file_overrides(family))
    overrides["CheckpointLoaderSimple"] = {"ckpt_name": DEMO_CHECKPOINT}
    overrides["ConceptForgeLoadConcept"] = {"file": f"embeddings/{DEMO_EMBEDDING}"}
    loaders = sorted((k for k, v in prompt.items() if v["class_type"] == "LoadImage"), key=int)
    for i, node_id in enumerate(loaders):
        overrides[node_id] = {"image": DEMO_IMAGES[i % len(DEMO_IMAGES)]}
    return overrides


def merge_overrides(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers win, input by input."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for target, values in layer.items():
            merged.setdefault(target, {}).update(values)
    return merged


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. KSampler.steps=30")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        result.setdefault(node, {})[name] = parsed
    return result


class TerminalServer:
    """What the executor and the nodes need of ComfyUI's PromptServer, drawing progress in the terminal."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self._loss: dict[str, float] = {}
        self._started: dict[str, tuple[float, int]] = {}

    def queue_updated(self) -> None:
        pass

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        pass

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        from .progress import LOSS_EVENT

        if event == LOSS_EVENT:
            self._loss[str(data["node"])] = data["loss"]
        elif event == "executing" and isinstance(data, dict) and data.get("node"):
            self.last_node_id = str(data["node"])

    def progress(self, value: int, total: int, preview: Any, prompt_id: str | None = None,
                 node_id: str | None = None) -> None:
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        comfy.model_management.throw_exception_if_processing_interrupted()
        context = get_executing_context()
        node = str(node_id or (context.node_id if context else None) or self.last_node_id)
        now = time.perf_counter()
        start, first = self._started.setdefault(node, (now, value))
        if value <= first:
            self._started[node] = start, first = (now, value)
        rate = (value - first) / (now - start) if now > start else 0.0
        eta = (total - value) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * value / max(total, 1))
        line = f"\r  node {node:>3} [{'#' * filled}{'.' * (width - filled)}] {value}/{total}"
        if node in self._loss:
            line += f" · loss {self._loss[node]:.4f}"
        if rate > 0:
            from .progress import format_duration

            line += f" · {rate:.2f} it/s · ETA {format_duration(eta)}"
        sys.stderr.write(line + ("\n" if value >= total else ""))
        sys.stderr.flush()


def run(ns: argparse.Namespace) -> int:
    workflow = json.loads(ns.workflow.read_text())
    import comfy.utils
    import execution
    import server

    import nodes

    from .demo_families import demo_family, family_demo_loaders
    from .workflow_api import is_api_prompt, workflow_to_prompt

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
        print("Concept Forge did not load; see the log above.", file=sys.stderr)
        return 1

    overrides = parse_overrides(ns.overrides)
    before = written_files()
    classes = nodes.NODE_CLASS_MAPPINGS
    prompt = workflow if is_api_prompt(workflow) else workflow_to_prompt(
        workflow, lambda kind: classes[kind].INPUT_TYPES() if kind in classes else None)
    if ns.demo:
        prepare_demo(demo_family(prompt))
        overrides = merge_overrides(demo_overrides(prompt), overrides)
    if ns.checkpoint:
        overrides.setdefault("CheckpointLoaderSimple", {})["ckpt_name"] = ns.checkpoint
    changed: list[str] = []
    apply_overrides(prompt, overrides, changed)
    for line in changed:
        print(f"  set {line}")

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        print(f"The workflow is not valid: {error.get('message')}: {error.get('details')}", file=sys.stderr)
        for node_id, info in node_errors.items():
            for e in info["errors"]:
                print(f"  node {node_id} ({info['class_type']}): {e['message']}: {e['details']}", file=sys.stderr)
        return 2

    terminal = TerminalServer()
    server.PromptServer.instance = terminal  # the nodes send their live loss to it
    comfy.utils.set_progress_bar_global_hook(terminal.progress)
    executor = execution.PromptExecutor(terminal, cache_type=execution.CacheType.CLASSIC, **executor_cache_args())
    start = time.perf_counter()
    with family_demo_loaders() if ns.demo else contextlib.nullcontext():
        executor.execute(prompt, prompt_id, {}, outputs)
    elapsed = time.perf_counter() - start

    if not executor.success:
        for event, data in executor.status_messages:
            if event == "execution_error":
                print(f"\nnode {data['node_id']} ({data['node_type']}) failed: {data['exception_message']}",
                      file=sys.stderr)
            elif event == "execution_interrupted":
                print(f"\ninterrupted at node {data['node_id']} ({data['node_type']})", file=sys.stderr)
        return 1
    print(f"\nDone in {elapsed:.1f} s.")
    for node_id, ui in executor.history_result.get("outputs", {}).items():
        kind = prompt[node_id]["class_type"]
        for text in ui.get("text", []):
            print(f"  {kind} {node_id}: {text}")
    after = written_files()
    print("Files written:")
    for path in sorted(p for p, stamp in after.items() if before.get(p) != stamp):
        print(f"  {path}")
    return 0


def executor_cache_args() -> dict[str, Any]:
    """The cache settings PromptExecutor takes as main.py passes them: ComfyUI >= 0.4 needs `cache_args`."""
    import inspect

    import execution
    from comfy.cli_args import args

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return {"cache_args": {"lru": args.cache_lru, "ram": getattr(args, "cache_ram", 0)}}
    return {}


def prepare_demo(family: Arch | None) -> None:
    """The demo checkpoint (or the flow family's demo file and VAEs), images and embedding in the base folder: built
    once, then reused."""
    import folder_paths

    from .demo import DEMO_CHECKPOINT, write_demo_checkpoint, write_demo_embedding, write_demo_images
    from .demo_families import FAMILY_DEMO_FILES, write_demo_vaes, write_family_demo

    if family:
        folder = Path(folder_paths.get_folder_paths("diffusion_models")[0])
        folder_paths.add_model_folder_path("text_encoders", str(folder))  # the one file holds its text encoders too
        path, write = folder / FAMILY_DEMO_FILES[family], lambda p: write_family_demo(p.parent, family)
        write_demo_vaes(folder_paths.get_folder_paths("vae_approx")[0])
    else:
        path = Path(folder_paths.get_folder_paths("checkpoints")[0]) / DEMO_CHECKPOINT
        write = write_demo_checkpoint
    if path.exists():
        print(f"demo checkpoint: {path} (built earlier; --clean-demo deletes it)")
    else:
        start = time.perf_counter()
        write(path)
        print(f"demo checkpoint: {path} (built in {time.perf_counter() - start:.0f} s, kept for the next runs)")
    write_demo_embedding(folder_paths.get_folder_paths("embeddings")[0])
    write_demo_images(folder_paths.get_input_directory())


def written_files() -> dict[Path, tuple[int, int]]:
    """Size and modification time of every file in the folders a run writes to (inputs, outputs, models)."""
    import folder_paths

    from .paths import CONCEPTS, EMBEDDINGS

    roots = {Path(folder_paths.get_output_directory()), Path(folder_paths.get_input_directory())}
    for kind in (EMBEDDINGS, CONCEPTS, "loras", "checkpoints"):
        roots.update(Path(p) for p in folder_paths.get_folder_paths(kind))
    files = {}
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else ():
            if path.is_file():
                stat = path.stat()
                files[path.resolve()] = (stat.st_size, stat.st_mtime_ns)
    return files


def clean_demo() -> int:
    folder = demo_folder()
    if not folder.exists():
        print(f"No demo folder at {folder}; nothing to delete.")
        return 0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder)
    print(f"Deleted the demo folder {folder} ({size / 2**20:.0f} MB).")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.clean_demo:
        return clean_demo()
    if ns.workflow is None:
        print("Give a workflow file, e.g. example_workflows/learn_concept_ti.json.", file=sys.stderr)
        return 2
    if not ns.comfyui or not Path(ns.comfyui, "comfy", "sd.py").is_file():
        print("No ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH to a ComfyUI (>= 0.3.64) folder.",
              file=sys.stderr)
        return 2
    comfyui = Path(ns.comfyui).resolve()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("concept_forge").setLevel(logging.WARNING)  # the progress bar shows step and loss
    try:
        base = (ns.base_directory or (demo_folder() if ns.demo else comfyui)).resolve()
        for folder in ("custom_nodes", "input", "output", "models"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        print(f"ComfyUI: {comfyui}\nbase folder: {base}")
        bootstrap(str(comfyui), base, ns.cpu)
        import execution  # noqa: F401 — the first of ComfyUI's modules run() needs: it imports most others
    except ModuleNotFoundError as e:
        print(f"ComfyUI cannot start in this Python ({sys.executable}): {e}.\nRun the runner with the Python that "
              f"runs your ComfyUI (its venv, or python_embeded in the portable build), or install ComfyUI's "
              f"packages into this one:\n  {sys.executable} -m pip install -r {comfyui / 'requirements.txt'}",
              file=sys.stderr)
        return 2
    return run(ns)

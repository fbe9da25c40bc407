"""The ComfyUI tiers skip, with the reason printed, when no ComfyUI is at $COMFYUI_PATH."""

import os
import sys

import pytest

HOW = "README.md, 'Running the ComfyUI tiers', says how to get one"


def comfyui_problem() -> str | None:
    """Why the ComfyUI tiers cannot run here, or None when they can (importing ComfyUI on the way)."""
    path = os.environ.get("COMFYUI_PATH", "")
    if not path:
        return f"COMFYUI_PATH is not set; point it to a ComfyUI >= 0.3.64 folder ({HOW})"
    if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        return f"COMFYUI_PATH={path!r} is not a ComfyUI folder (no comfy/sd.py) ({HOW})"
    try:
        import tiny_comfy  # noqa: F401
    except ImportError as e:
        return (f"ComfyUI at {path} does not import in this Python ({sys.executable}): {e}. Run the tests with "
                f"ComfyUI's own Python, or install its packages into this one: "
                f"python -m pip install -r {os.path.join(path, 'requirements.txt')}")
    return None


def require_comfyui():
    """Import and return `tiny_comfy`, or skip the calling test module saying why."""
    problem = comfyui_problem()
    if problem:
        pytest.skip(f"ComfyUI tier skipped: {problem}", allow_module_level=True)
    import tiny_comfy

    return tiny_comfy


def run_node(node_class, hidden=None, **inputs):
    """Run a V3 node as ComfyUI's executor does (unique_id "7" unless given)."""
    from comfy_api.v0_0_2 import io
    from concept_forge.nodes.headless import execute_node

    return execute_node(node_class, {io.Hidden.unique_id: "7", **(hidden or {})}, **inputs)


def ui_text(output) -> str:
    """The text a node shows (its ui "text"), whether it returned a ui.PreviewText or a ui dict."""
    ui = output.ui.as_dict() if hasattr(output.ui, "as_dict") else output.ui
    return ui["text"][0]

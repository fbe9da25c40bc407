"""The ComfyUI tiers skip, with the reason printed, when no ComfyUI is at $COMFYUI_PATH."""

import pytest
import torch


def require_comfyui():
    """Import and return `tiny_comfy`, or skip the calling test module saying why."""
    try:
        import tiny_comfy
    except ImportError as e:
        pytest.skip(f"ComfyUI tier skipped: {e}", allow_module_level=True)
    return tiny_comfy


def run_node(node_class, hidden=None, **inputs):
    """Run a V3 node as ComfyUI's executor does: a class clone with its hidden inputs, in inference mode."""
    from comfy_api.v0_0_2 import io

    clone = node_class.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "7", **(hidden or {})})
    with torch.inference_mode():
        return clone.execute(**inputs)


def ui_text(output) -> str:
    """The text a node shows (its ui "text"), whether it returned a ui.PreviewText or a ui dict."""
    ui = output.ui.as_dict() if hasattr(output.ui, "as_dict") else output.ui
    return ui["text"][0]

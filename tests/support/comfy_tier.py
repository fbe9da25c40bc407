"""The ComfyUI tiers skip, with the reason printed, when no ComfyUI is at $COMFYUI_PATH."""

import pytest


def require_comfyui():
    """Import and return `tiny_comfy`, or skip the calling test module saying why."""
    try:
        import tiny_comfy
    except ImportError as e:
        pytest.skip(f"ComfyUI tier skipped: {e}", allow_module_level=True)
    return tiny_comfy

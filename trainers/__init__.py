"""Concept Forge's training layer: concepts, their files, the methods and the one shared loop.

Plain torch. Nothing in this package imports ComfyUI; `nodes/` adapts ComfyUI's objects to `host.Host`.
"""

__version__ = "0.1.0"  # kept equal to pyproject.toml's [project].version by a unit test

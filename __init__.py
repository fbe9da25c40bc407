"""Concept Forge: learn a concept from a few images inside a ComfyUI graph and use it in prompts right away.

ComfyUI loads this file. It stays importable without ComfyUI (the unit tests import `trainers` through it), so
everything that touches ComfyUI is imported when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():  # noqa: ANN201 — the ComfyExtension type lives in ComfyUI
    from .nodes.extension import ConceptForgeExtension
    from .nodes.paths import register_model_folders
    from .nodes.progress import register_routes

    register_model_folders()
    register_routes()
    return ConceptForgeExtension()

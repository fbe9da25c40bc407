"""ComfyUI nodes and the host adapter: the only layer of the pack that imports ComfyUI."""

from comfy_api.v0_0_2 import ComfyExtension, io

from . import files, learn
from .paths import register_model_folders

__all__ = ["ConceptForgeExtension", "register_model_folders"]


class ConceptForgeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*learn.NODES, *files.NODES]

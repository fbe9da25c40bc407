"""The pack's ComfyExtension: every node, in menu order."""

from comfy_api.v0_0_2 import ComfyExtension, io

from . import batex, catversion, dti, dual_path, files, info, learn, tuning


class ConceptForgeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*learn.NODES, *tuning.NODES, *dual_path.NODES, *dti.NODES, *batex.NODES, *catversion.NODES,
                *files.NODES, *info.NODES]

"""ComfyUI nodes and the host adapter: the only layer of the pack that imports ComfyUI.

This file imports nothing, so `nodes.headless` can configure ComfyUI before anything of it is loaded.
"""

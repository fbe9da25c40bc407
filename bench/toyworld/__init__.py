"""Toy-world base models for the quality benchmark; see README.md."""

from pack_import import import_pack

import_pack()  # the protocol reads the pack's own defaults (plain torch: ComfyUI is not needed to import it)

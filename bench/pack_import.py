"""The repository as the package `concept_forge`, as ComfyUI's custom-node loader and tests/conftest.py import it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def import_pack() -> ModuleType:
    if "concept_forge" not in sys.modules:
        spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["concept_forge"] = module
        spec.loader.exec_module(module)
    return sys.modules["concept_forge"]

"""Imports the pack as the package `concept_forge`, whatever its folder is called, and finds ComfyUI."""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "support"))  # test doubles and helpers


def _register_package() -> None:
    if "concept_forge" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = module
    spec.loader.exec_module(module)


_register_package()
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")


def pytest_report_header(config) -> str:
    from comfy_tier import comfyui_problem

    problem = comfyui_problem()
    if problem:
        return f"ComfyUI tiers: skipped, {problem}"
    import comfyui_version

    return f"ComfyUI tiers: ComfyUI {comfyui_version.__version__} at {os.environ['COMFYUI_PATH']} ({sys.executable})"

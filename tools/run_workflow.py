#!/usr/bin/env python3
"""Run a ComfyUI workflow headless through ComfyUI's own executor (see nodes/headless.py).

    COMFYUI_PATH=/path/to/ComfyUI python tools/run_workflow.py example_workflows/learn_concept_ti.json --demo
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = package
    spec.loader.exec_module(package)
    from concept_forge.nodes import headless

    sys.exit(headless.main())

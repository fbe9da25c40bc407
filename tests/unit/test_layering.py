"""docs/DESIGN.md's layering: `trainers/` is plain torch and never imports ComfyUI."""

import ast
from pathlib import Path

import concept_forge
from concept_forge import trainers

ROOT = Path(concept_forge.__file__).parent
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "node_helpers", "latent_preview"}


def imported_roots(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_trainers_import_no_comfyui_module():
    offenders = {str(p.relative_to(ROOT)): sorted(set(imported_roots(p)) & COMFY_MODULES)
                 for p in (ROOT / "trainers").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_package_version_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{trainers.__version__}"' in text

"""The shipped UI-format workflows for the server tier: as API prompts, and edited by widget name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from concept_forge.nodes.demo_families import FAMILY_DEMO_FILES
from concept_forge.nodes.headless import apply_overrides, demo_overrides, merge_overrides
from concept_forge.nodes.workflow_api import widgets, workflow_to_prompt

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
# the flow families' workflows: their small demo models are built by the headless runner's --demo, which a server
# cannot do (the stock loaders build these families at full size), so the runner's tests run them
FAMILY_WORKFLOWS = [p for p in WORKFLOWS if p.stem in {f"learn_concept_{f}" for f in FAMILY_DEMO_FILES}]


def api_prompt(path: Path, object_info: dict[str, Any], **changes: dict[str, Any]) -> dict[str, Any]:
    """The API prompt of a shipped workflow, on the demo checkpoint and images, with `changes` by node type or id."""
    prompt = workflow_to_prompt(json.loads(path.read_text()), lambda kind: (object_info.get(kind) or {}).get("input"))
    apply_overrides(prompt, merge_overrides(demo_overrides(prompt), changes), [])
    return prompt


def with_widgets(workflow: dict[str, Any], object_info: dict[str, Any],
                 changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of `workflow` whose nodes of each type in `changes` get the given widget values."""
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        values = changes.get(node["type"])
        if not values:
            continue
        position = 0
        for widget in widgets(object_info[node["type"]]["input"]):
            if widget.name in values:
                node["widgets_values"][position] = values[widget.name]
            position += 1 + widget.extra_values
    return workflow


def demo_images(workflow: dict[str, Any], images: tuple[str, ...]) -> dict[str, Any]:
    """The Load Image nodes, in id order, pointed at the demo images."""
    workflow = copy.deepcopy(workflow)
    loaders = sorted((n for n in workflow["nodes"] if n["type"] == "LoadImage"), key=lambda n: n["id"])
    for i, node in enumerate(loaders):
        node["widgets_values"][0] = images[i % len(images)]
    return workflow

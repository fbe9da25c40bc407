"""Workflow files (the UI format the frontend saves and `example_workflows/` ships) → the API prompt the executor
runs, as the frontend's graph-to-prompt does: links become `[node id, output slot]`, widget values are matched to
the node's widget inputs in definition order (a seed's "control after generate" value and an image upload button
take a slot of their own), notes are dropped, reroutes and bypassed nodes are passed through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


@dataclass(frozen=True)
class Widget:
    name: str
    extra_values: int  # values the frontend stores after this widget's own (control_after_generate, upload)


def widgets(input_types: Mapping[str, Any]) -> list[Widget]:
    """The widget inputs of a node class's INPUT_TYPES(), in the order their values are saved."""
    out = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            is_widget = isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES
            if not is_widget or options.get("forceInput"):
                continue
            control = options.get("control_after_generate",
                                  str(kind) == "INT" and name in ("seed", "noise_seed"))
            upload = any(options.get(k) for k in ("image_upload", "video_upload", "audio_upload"))
            out.append(Widget(name, int(bool(control)) + int(upload)))
    return out


def is_api_prompt(workflow: Mapping[str, Any]) -> bool:
    return "nodes" not in workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


InputTypes = Callable[[str], "Mapping[str, Any] | None"]  # node type → its INPUT_TYPES(), None if not installed


def workflow_to_prompt(workflow: Mapping[str, Any], input_types: InputTypes) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to an API prompt.

    Args:
        workflow (`Mapping`): the saved workflow.
        input_types (`InputTypes`): the input definitions of a node type, from the node classes or from the
            server's /object_info.

    Raises:
        ValueError: a node type is not installed, or the widget values do not fit the node's inputs.
    """
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(link[0]): link for link in workflow.get("links", [])}  # id, from node, from slot, to node, to slot

    def source(link_id: int) -> list[Any] | None:
        """The real [node, slot] behind a link, through reroutes and bypassed nodes."""
        _, node_id, slot, *_ = links[link_id]
        node = nodes[int(node_id)]
        if node["type"] == "Reroute" or node.get("mode") == BYPASSED:
            wanted = node["outputs"][slot]["type"] if node.get("outputs") else None
            for item in node.get("inputs", []):
                if item.get("link") is not None and (node["type"] == "Reroute" or item.get("type") == wanted):
                    return source(int(item["link"]))
            return None
        if node.get("mode") == MUTED:
            return None
        return [str(node_id), slot]

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        definition = input_types(kind)
        if definition is None:
            raise ValueError(f"node {node_id} is a {kind!r}, which is not installed")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values") or []
        spec = widgets(definition)
        if isinstance(values, dict):
            inputs.update({w.name: values[w.name] for w in spec if w.name in values})
        else:
            position = 0
            for widget in spec:
                if position >= len(values):
                    break
                inputs[widget.name] = values[position]
                position += 1 + widget.extra_values
        for item in node.get("inputs", []):
            if item.get("link") is None:
                continue
            origin = nodes[int(links[int(item["link"])][1])]
            if origin["type"] == "PrimitiveNode":
                continue  # the value is already in this node's widget values
            linked = source(int(item["link"]))
            if linked is not None:
                inputs[item["name"]] = linked
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt

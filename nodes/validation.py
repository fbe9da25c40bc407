"""Input checks for the inputs a node's `validate_inputs` takes.

ComfyUI checks an input against its schema (type, min/max, the list of a combo) only when the node's
`validate_inputs` does not take it, and checks none at all when `validate_inputs` has `**kwargs`. So every
`validate_inputs` here names exactly the inputs it needs and runs `schema_problem` on them first: the schema's own
limits, plus what ComfyUI's checks let through (NaN, which compares false with every bound; a value of another
type, which an API client can send).
"""

from __future__ import annotations

import math
from typing import Any

from comfy_api.v0_0_2 import io


def schema_problem(node_class: Any, node: str, **values: Any) -> str | None:
    """What is wrong with `values` (input id → value as sent) by `node_class`'s schema, or None."""
    specs = {spec.id: spec for spec in node_class.define_schema().inputs}
    for key, value in values.items():
        spec = specs[key]
        problem = _problem(spec, value)
        if problem:
            return f"{node}: {key} {problem}."
    return None


def _problem(spec: Any, value: Any) -> str | None:
    if isinstance(spec, io.Combo.Input):
        if value not in spec.options:
            shown = ", ".join(map(str, spec.options[:12])) + (", ..." if len(spec.options) > 12 else "")
            return f"is {value!r}, which is not one of its choices ({shown})"
        return None
    if isinstance(spec, io.String.Input):
        return None if isinstance(value, str) else f"must be text, got {value!r}"
    if isinstance(spec, io.Boolean.Input):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"is {value}; give a finite number"
        if isinstance(spec, io.Int.Input) and not float(value).is_integer():
            return f"must be a whole number, got {value}"
        low = -math.inf if spec.min is None else spec.min
        high = math.inf if spec.max is None else spec.max
        if not low <= value <= high:
            return f"is {value:g}, outside its range {low:g} to {high:g}"
    return None

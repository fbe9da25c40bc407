"""README's Nodes table names every input and output of every node, optional inputs in italics."""

import asyncio
import re
from pathlib import Path

from comfy_tier import require_comfyui

require_comfyui()

from concept_forge.nodes.extension import ConceptForgeExtension  # noqa: E402
from concept_forge.nodes.paths import register_model_folders  # noqa: E402

README = Path(__file__).resolve().parents[3] / "README.md"


def table_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in README.read_text().split("## Nodes", 1)[1].split("\n### ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("**"):
            rows[cells[0].strip("*")] = (cells[1], cells[2])
    return rows


def test_every_node_input_and_output_is_in_the_readme_table(model_folders):
    register_model_folders()
    rows = table_rows()
    for node in asyncio.run(ConceptForgeExtension().get_node_list()):
        schema = node.define_schema()
        assert schema.display_name in rows, f"README's Nodes table has no row for {schema.display_name}"
        inputs, outputs = rows[schema.display_name]
        named = set(re.findall(r"(\*?)`([a-z_]+)`", inputs))
        for spec in schema.inputs:
            expected = ("*" if spec.optional else "", spec.id)
            assert expected in named, f"{schema.display_name}: input {spec.id} is missing or wrongly marked"
        assert len(named) == len(schema.inputs), f"{schema.display_name}: the row names inputs the node lacks"
        for spec in schema.outputs:
            assert f"`{spec.display_name or spec.id}`" in outputs, f"{schema.display_name}: output missing"

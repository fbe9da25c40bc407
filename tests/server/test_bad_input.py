"""Bad input through a real server: the schema's limits hold for every node (no validate_inputs turns ComfyUI's
checks off), and what ComfyUI's checks let through (NaN, values of another type, unlisted choices of inputs a node
validates itself) is refused by the node, naming itself, the input and the fix. Nothing here runs a prompt."""

import pytest
from comfy_tier import require_comfyui

require_comfyui()

from ui_workflow import WORKFLOWS, api_prompt  # noqa: E402

LEARN, SLERP, DTI = (next(p for p in WORKFLOWS if p.stem == stem)
                     for stem in ("learn_concept_ti", "concept_slerp", "learn_concept_dti"))
NAN = float("nan")

CASES = [  # (workflow, node type, input, value, what the refusal says)
    (LEARN, "ConceptForgeLearnConcept", "steps", 10**9, "bigger than max of 100000"),
    (LEARN, "ConceptForgeLearnConcept", "batch_size", 0, "smaller than min of 1"),
    (LEARN, "ConceptForgeLearnConcept", "learning_rate", 1e9, "Learn Concept: learning_rate is 1e+09, outside its "
                                                               "range 0 to 1."),
    (LEARN, "ConceptForgeLearnConcept", "learning_rate", NAN, "Learn Concept: learning_rate is nan; give a finite "
                                                              "number."),
    (LEARN, "ConceptForgeLearnConcept", "method", "foo", "Value not in list"),
    (LEARN, "ConceptForgeLearnConcept", "precision", "foo", "Value not in list"),
    (LEARN, "ConceptForgeLearnConcept", "resolution", 4096, "bigger than max of 2048"),
    (LEARN, "ConceptForgeLearnConcept", "prompts", "foo", "Learn Concept: prompts is 'foo', which is not one of its "
                                                          "choices (object, style, captions)."),
    (LEARN, "ConceptForgeLearnConcept", "name", 123, "Learn Concept: name must be text, got 123."),
    (LEARN, "ConceptForgeTrainingOptions", "gradient_accumulation", 65, "bigger than max of 64"),
    (LEARN, "ConceptForgeSaveConcept", "name", "../evil", "Save Concept"),
    (SLERP, "ConceptForgeConceptSlerp", "t", NAN, "Concept Slerp: t is nan; give a finite number."),
    (SLERP, "ConceptForgeConceptSlerp", "t", 1.5, "Concept Slerp: t is 1.5, outside its range 0 to 1."),
    (SLERP, "ConceptForgeApplyDTIToken", "strength", NAN, "Apply DTI Token: strength is nan; give a finite number."),
    (SLERP, "ConceptForgeApplyDTIToken", "magnitude", "foo", "Value not in list"),
    (DTI, "ConceptForgeDTIOptions", "kappa", NAN, "DTI Options: kappa is nan; give a finite number."),
    (DTI, "ConceptForgeDTIOptions", "beta", 1.0, "bigger than max of 0.9999"),
]


@pytest.mark.parametrize(("workflow", "node", "name", "value", "message"), CASES,
                         ids=[f"{c[1].removeprefix('ConceptForge')}.{c[2]}={c[3]!r}" for c in CASES])
def test_the_server_refuses_bad_input_naming_node_input_and_fix(server, object_info, workflow, node, name, value,
                                                                message):
    prompt = api_prompt(workflow, object_info)
    target = next(k for k, v in prompt.items() if v["class_type"] == node)
    prompt[target]["inputs"][name] = value
    errors = server.refusal(prompt)
    assert any(message in error for error in errors), errors


def test_every_float_input_of_every_node_refuses_nan(server, object_info):
    checked = set()
    for workflow in WORKFLOWS:  # every node is in a shipped workflow (test_workflows checks that)
        prompt = api_prompt(workflow, object_info)
        for node_id, node in prompt.items():
            kind = node["class_type"]
            spec = object_info[kind]["input"]
            floats = [n for section in ("required", "optional") for n, s in spec.get(section, {}).items()
                      if s[0] == "FLOAT" and n in node["inputs"]]
            for name in floats if kind.startswith("ConceptForge") and kind not in checked else ():
                bad = {**prompt, node_id: {**node, "inputs": {**node["inputs"], name: NAN}}}
                errors = server.refusal(bad)
                assert any(f"{name} is nan; give a finite number." in e for e in errors), (kind, name, errors)
                checked.add(kind)
    assert len(checked) >= 8  # Learn Concept, Tuning Encoder, Slerp, Apply DTI, 3 options nodes, CatVersion Residual

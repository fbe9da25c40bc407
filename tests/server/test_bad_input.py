"""Bad input through a real server: the schema's limits hold for every node (no validate_inputs turns ComfyUI's
checks off), and what ComfyUI's checks let through (NaN, values of another type, unlisted choices of inputs a node
validates itself) is refused by the node, naming itself, the input and the fix. Nothing here runs a prompt."""

import pytest
from comfy_tier import require_comfyui

require_comfyui()

from ui_workflow import WORKFLOWS, api_prompt  # noqa: E402

LEARN, SLERP, DTI, TOOLS = (next(p for p in WORKFLOWS if p.stem == stem)
                            for stem in ("learn_concept_ti", "concept_slerp", "learn_concept_dti", "concept_tools"))
NAN = float("nan")


def through(prompt, target, object_info):
    """`prompt` without the outputs that do not depend on node `target`: ComfyUI runs the valid outputs of a
    prompt and drops the others, so a refusal shows only when every output passes through the bad node."""
    def ancestors(node_id, seen):
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and value[0] not in seen:
                seen.add(value[0])
                ancestors(value[0], seen)
        return seen

    return {k: v for k, v in prompt.items()
            if not object_info[v["class_type"]].get("output_node") or k == target or target in ancestors(k, set())}

CASES = [  # (workflow, node type, input, value, what the refusal says)
    (LEARN, "ConceptForgeLearnConcept", "steps", 10**9, "bigger than max of 100000"),
    (LEARN, "ConceptForgeLearnConcept", "batch_size", 0, "smaller than min of 1"),
    (LEARN, "ConceptForgeLearnConcept", "learning_rate", 1e9, "Learn Concept: learning_rate is 1e+09, outside its "
                                                               "range 0 to 1."),
    (LEARN, "ConceptForgeLearnConcept", "learning_rate", NAN, "Learn Concept: learning_rate is nan; give a finite "
                                                              "number."),
    (LEARN, "ConceptForgeLearnConcept", "method", "foo", "Learn Concept: method is 'foo', which is not one of its "
                                                         "choices (ti, dti, batex, catversion)."),
    (LEARN, "ConceptForgeLearnConcept", "precision", "foo", "Learn Concept: precision is 'foo', which is not one"),
    (LEARN, "ConceptForgeLearnConcept", "resolution", 4096, "bigger than max of 2048"),
    (LEARN, "ConceptForgeLearnConcept", "prompts", "foo", "Learn Concept: prompts is 'foo', which is not one of its "
                                                          "choices (object, style, captions)."),
    (LEARN, "ConceptForgeLearnConcept", "name", "my dog", "Learn Concept: 'my dog' may only contain letters"),
    (LEARN, "ConceptForgeTrainingOptions", "gradient_accumulation", 65, "bigger than max of 64"),
    (LEARN, "ConceptForgeLearnConcept", "precision", None, "Learn Concept: precision is None, which is not one of"),
    (TOOLS, "ConceptForgeLoadConcept", "file", None, "Load Concept: None was not found"),
    (LEARN, "ConceptForgeSaveConcept", "name", "CON", "Save Concept: 'CON' is a name Windows cannot give a file"),
    (LEARN, "ConceptForgeSaveConcept", "name", "../evil", "Save Concept"),
    (SLERP, "ConceptForgeConceptSlerp", "t", NAN, "Concept Slerp: t is nan; give a finite number."),
    (SLERP, "ConceptForgeConceptSlerp", "t", 1.5, "Concept Slerp: t is 1.5, outside its range 0 to 1."),
    (SLERP, "ConceptForgeApplyDTIToken", "strength", NAN, "Apply DTI Token: strength is nan; give a finite number."),
    (SLERP, "ConceptForgeApplyDTIToken", "magnitude", "foo", "Apply DTI Token: magnitude is 'foo', which is not"),
    (DTI, "ConceptForgeDTIOptions", "kappa", NAN, "DTI Options: kappa is nan; give a finite number."),
    (DTI, "ConceptForgeDTIOptions", "beta", 1.0, "DTI Options: beta is 1, outside its range 0 to 0.9999."),
]


@pytest.mark.parametrize(("workflow", "node", "name", "value", "message"), CASES,
                         ids=[f"{c[1].removeprefix('ConceptForge')}.{c[2]}={c[3]!r}" for c in CASES])
def test_the_server_refuses_bad_input_naming_node_input_and_fix(server, object_info, workflow, node, name, value,
                                                                message):
    prompt = api_prompt(workflow, object_info)
    target = next(k for k, v in prompt.items() if v["class_type"] == node)
    prompt[target]["inputs"][name] = value
    errors = server.refusal(through(prompt, target, object_info))
    assert any(message in error for error in errors), errors


def test_every_float_and_choice_input_of_every_node_refuses_what_its_schema_does_not_allow(server, object_info):
    """NaN passes every min/max comparison, and ComfyUI 0.3.64 checks no V3 combo: each node must refuse both."""
    checked = set()
    for workflow in WORKFLOWS:  # every node is in a shipped workflow (test_workflows checks that)
        prompt = api_prompt(workflow, object_info)
        for node_id, node in prompt.items():
            kind = node["class_type"]
            if not kind.startswith("ConceptForge") or kind in checked:
                continue
            spec = object_info[kind]["input"]
            for name, (kind_of_input, *_) in ((n, s) for section in ("required", "optional")
                                              for n, s in spec.get(section, {}).items()):
                if name not in node["inputs"] or isinstance(node["inputs"][name], list):
                    continue  # absent or linked
                bad_value, message = {"FLOAT": (NAN, f"{name} is nan; give a finite number."),
                                      "COMBO": ("no such choice", f"{name} is 'no such choice', which is not one of "
                                                                  "its choices")}.get(kind_of_input, (None, None))
                if kind_of_input == "COMBO" and name == "file":
                    bad_value, message = "embeddings/../../secrets.pt", "was not found"
                if bad_value is None:
                    continue
                bad = {**prompt, node_id: {**node, "inputs": {**node["inputs"], name: bad_value}}}
                try:
                    errors = server.refusal(through(bad, node_id, object_info))
                except AssertionError as e:
                    raise AssertionError(f"{kind}.{name} = {bad_value!r}: {e}") from None
                assert any(message in e for e in errors), (kind, name, errors)
                checked.add(kind)
    with_float_or_choice = ("LearnConcept", "TrainingOptions", "TuningEncoder", "TuningEncoderDualPath",
                            "ApplyDTIToken", "ConceptSlerp", "DTIOptions", "BaTexOptions", "CatVersionOptions",
                            "CatVersionResidual", "LoadConcept")
    assert checked == {f"ConceptForge{n}" for n in with_float_or_choice}

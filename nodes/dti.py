"""Directional Textual Inversion nodes: DTI Options, Apply DTI Token and Concept Slerp (docs/METHODS.md §3)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ..trainers.concept import ENCODER_NAMES, Concept, name_problem
from ..trainers.methods import dti
from ..trainers.slerp import slerp_concepts
from .apply import apply_concepts, check_concept_fits, encoder_tables
from .types import CATEGORY, OPTIONS_CATEGORY, ConceptIO, MethodOptionsIO
from .validation import schema_problem

APPLY = "Apply DTI Token"
SLERP = "Concept Slerp"
MAGNITUDE_MODES = ["keep", "in-distribution"]


def prepared_for_clip(concept: Concept, clip: Any, strength: float, magnitude: str) -> tuple[Concept, str]:
    """The concept as Apply DTI Token applies it, and a line per encoder saying what was applied.

    "in-distribution" puts every vector on the CLIP's own vocabulary norm m* (the DTI paper's fix for the norm
    inflation of TI embeddings); `strength` then scales the length.
    """
    vectors, lines = {}, []
    tables = encoder_tables(clip)
    for key, v in concept.vectors.items():
        if key not in tables:  # an encoder this checkpoint lacks (SD 3.5 without T5) never sees them
            vectors[key] = v
            continue
        m_star = dti.vocabulary_magnitude(tables[key], "mean")
        if magnitude == "in-distribution":
            v = F.normalize(v, dim=-1) * m_star
        vectors[key] = v * strength
        norms = ", ".join(f"{n:.3f}" for n in vectors[key].norm(dim=-1).tolist())
        lines.append(f"{ENCODER_NAMES[key]}: {len(v)} vector(s), norm {norms} (vocabulary mean {m_star:.3f})")
    return Concept(concept.name, concept.method, concept.arch, vectors, concept.state, concept.tensors,
                   concept.provenance), "\n".join(lines)


class DTIOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeDTIOptions",
            display_name="DTI Options",
            category=OPTIONS_CATEGORY,
            description="Directional Textual Inversion settings for Learn Concept (method dti).",
            inputs=[
                io.Float.Input("kappa", default=1e-4, min=0.0, max=10.0, step=1e-5, tooltip="Concentration of the "
                               "von Mises–Fisher prior pulling the direction toward the init word. 0 turns the "
                               "prior off; the paper uses 1e-4 (SDXL)."),
                io.Combo.Input("magnitude", options=["mean", "min", "max", "custom"], default="mean",
                               tooltip="The fixed vector length m*: the mean (paper), min or max norm of the text "
                               "encoder's vocabulary, per encoder, or the custom value below."),
                io.Float.Input("magnitude_value", default=0.4, min=1e-4, max=100.0, step=0.001, tooltip="The length "
                               "used when magnitude is custom; ignored otherwise."),
                io.Float.Input("beta", default=0.0, min=0.0, max=0.9999, step=0.01, tooltip="Averaging of the step "
                               "size over steps. 0 (paper) makes every step exactly the learning rate long."),
                io.Boolean.Input("train_magnitude", default=False, tooltip="Also learn the length (off in the "
                                 "paper). This pack then trains log m with Adam at the same learning rate."),
            ],
            outputs=[MethodOptionsIO.Output("method_options", display_name="method_options",
                                            tooltip="Connect to Learn Concept with method dti.")],
        )

    @classmethod
    def validate_inputs(cls, kappa: float = 1e-4, magnitude: str = "mean", magnitude_value: float = 0.4,
                        beta: float = 0.0) -> bool | str:
        return schema_problem(cls, "DTI Options", kappa=kappa, magnitude=magnitude, magnitude_value=magnitude_value,
                              beta=beta) or True

    @classmethod
    def execute(cls, kappa, magnitude, magnitude_value, beta, train_magnitude) -> io.NodeOutput:
        mode = magnitude_value if magnitude == "custom" else magnitude
        return io.NodeOutput(dti.Options(kappa=kappa, magnitude=mode, beta=beta, train_magnitude=train_magnitude))


class ApplyDTIToken(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeApplyDTIToken",
            display_name=APPLY,
            category=CATEGORY,
            description="Makes embedding:<name> mean the concept on the returned CLIP — any token concept, from "
                        "Learn Concept, Load Concept or Concept Slerp.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint the concept was learned on."),
                ConceptIO.Input("concept", tooltip="A DTI, TI or BaTex concept, or any loaded embedding."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, tooltip="Scales the vectors' "
                               "length. 1 applies the concept as it is."),
                io.Combo.Input("magnitude", options=MAGNITUDE_MODES, default="keep", tooltip="keep: the vectors as "
                               "learned. in-distribution: every vector rescaled to the mean norm of this CLIP's "
                               "vocabulary, DTI's fix for over-long TI embeddings that drown the rest of a prompt."),
            ],
            outputs=[io.Clip.Output("concept_clip", display_name="clip",
                                    tooltip="The CLIP to connect to CLIP Text Encode.")],
        )

    @classmethod
    def validate_inputs(cls, strength: float = 1.0, magnitude: str = "keep") -> bool | str:
        return schema_problem(cls, APPLY, strength=strength, magnitude=magnitude) or True

    @classmethod
    def execute(cls, clip, concept, strength, magnitude) -> io.NodeOutput:
        check_concept_fits(concept, clip, APPLY)
        if not concept.vectors:
            raise ValueError(f"{APPLY}: '{concept.name}' is a {concept.method} concept without token vectors; "
                             "use CatVersion Residual for CatVersion concepts.")
        prepared, report = prepared_for_clip(concept, clip, strength, magnitude)
        applied = apply_concepts(clip, [prepared], APPLY)
        return io.NodeOutput(applied, ui=ui.PreviewText(f"embedding:{concept.name} ({concept.method})\n{report}"))


class ConceptSlerp(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeConceptSlerp",
            display_name=SLERP,
            category=CATEGORY,
            description="Blends two concepts along the sphere: directions by spherical interpolation, lengths "
                        "linearly (DTI concepts stay at the vocabulary's norm).",
            inputs=[
                ConceptIO.Input("concept_a", tooltip="The concept at t = 0."),
                ConceptIO.Input("concept_b", tooltip="The concept at t = 1; same checkpoint type and vector count."),
                io.Float.Input("t", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="0 gives concept a, 1 gives "
                               "concept b, values between turn from one to the other."),
                io.String.Input("name", default="blend", tooltip="The new concept's name (embedding:<name>)."),
            ],
            outputs=[ConceptIO.Output("concept", display_name="concept",
                                      tooltip="A normal concept: save it, apply it, slerp it again.")],
        )

    @classmethod
    def validate_inputs(cls, name: str = "blend", t: float = 0.5) -> bool | str:
        problem = schema_problem(cls, SLERP, name=name, t=t)
        if problem:
            return problem
        problem = name_problem(name) if name is not None else None  # None: linked, checked when the node runs
        return f"{SLERP}: {problem}." if problem else True

    @classmethod
    def execute(cls, concept_a, concept_b, t, name) -> io.NodeOutput:
        try:
            blended = slerp_concepts(concept_a, concept_b, t, name)
        except ValueError as e:
            raise ValueError(f"{SLERP}: {e}") from e
        return io.NodeOutput(blended)


NODES = [ApplyDTIToken, ConceptSlerp, DTIOptions]

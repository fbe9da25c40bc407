"""BaTex Options: the settings of Learn Concept's method batex (docs/METHODS.md §4)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..trainers.methods import batex
from .types import OPTIONS_CATEGORY, MethodOptionsIO
from .validation import schema_problem


class BaTexOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeBaTexOptions",
            display_name="BaTex Options",
            category=OPTIONS_CATEGORY,
            description="BaTex settings for Learn Concept (method batex): the concept is learned as a weighted sum "
                        "of M vocabulary rows close to the init word.",
            inputs=[
                io.Int.Input("basis_size", default=720, min=1, max=262144, tooltip="M, the vocabulary rows the "
                             "concept is built from (paper: 720). Larger gives more freedom; once the rows span the "
                             "whole embedding width, BaTex can reach any vector, as TI does."),
                io.Combo.Input("ranking", options=list(batex.RANKINGS), default="dot", tooltip="How rows are ranked "
                               "against the init word's embedding: dot (paper), cosine (angle only), l2 (nearest "
                               "first) or random (the init word plus random rows, the paper's ablation)."),
                io.String.Input("second_token", default="", tooltip="A single-token word forced into the basis "
                                "(the top M − 1 rows plus this one). Empty (default) adds none."),
                io.Int.Input("target_rank", default=0, min=0, max=4096, tooltip="Grow M until the basis spans this "
                             "many dimensions, rank(B). 0 (default) keeps M as set; at most the encoder's width."),
                io.Float.Input("sum_to_one", default=0.0, min=0.0, max=100.0, step=0.001, tooltip="λ of the "
                               "penalty λ·|1 − Σw| that keeps the weights summing to one. 0 (paper default) turns "
                               "it off."),
                io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001, tooltip="AdamW's weight "
                               "decay on the weights w (paper: 0.01). 0 turns it off."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seeds the random ranking; "
                             "ignored by the other rankings. Default 0."),
            ],
            outputs=[MethodOptionsIO.Output("method_options", display_name="method_options",
                                            tooltip="Connect to Learn Concept with method batex.")],
        )

    @classmethod
    def validate_inputs(cls, ranking: str = "dot", sum_to_one: float = 0.0, weight_decay: float = 0.01) -> bool | str:
        return schema_problem(cls, "BaTex Options", ranking=ranking, sum_to_one=sum_to_one,
                              weight_decay=weight_decay) or True

    @classmethod
    def execute(cls, basis_size, ranking, second_token, target_rank, sum_to_one, weight_decay,
                seed) -> io.NodeOutput:
        try:
            options = batex.Options(basis_size=basis_size, ranking=ranking, second_token=second_token.strip(),
                                    target_rank=target_rank, sum_to_one=sum_to_one, weight_decay=weight_decay,
                                    seed=seed)
        except ValueError as e:
            raise ValueError(f"BaTex Options: {e}") from e
        return io.NodeOutput(options)


NODES = [BaTexOptions]

"""Concept Info: what a concept is, how it was made, and how its vectors sit in a CLIP's vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ..trainers.concept import ARCH_LABELS, ENCODER_NAMES, Concept
from .apply import encoder_tables
from .host import clip_arch, describe_clip
from .types import CATEGORY, ConceptIO

INFO = "Concept Info"
NEAREST = 5
PROVENANCE_FIELDS = ("init_word", "steps", "learning_rate", "batch_size", "resolution", "seed", "images", "prompts",
                     "checkpoint", "final_loss", "heldout_loss_before", "heldout_loss_after", "pack_version",
                     "created_at", "source_file", "slerp")


def token_text(tokenizer: Any, token: int) -> str:
    word = tokenizer.inv_vocab.get(int(token), f"#{token}")
    return word[:-4] if word.endswith("</w>") else word + "…"  # "</w>" ends a word; others continue into the next


def vocabulary_lines(concept: Concept, clip: Any) -> list[str]:
    """Per encoder and vector: the norm against the vocabulary's norms, and the nearest tokens by cosine."""
    lines = []
    tables = encoder_tables(clip)
    for key, vectors in concept.vectors.items():
        if key not in tables:  # an encoder this checkpoint lacks
            continue
        table = tables[key].float()
        norms = table.norm(dim=-1)
        norms = norms[norms > 0]
        tokenizer = getattr(clip.tokenizer, ENCODER_NAMES[key])
        lines.append(f"{ENCODER_NAMES[key]}: vocabulary norms mean {norms.mean():.3f} (min {norms.min():.3f}, "
                     f"max {norms.max():.3f})")
        similarity = F.normalize(vectors.to(table), dim=-1) @ F.normalize(table, dim=-1).T        # [n, V]
        for i, (vector, row) in enumerate(zip(vectors, similarity, strict=True), start=1):
            norm = float(vector.norm())
            share = float((norms < norm).float().mean()) * 100
            values, ids = row.topk(NEAREST)
            nearest = ", ".join(f"{token_text(tokenizer, t)} ({v:.2f})" for v, t in zip(values.tolist(), ids.tolist(),
                                                                                        strict=True))
            lines.append(f"  vector {i}: norm {norm:.3f}, longer than {share:.0f}% of the vocabulary; nearest: "
                         f"{nearest}")
    return lines


def state_lines(concept: Concept, clip: Any | None) -> list[str]:
    s = concept.state
    if concept.method == "dti":
        shells = ", ".join(f"{m:.3f} ({ENCODER_NAMES[k]})" for k, m in s["magnitude"].items())
        return [f"DTI: length m* = {shells}, magnitude {s.get('magnitude_mode')}, κ = {s.get('kappa')}"]
    if concept.method == "catversion":
        layers = ", ".join(f"clip_{k} layers {min(v)}–{max(v)}" for k, v in s["layers"].items())
        return [f"CatVersion: {layers}, {s['tokens']} token(s) per layer, mask bias {s['mask_bias']}, class word "
                f"'{s['class_word']}'"]
    if concept.method == "batex":
        lines = [f"BaTex: basis ranked by {s['ranking']}, rank(B) "
                 + ", ".join(f"{'/'.join(map(str, r))} ({ENCODER_NAMES[k]})" for k, r in s["rank"].items())]
        for key, bases in s["bases"].items():
            tokenizer = getattr(clip.tokenizer, ENCODER_NAMES[key]) if clip is not None else None
            for i, basis in enumerate(bases, start=1):
                w = torch.tensor(basis["w"])
                top = w.abs().topk(min(NEAREST, len(w))).indices.tolist()
                words = ", ".join(f"{token_text(tokenizer, basis['ids'][j]) if tokenizer else basis['ids'][j]} "
                                  f"({float(w[j]):+.3f})" for j in top)
                lines.append(f"  {ENCODER_NAMES[key]} vector {i}: M = {len(w)}, largest weights: {words}")
        return lines
    return []


def describe(concept: Concept, clip: Any | None) -> str:
    what = "residual keys and values" if concept.method == "catversion" else \
        f"{concept.num_vectors} vector(s) per encoder ({', '.join(ENCODER_NAMES[k] for k in concept.vectors)})"
    lines = [f"{concept.name}: {concept.method.upper()} concept for {ARCH_LABELS[concept.arch]}, {what}."]
    if clip is not None and concept.vectors:
        widths = {k: int(t.shape[1]) for k, t in encoder_tables(clip).items()}
        other = [f"{ENCODER_NAMES[k]} {v.shape[-1]}-wide, this CLIP's {widths.get(k)}"
                 for k, v in concept.vectors.items() if k in widths and widths[k] != v.shape[-1]]
        if clip_arch(clip) != concept.arch:
            lines.append(f"(This CLIP is {describe_clip(clip)}, so the vocabulary comparison is skipped.)")
        elif other:
            lines.append(f"(The vectors belong to another model ({'; '.join(other)}), so the vocabulary comparison "
                         "is skipped.)")
        else:
            lines += vocabulary_lines(concept, clip)
    try:
        lines += state_lines(concept, clip)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a file's state is untrusted metadata
        lines.append(f"(The {concept.method} state in this concept is incomplete, so it is not shown.)")
    p = concept.provenance
    made = [f"{k.replace('_', ' ')}: {p[k]}" for k in PROVENANCE_FIELDS if k in p and p[k] is not None]
    if "checkpoint_sha256" in p:
        made.append(f"checkpoint sha256: {p['checkpoint_sha256'][:12]}…")
    lines.append("Made with " + "; ".join(made) if made else "No provenance recorded.")
    return "\n".join(lines)


class ConceptInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptForgeConceptInfo",
            display_name=INFO,
            category=CATEGORY,
            description="Shows a concept's method, vectors, norms against the vocabulary, nearest words, method "
                        "state and how it was made.",
            inputs=[
                ConceptIO.Input("concept", tooltip="Any concept: learned, loaded or blended."),
                io.Clip.Input("clip", optional=True, tooltip="The CLIP to compare against (its vocabulary's norms "
                              "and nearest words). Without it only the concept itself is described."),
            ],
            outputs=[io.String.Output("info", display_name="info", tooltip="The same text, for saving or display.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, concept, clip=None) -> io.NodeOutput:
        text = describe(concept, clip)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [ConceptInfo]

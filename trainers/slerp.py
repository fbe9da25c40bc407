"""Spherical interpolation between two token concepts (DTI project page; docs/METHODS.md §3a "Slerp").

Directions move along the great circle, per encoder and per vector: v(t) = [sin((1−t)Ω)·a + sin(tΩ)·b] / sin Ω.
Magnitudes are interpolated linearly, so two DTI concepts of one model, both at the vocabulary's norm m*, stay
on that in-distribution shell; other concepts blend their norms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .concept import ARCH_LABELS, Concept

PARALLEL = 1e-6  # |sin Ω| below this: the great circle is not defined by a and b alone


def slerp_directions(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Row-wise slerp of unit vectors [n, d]; the angle to `a` is t·Ω.

    Where a and b are (anti)parallel it falls back to the normalised lerp. Exactly halfway between opposite
    directions that lerp vanishes; there the path turns through a direction orthogonal to a.
    """
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = torch.where(sin.abs() < PARALLEL, torch.ones_like(sin), sin)
    great_circle = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    lerp = (1 - t) * a + t * b
    degenerate = lerp.norm(dim=-1, keepdim=True) < PARALLEL
    if bool(degenerate.any()):
        lerp = torch.where(degenerate, _orthogonal(a), lerp)
    return torch.where(sin.abs() < PARALLEL, F.normalize(lerp, dim=-1), great_circle)


def _orthogonal(a: Tensor) -> Tensor:
    """A deterministic unit vector orthogonal to each row of a: the least aligned basis vector, made orthogonal."""
    basis = F.one_hot(a.abs().argmin(dim=-1), a.shape[-1]).to(a)
    return F.normalize(basis - (basis * a).sum(-1, keepdim=True) * a, dim=-1)


def slerp_concepts(a: Concept, b: Concept, t: float, name: str) -> Concept:
    """The concept at `t` ∈ [0, 1] on the way from `a` to `b`; t = 0 and t = 1 give their vectors exactly.

    Raises:
        ValueError: the concepts are not both token concepts, or differ in architecture or vector count.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}.")
    for c in (a, b):
        if not c.vectors:
            raise ValueError(f"concept '{c.name}' is a {c.method} concept without token vectors; only token "
                             "concepts (TI, DTI, BaTex, embeddings) can be interpolated.")
    if a.arch != b.arch:
        raise ValueError(f"concept '{a.name}' is {ARCH_LABELS[a.arch]} but '{b.name}' is {ARCH_LABELS[b.arch]}; "
                         "both must come from the same kind of checkpoint.")
    if a.num_vectors != b.num_vectors:
        raise ValueError(f"concept '{a.name}' has {a.num_vectors} vector(s) per encoder but '{b.name}' has "
                         f"{b.num_vectors}; learn them with the same number of vectors.")
    vectors = {}
    for key, va in a.vectors.items():
        vb = b.vectors[key]
        if t == 0.0 or t == 1.0:
            vectors[key] = (va if t == 0.0 else vb).clone()
            continue
        direction = slerp_directions(F.normalize(va, dim=-1), F.normalize(vb, dim=-1), t)
        norm = (1 - t) * va.norm(dim=-1, keepdim=True) + t * vb.norm(dim=-1, keepdim=True)      # [n, 1]
        vectors[key] = direction * norm
    both_dti = a.method == b.method == "dti"
    state: dict[str, Any] = {}
    if both_dti:
        state = {"magnitude": {k: (1 - t) * a.state["magnitude"][k] + t * b.state["magnitude"][k]
                               for k in a.vectors},
                 "magnitude_mode": a.state.get("magnitude_mode") if a.state.get("magnitude_mode") ==
                 b.state.get("magnitude_mode") else "interpolated"}
    return Concept(name=name, method="dti" if both_dti else "ti", arch=a.arch, vectors=vectors, state=state,
                   provenance={"slerp": {"a": a.name, "b": b.name, "t": t}})

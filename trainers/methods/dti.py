"""Directional Textual Inversion (Kim et al., arXiv 2512.13672; docs/METHODS.md §3; official code kunheek/dti).

Each learned vector is m*·v with ‖v‖ = 1: the magnitude is pinned to the "in-distribution" norm m* of the
encoder's own vocabulary (its mean row norm, computed at run time per encoder), and only the direction v trains,
by Riemannian SGD on the unit sphere with a von Mises–Fisher prior toward the init word's direction μ.
Follows `SphericalSGD` in the official src/dti/optim.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..concept import ENCODER_NAMES, Arch, Concept, Method, cpu_float
from ..host import Host
from .base import init_vectors

MagnitudeMode = Literal["mean", "min", "max"]


@dataclass(frozen=True)
class Options:
    learning_rate: float = 0.01  # per sample; the loop scales it by batch size: 0.01 × 4 = 0.04 (§3b)
    steps: int = 400             # the SDXL recipe; SD 1.5 and 2.x use it too (not paper-verified)
    flip_p: float = 0.0          # the official launchers train without flips
    kappa: float = 1e-4          # vMF concentration toward the init word's direction; 0 disables the prior
    magnitude: MagnitudeMode | float = "mean"  # m*: the vocabulary's mean/min/max row norm, or a number
    beta: float = 0.0            # EMA of the squared tangent norm; 0 makes every step unit length
    train_magnitude: bool = False  # upstream keeps m* frozen unless asked (this pack then trains log m with Adam)


def vocabulary_magnitude(table: Tensor, mode: MagnitudeMode | float) -> float:
    """m* of an encoder: a statistic of the L2 norms of its non-zero vocabulary rows (official `get_scale_stat`)."""
    if isinstance(mode, (int, float)):
        if not (math.isfinite(mode) and mode > 0):
            raise ValueError(f"magnitude must be positive, got {mode}.")
        return float(mode)
    norms = table.float().norm(dim=-1)
    norms = norms[norms > 0]
    statistics = {"mean": norms.mean, "min": norms.min, "max": norms.max}
    if mode not in statistics:
        raise ValueError(f"magnitude must be mean, min, max or a number, got {mode!r}.")
    return float(statistics[mode]())


def tangent_direction(v: Tensor, grad: Tensor, mu: Tensor, kappa: float) -> Tensor:
    """The descent direction in the tangent space at v, row-wise: the data gradient plus the vMF prior gradient
    −κμ (added before projecting, as upstream does, so κ competes with the raw gradient's size), minus its
    component along v."""
    g = grad - kappa * mu                                                # [n, d]
    return g - (g * v).sum(-1, keepdim=True) * v


class SphericalSGD(torch.optim.Optimizer):
    """Riemannian SGD on the unit sphere for [n, d] parameters whose rows are unit vectors (docs/METHODS.md §3a).

    Each step: tangent gradient g_T; s ← β·s + (1−β)·‖g_T‖², ŝ = s / (1 − β^t); v ← v − lr·g_T / (√ŝ + ε);
    v ← v / ‖v‖. With β = 0 every step is a unit tangent step, a rotation of arctan(lr) per row.
    Params whose group has `sphere=False` (DTI's optional magnitude) take an Adam step instead.
    """

    def __init__(self, params: Iterable[Any], lr: float, kappa: float = 0.0, beta: float = 0.0, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, kappa=kappa, beta=beta, eps=eps, sphere=True, mu=None))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if group["sphere"]:
                    self._sphere_step(p, p.grad, group, group["mu"][i], state)
                else:
                    self._adam_step(p, p.grad, group, state)

    @staticmethod
    def _sphere_step(p: Tensor, grad: Tensor, group: dict[str, Any], mu: Tensor, state: dict[str, Any]) -> None:
        g_t = tangent_direction(p, grad, mu, group["kappa"])                           # [n, d]
        h = (g_t * g_t).sum(-1, keepdim=True)                                             # [n, 1]
        beta, t = group["beta"], state["step"]
        state["ema"] = beta * state.get("ema", torch.zeros_like(h)) + (1 - beta) * h
        scale = (state["ema"] / (1 - beta ** t)).sqrt() + group["eps"]
        p.sub_(group["lr"] * g_t / scale)
        p.div_(p.norm(dim=-1, keepdim=True))                                              # retraction

    @staticmethod
    def _adam_step(p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any], b1: float = 0.9,
                   b2: float = 0.999) -> None:
        t = state["step"]
        state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * grad
        state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * grad ** 2
        p.sub_(group["lr"] * (state["m"] / (1 - b1 ** t)) / ((state["v"] / (1 - b2 ** t)).sqrt() + group["eps"]))


class DirectionalTextualInversion:
    """e = m*·v per encoder and per vector; v starts at, and is pulled toward, the init token's direction μ."""

    name: Method = "dti"

    def __init__(self, init: Mapping[str, Tensor], magnitudes: Mapping[str, float], options: Options = Options()):
        self.options = options
        self.mu = {k: F.normalize(v.detach().float(), dim=-1) for k, v in init.items()}         # [n, d] each
        self.directions = {k: torch.nn.Parameter(mu.clone()) for k, mu in self.mu.items()}
        self.log_magnitudes = {k: torch.nn.Parameter(torch.tensor(math.log(m), device=self.mu[k].device),
                                                     requires_grad=options.train_magnitude)
                               for k, m in magnitudes.items()}

    def magnitudes(self) -> dict[str, float]:
        return {k: float(v.detach().exp()) for k, v in self.log_magnitudes.items()}

    def vectors(self) -> dict[str, Tensor]:
        return {k: self.log_magnitudes[k].exp() * v for k, v in self.directions.items()}

    def parameters(self) -> list[Tensor]:
        params: list[Tensor] = [*self.directions.values()]
        return params + [*self.log_magnitudes.values()] if self.options.train_magnitude else params

    def regularizer(self) -> Tensor | None:
        return None  # the vMF prior acts in the optimizer step, as upstream

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        o = self.options
        groups: list[dict[str, Any]] = [{"params": list(self.directions.values()), "mu": list(self.mu.values())}]
        if o.train_magnitude:
            groups.append({"params": list(self.log_magnitudes.values()), "sphere": False})
        return SphericalSGD(groups, lr=learning_rate, kappa=o.kappa, beta=o.beta)

    def report(self) -> list[str]:
        shells = ", ".join(f"{m:.3f} ({ENCODER_NAMES[k]})" for k, m in self.magnitudes().items())
        return [f"Vector length held at the vocabulary's norm m* = {shells}."]

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        o = self.options
        state = {"magnitude": self.magnitudes(), "magnitude_mode": o.magnitude, "kappa": o.kappa, "beta": o.beta,
                 "train_magnitude": o.train_magnitude,
                 "mu": {k: [[round(float(x), 7) for x in row] for row in mu] for k, mu in self.mu.items()}}
        return Concept(name=name, method="dti", arch=arch, state=state, provenance=dict(provenance),
                       vectors={k: cpu_float(v) for k, v in self.vectors().items()})


def build(host: Host, init_word: str, num_vectors: int, options: Options,
          seed: int = 0) -> DirectionalTextualInversion:
    """DTI starts from the init word's directions; nothing random, so `seed` is unused."""
    magnitudes = {key: vocabulary_magnitude(host.vocabulary(key), options.magnitude) for key in host.encoders}
    return DirectionalTextualInversion(init_vectors(host, init_word, num_vectors), magnitudes, options)

"""A gradient checked against a finite difference, for the host tests of every family."""

import torch


def directional_check(f, v, eps, seed=7):
    """f's gradient at v along a random unit direction, and the central finite difference there."""
    v = v.detach().clone().requires_grad_(True)
    f(v).backward()
    d = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
    d /= d.norm()
    with torch.no_grad():
        numeric = (f(v + eps * d) - f(v - eps * d)) / (2 * eps)
    return float((v.grad * d).sum()), float(numeric)

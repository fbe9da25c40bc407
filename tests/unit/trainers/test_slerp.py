import math

import pytest
import torch
import torch.nn.functional as F
from concept_forge.trainers.concept import Concept
from concept_forge.trainers.slerp import slerp_concepts, slerp_directions


def dti(name, seed, m=0.4, n=2, arch="sdxl"):
    g = torch.Generator().manual_seed(seed)
    widths = {"l": 16, "g": 24} if arch == "sdxl" else {"l": 16}
    vectors = {k: F.normalize(torch.randn(n, w, generator=g), dim=-1) * m for k, w in widths.items()}
    return Concept(name, "dti", arch, vectors, state={"magnitude": {k: m for k in widths}, "magnitude_mode": "mean"})


def angle(u, v):
    return torch.arccos((F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1).clamp(-1, 1))


def test_the_ends_return_the_inputs_exactly():
    a, b = dti("a", 0), dti("b", 1)
    for key in a.vectors:
        assert torch.equal(slerp_concepts(a, b, 0.0, "s").vectors[key], a.vectors[key])
        assert torch.equal(slerp_concepts(a, b, 1.0, "s").vectors[key], b.vectors[key])


@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.9])
def test_the_angle_to_a_is_t_omega_and_the_norm_stays_on_the_shell(t):
    a, b = dti("a", 0), dti("b", 1)
    mid = slerp_concepts(a, b, t, "mid")
    for key in a.vectors:
        omega = angle(a.vectors[key], b.vectors[key])
        assert torch.allclose(angle(a.vectors[key], mid.vectors[key]), t * omega, atol=1e-5)
        assert torch.allclose(angle(mid.vectors[key], b.vectors[key]), (1 - t) * omega, atol=1e-5)
        assert torch.allclose(mid.vectors[key].norm(dim=-1), torch.full((2,), 0.4), rtol=1e-6)
    assert mid.method == "dti" and mid.state["magnitude"]["g"] == pytest.approx(0.4)


def test_slerp_of_a_concept_with_itself_is_itself():
    a = dti("a", 3)
    for t in (0.3, 0.5):
        assert torch.allclose(slerp_concepts(a, a, t, "same").vectors["l"], a.vectors["l"], atol=1e-6)


def test_opposite_directions_fall_back_to_lerp_and_stay_defined_halfway():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.allclose(slerp_directions(a, -a, 0.25), a)  # normalised lerp of a and -a points at a
    halfway = slerp_directions(a, -a, 0.5)
    assert torch.allclose(halfway.norm(), torch.tensor(1.0)) and abs(float((halfway * a).sum())) < 1e-6


def test_ti_concepts_blend_their_norms_linearly():
    a = Concept("a", "ti", "sd1", {"l": torch.tensor([[2.0, 0.0]])})
    b = Concept("b", "ti", "sd1", {"l": torch.tensor([[0.0, 4.0]])})
    mid = slerp_concepts(a, b, 0.5, "mid")
    assert mid.method == "ti" and mid.state == {}
    assert torch.allclose(mid.vectors["l"], torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]) * 3.0, atol=1e-6)
    assert mid.provenance == {"slerp": {"a": "a", "b": "b", "t": 0.5}}


def test_the_result_can_be_slerped_again():
    a, b, c = dti("a", 0), dti("b", 1), dti("c", 2)
    again = slerp_concepts(slerp_concepts(a, b, 0.5, "ab"), c, 0.5, "abc")
    assert again.method == "dti" and torch.allclose(again.vectors["l"].norm(dim=-1), torch.full((2,), 0.4))


@pytest.mark.parametrize("b, message", [
    (dti("x", 1, arch="sd1"), "'a' is SDXL but 'x' is SD 1.x"),
    (dti("y", 1, n=3), "'a' has 2 vector\\(s\\) per encoder but 'y' has 3"),
    (Concept("cv", "catversion", "sdxl", {}), "'cv' is a catversion concept without token vectors"),
])
def test_mismatched_concepts_are_refused_clearly(b, message):
    with pytest.raises(ValueError, match=message):
        slerp_concepts(dti("a", 0), b, 0.5, "s")

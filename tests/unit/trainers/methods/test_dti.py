import math

import pytest
import torch
import torch.nn.functional as F
from concept_forge.trainers.files import read_concept, save_concept
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train
from concept_forge.trainers.methods import create_method
from concept_forge.trainers.methods.dti import Options, SphericalSGD, tangent_direction, vocabulary_magnitude
from concept_forge.trainers.templates import OBJECT_TEMPLATES
from tiny_host import TinyHost, tiny_images


def unit(rows, d, seed):
    return F.normalize(torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_magnitude_is_a_statistic_of_the_nonzero_vocabulary_rows():
    table = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # norms 5, 1 and an unused zero row
    assert vocabulary_magnitude(table, "mean") == pytest.approx(3.0)
    assert vocabulary_magnitude(table, "min") == 1.0 and vocabulary_magnitude(table, "max") == 5.0
    assert vocabulary_magnitude(table, 0.7) == 0.7
    with pytest.raises(ValueError, match="mean, min, max or a number"):
        vocabulary_magnitude(table, "median")
    with pytest.raises(ValueError, match="positive"):
        vocabulary_magnitude(table, -1.0)


def test_tangent_direction_is_orthogonal_to_v():
    v, g, mu = unit(3, 8, 0), torch.randn(3, 8), unit(3, 8, 1)
    assert torch.allclose((tangent_direction(v, g, mu, kappa=0.5) * v).sum(-1), torch.zeros(3), atol=1e-6)


def sphere_step(v, grad, mu, lr, kappa=0.0, beta=0.0, steps=1):
    p = torch.nn.Parameter(v.clone())
    opt = SphericalSGD([{"params": [p], "mu": [mu]}], lr=lr, kappa=kappa, beta=beta)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_a_step_keeps_unit_norm_and_turns_by_atan_lr(beta):
    # with beta = 0 (and at the first step for any beta, thanks to the bias correction) the tangent step has
    # length lr, so the rotation is arctan(lr): 2.29 degrees at DTI's effective 0.04
    v, g = unit(3, 8, 0), torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    v2 = sphere_step(v, g, mu=v, lr=0.04, beta=beta)
    assert torch.allclose(v2.norm(dim=-1), torch.ones(3), atol=1e-6)
    angle = torch.arccos((v * v2).sum(-1).clamp(-1, 1))
    assert torch.allclose(angle, torch.full((3,), math.atan(0.04)), atol=1e-5)


def test_the_step_descends_along_the_negative_tangent_gradient():
    v, g = unit(1, 4, 2), torch.randn(1, 4, generator=torch.Generator().manual_seed(3))
    v2 = sphere_step(v, g, mu=v, lr=0.01)
    tangent = tangent_direction(v, g, v, kappa=0.0)
    assert float(((v2 - v) * tangent).sum()) < 0  # moved against the gradient


def dti_run(arch="sd1", steps=30, on_step=None, **options):
    host = TinyHost(arch)
    method = create_method("dti", host, "dog", 0, Options(**options))
    result = train(method, host, TrainingSet(tiny_images(), list(OBJECT_TEMPLATES)),
                   LoopOptions(steps=steps, learning_rate=0.04, batch_size=2, heldout_draws=16), on_step=on_step)
    return host, method, result


def test_every_vector_keeps_the_vocabulary_norm_at_every_step():
    host = TinyHost("sdxl")
    method = create_method("dti", host, "teddy bear", 0, Options())
    m_star = {key: vocabulary_magnitude(host.vocabulary(key), "mean") for key in host.encoders}
    checked = []

    def check(step, total, loss):
        for key, vectors in method.vectors().items():
            assert torch.allclose(vectors.norm(dim=-1), torch.full((2,), m_star[key]), rtol=1e-4)
        checked.append(step)

    train(method, host, TrainingSet(tiny_images(), list(OBJECT_TEMPLATES)),
          LoopOptions(steps=25, learning_rate=0.04, batch_size=2), on_step=check)
    assert checked == list(range(1, 26))
    assert m_star["l"] != m_star["g"] and method.magnitudes() == pytest.approx(m_star)  # one m* per encoder


def test_dti_lowers_the_heldout_loss_like_ti():
    _, _, result = dti_run(steps=50)
    assert result.heldout_after < result.heldout_before


def test_a_strong_prior_holds_the_direction_near_the_init_word_and_none_lets_it_move():
    def drift(kappa):
        _, method, _ = dti_run(steps=40, kappa=kappa)
        return float((method.directions["l"].detach() * method.mu["l"]).sum(-1).min())

    held, free = drift(kappa=1e4), drift(kappa=0.0)
    assert held > 0.999
    assert free < 0.9  # 40 unit steps of 0.04 rad: free to rotate well away


def test_a_trained_magnitude_moves_and_the_vectors_follow_it():
    _, method, _ = dti_run(steps=20, train_magnitude=True)
    start = vocabulary_magnitude(TinyHost().vocabulary("l"), "mean")
    learned = method.magnitudes()["l"]
    assert learned != pytest.approx(start, rel=1e-4)
    assert torch.allclose(method.vectors()["l"].norm(dim=-1), torch.tensor([learned]), rtol=1e-5)


def test_the_saved_file_is_a_stock_embedding_whose_metadata_keeps_m_kappa_and_mu(tmp_path):
    host, method, _ = dti_run(steps=5, kappa=2e-4)
    concept = method.to_concept("dti_dog", "sd1", {"seed": 0})
    path = save_concept(concept, tmp_path / "dti_dog.safetensors")
    back = read_concept(path)
    assert back.method == "dti" and list(back.vectors) == ["l"]
    assert back.state["kappa"] == 2e-4 and back.state["magnitude_mode"] == "mean"
    assert back.state["magnitude"]["l"] == pytest.approx(vocabulary_magnitude(host.vocabulary("l"), "mean"))
    mu = torch.tensor(back.state["mu"]["l"])
    assert torch.allclose(mu, method.mu["l"], atol=1e-6)
    assert torch.allclose(back.vectors["l"].norm(dim=-1), torch.tensor([back.state["magnitude"]["l"]]), rtol=1e-5)

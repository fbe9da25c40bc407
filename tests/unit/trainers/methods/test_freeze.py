"""Training only some text encoders: the others keep the init word's vectors, run without autograd, and the
concept still has a vector for every encoder — the same for every token method."""

import dataclasses

import pytest
import torch
from concept_forge.trainers.loop import LoopOptions, TrainingSet, run_fingerprint, train
from concept_forge.trainers.methods import create_method, freeze_encoders, method_options
from concept_forge.trainers.templates import OBJECT_TEMPLATES
from tiny_host import TinyHost, tiny_images


@pytest.mark.parametrize("name", ["ti", "dti", "batex"])
def test_a_frozen_encoder_keeps_its_initial_vectors_and_the_other_trains(name):
    host = TinyHost("sdxl")
    options = method_options(name)
    if name == "batex":  # the tiny vocabulary has 36 rows
        options = dataclasses.replace(options, basis_size=12)
    method = create_method(name, host, "dog", 0, options, seed=0)
    start = {k: v.detach().clone() for k, v in method.vectors().items()}
    freeze_encoders(method, ["g"])
    vectors = method.vectors()
    assert not vectors["g"].requires_grad and vectors["l"].requires_grad
    data = TrainingSet(tiny_images(), list(OBJECT_TEMPLATES))
    train(method, host, data, LoopOptions(steps=5, learning_rate=0.05, batch_size=2))
    concept = method.to_concept("my_dog", "sdxl", {})
    assert torch.equal(concept.vectors["g"], start["g"])
    assert (concept.vectors["l"] - start["l"]).abs().max() > 1e-4


def test_freezing_shows_in_the_resume_fingerprint_and_every_encoder_cannot_freeze():
    host = TinyHost("sdxl")
    data, options = TrainingSet(tiny_images(), list(OBJECT_TEMPLATES)), LoopOptions(steps=1, learning_rate=0.01)
    method = create_method("ti", host, "dog", 0, method_options("ti"))
    plain = run_fingerprint(method, data, options)
    freeze_encoders(method, ["g"])
    assert run_fingerprint(method, data, options) == {**plain, "frozen_encoders": ["g"]}
    with pytest.raises(ValueError, match="at least one encoder must train"):
        freeze_encoders(create_method("ti", host, "dog", 0, method_options("ti")), ["l", "g"])

import pytest
import torch
from concept_forge.trainers.concept import Concept, name_problem


@pytest.mark.parametrize("name", ["my_dog", "dog-2", "v1.5_cat", "A", "négatif", "日本語", "-neg", "x" * 200])
def test_prompt_safe_names_are_accepted(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name, fragment", [
    ("", "empty"), ("../evil", "path separator"), ("sub/dog", "path separator"), ("a\\b", "path separator"),
    ("my dog", "may only contain"), ("dog,", "may only contain"), ("(dog:1.2)", "may only contain"),
    (".hidden", "may only contain"), ("é" * 130, "longer than a file name can be (240 bytes)"),
    ("tab\there", "may only contain"),
])
def test_names_a_prompt_or_file_system_cannot_carry_are_refused(name, fragment):
    assert fragment in name_problem(name)


def test_concept_checks_encoders_against_its_architecture():
    with pytest.raises(ValueError, match=r"needs vectors for encoders \['g', 'l'\]"):
        Concept("c", "ti", "sdxl", {"l": torch.zeros(1, 768)})


def test_concept_needs_one_vector_count_for_all_encoders():
    with pytest.raises(ValueError, match="same n"):
        Concept("c", "ti", "sdxl", {"l": torch.zeros(1, 768), "g": torch.zeros(2, 1280)})


def test_token_concept_needs_vectors():
    with pytest.raises(ValueError, match="needs token vectors"):
        Concept("c", "dti", "sd1", {})


def test_norms_and_finiteness():
    c = Concept("c", "ti", "sd1", {"l": torch.tensor([[3.0, 4.0], [0.0, 1.0]])})
    assert c.norms() == {"l": [5.0, 1.0]}
    assert c.num_vectors == 2 and c.is_finite()
    assert not Concept("c", "ti", "sd1", {"l": torch.tensor([[float("nan"), 0.0]])}).is_finite()

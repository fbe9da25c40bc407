import pytest
import torch
from concept_forge.trainers.methods import init_vectors
from concept_forge.trainers.methods.ti import TextualInversion
from tiny_host import TinyHost


def test_each_init_token_initialises_its_own_vector_on_every_encoder():
    host = TinyHost("sdxl")
    vectors = init_vectors(host, "teddy bear")
    ids = host.token_ids("l", "teddy bear")
    assert len(ids) == 2
    for key in ("l", "g"):
        assert torch.equal(vectors[key], host.vocabulary(key)[ids])


def test_more_vectors_than_tokens_repeat_the_tokens_in_order():
    host = TinyHost()
    vectors = init_vectors(host, "teddy bear", num_vectors=3)["l"]
    table, (teddy, bear) = host.vocabulary("l"), host.token_ids("l", "teddy bear")
    assert torch.equal(vectors, table[[teddy, bear, teddy]])


def test_init_word_errors_name_the_fix():
    host = TinyHost()
    with pytest.raises(ValueError, match="init_word is empty"):
        init_vectors(host, "  ")
    with pytest.raises(ValueError, match="splits into 2 tokens but only 1 vectors"):
        init_vectors(host, "teddy bear", num_vectors=1)


def test_only_the_new_vectors_are_parameters_and_the_table_is_untouched():
    host = TinyHost()
    table = host.vocabulary("l").clone()
    ti = TextualInversion(init_vectors(host, "dog"))
    assert [p.shape for p in ti.parameters()] == [torch.Size([1, 16])]
    assert ti.optimizer(0.1).param_groups[0]["params"] == ti.parameters()
    ti.parameters()[0].data += 1
    assert torch.equal(host.vocabulary("l"), table)
    concept = ti.to_concept("dog_concept", "sd1", {"seed": 1})
    assert concept.method == "ti" and concept.vectors["l"].device.type == "cpu"
    assert torch.equal(concept.vectors["l"], ti.parameters()[0].detach())

import pytest
import torch
from concept_forge.trainers.files import read_concept, save_concept
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train
from concept_forge.trainers.methods import create_method, method_prompts
from concept_forge.trainers.methods.catversion import Options, patched_layers, residuals_of
from tiny_host import TinyHost, tiny_images


def test_layers_count_back_from_the_conditioning_layer():
    assert patched_layers(11, 3) == [9, 10, 11]      # SD 1.5: the last three of twelve
    assert patched_layers(10, 3) == [8, 9, 10]       # with CLIP skip 2
    assert patched_layers(30, 3) == [28, 29, 30]     # SDXL's bigG conditions on its penultimate layer
    with pytest.raises(ValueError, match="num_layers must be between 1 and 2"):
        patched_layers(1, 3)


def test_it_trains_on_the_bare_class_word_or_captions_with_it():
    assert method_prompts("catversion", ["a photo of a {}"], False, " dog ") == ["dog"]
    assert method_prompts("catversion", ["{} on grass", "my {}"], True, "dog") == ["dog on grass", "my dog"]
    assert method_prompts("ti", ["a photo of a {}"], False, "dog") == ["a photo of a {}"]


def run(arch="sd1", steps=30, seed=0, **options):
    host = TinyHost(arch)
    method = create_method("catversion", host, "dog", 0, Options(num_layers=2, **options), seed)
    result = train(method, host, TrainingSet(tiny_images(), ["dog"]),
                   LoopOptions(steps=steps, learning_rate=0.01, batch_size=2, heldout_draws=16, seed=seed))
    return host, method, result


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_exactly_layers_tokens_keys_values_and_width_train_and_nothing_else_changes(arch):
    reference = TinyHost(arch)
    host, method, _ = run(arch, steps=5, tokens=2)
    assert sum(p.numel() for p in method.parameters()) == sum(2 * 2 * 2 * e.width for e in host.encoders.values())
    for a, b in zip(host.text.state_dict().values(), reference.text.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the text encoder itself is bit-identical


def test_catversion_lowers_the_heldout_loss_of_the_class_word_prompt():
    _, _, result = run(steps=60)
    assert result.heldout_after < result.heldout_before


def test_the_residual_changes_the_conditioning_only_from_its_first_layer():
    host, method, _ = run(steps=3)
    prompt = [host.prepare_prompt("dog", 0)]
    with torch.no_grad():
        patched = host.encode(prompt, {}).context
        for layer in host.text["l"].layers:
            layer.residual = None
        plain = host.encode(prompt, {}).context
    assert not torch.allclose(patched, plain)


def test_initialisation_follows_the_seed():
    first = [p.detach().clone() for p in run(steps=1, seed=1)[1].parameters()]
    again = [p.detach().clone() for p in run(steps=1, seed=1)[1].parameters()]
    other = [p.detach().clone() for p in run(steps=1, seed=2)[1].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_save_and_read_round_trip_bit_exactly(tmp_path):
    _, method, _ = run("sdxl", steps=3, mask_bias=1.0)
    concept = method.to_concept("teddy", "sdxl", {"seed": 0})
    back = read_concept(save_concept(concept, tmp_path / "teddy.safetensors"))
    assert back.method == "catversion" and back.vectors == {}
    assert back.state == {"layers": {"l": [0, 1], "g": [0, 1]}, "tokens": 1, "mask_bias": 1.0, "class_word": "dog",
                          "init_scale": 1.0}
    for key, layers in residuals_of(back).items():
        for i, (keys, values) in layers.items():
            assert torch.equal(keys, method.residuals[key][i][0].detach())
            assert torch.equal(values, method.residuals[key][i][1].detach())


def test_token_vectors_make_no_sense_for_catversion():
    with pytest.raises(ValueError, match="vectors must be 0 for CatVersion"):
        create_method("catversion", TinyHost(), "dog", 2, Options(num_layers=2))
    with pytest.raises(ValueError, match="needs the class word"):
        create_method("catversion", TinyHost(), " ", 0, Options(num_layers=2))

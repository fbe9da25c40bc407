"""Applying a concept in memory equals stock `embedding:` loading of its saved file."""

import pytest
import torch
from comfy_tier import require_comfyui

tc = require_comfyui()

from concept_forge.nodes.apply import apply_concepts  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402
from concept_forge.trainers.files import save_concept  # noqa: E402

WIDTHS = {"sd1": {"l": 32}, "sd2": {"h": 40}, "sdxl": {"l": 32, "g": 48}}


def random_concept(arch, n=2, name="my_dog", seed=0):
    g = torch.Generator().manual_seed(seed)
    return Concept(name, "ti", arch, {k: torch.randn(n, w, generator=g) * 0.2 for k, w in WIDTHS[arch].items()})


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("prompt", ["a photo of embedding:my_dog on the beach", "embedding:my_dog, on the beach"])
def test_saved_file_through_stock_embedding_equals_in_memory_apply(tmp_path, arch, prompt):
    concept = random_concept(arch)
    save_concept(concept, tmp_path / "my_dog.safetensors")
    stock_clip = tc.tiny_clip(arch, embedding_directory=str(tmp_path))
    stock, stock_pooled = encode(stock_clip, prompt)
    applied, applied_pooled = encode(apply_concepts(tc.tiny_clip(arch), [concept], "test"), prompt)
    assert (stock - applied).abs().max() < 1e-5
    assert (stock_pooled - applied_pooled).abs().max() < 1e-5
    plain, _ = encode(tc.tiny_clip(arch), prompt.replace("embedding:my_dog", "dog"))
    assert (stock - plain).abs().max() > 1e-3  # the concept really changes the conditioning


def test_the_input_clip_does_not_learn_the_concept():
    clip = tc.tiny_clip("sd1")
    applied = apply_concepts(clip, [random_concept("sd1")], "test")
    tokens = lambda c: [t for t, _ in c.tokenize("a embedding:my_dog")["l"][0]]  # noqa: E731
    assert sum(torch.is_tensor(t) for t in tokens(applied)) == 2
    assert not any(torch.is_tensor(t) for t in tokens(clip))
    assert "_try_get_embedding" not in vars(clip.tokenizer.clip_l)  # the shared tokenizer was not overridden


def test_concept_of_another_architecture_is_refused_naming_both():
    with pytest.raises(ValueError, match="Apply: concept 'my_dog' was learned on SDXL but this CLIP is SD 1.x"):
        apply_concepts(tc.tiny_clip("sd1"), [random_concept("sdxl")], "Apply")


def test_vectors_of_another_width_are_refused():
    wide = Concept("wide", "ti", "sd1", {"l": torch.zeros(1, 768)})
    with pytest.raises(ValueError, match="768-wide vectors for clip_l but this CLIP's are 32-wide"):
        apply_concepts(tc.tiny_clip("sd1"), [wide], "Apply")


def test_two_concepts_resolve_independently_and_fall_back_to_files(tmp_path):
    save_concept(random_concept("sd1", n=1, name="from_file", seed=5), tmp_path / "from_file.safetensors")
    clip = tc.tiny_clip("sd1", embedding_directory=str(tmp_path))
    a, b = random_concept("sd1", n=1, name="a", seed=1), random_concept("sd1", n=3, name="b", seed=2)
    applied = apply_concepts(clip, [a, b], "test")
    tokens = applied.tokenize("embedding:a embedding:b embedding:from_file")["l"][0]
    items = [t for t, _ in tokens if torch.is_tensor(t)]
    assert len(items) == 1 + 3 + 1
    assert torch.equal(items[0], a.vectors["l"][0]) and torch.equal(items[3], b.vectors["l"][2])

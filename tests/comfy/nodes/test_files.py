"""Save Concept and Load Concept with ComfyUI's folders."""

import pytest
import torch
from comfy_tier import require_comfyui, run_node, ui_text
from safetensors import safe_open

tc = require_comfyui()

from concept_forge.nodes import paths  # noqa: E402
from concept_forge.nodes.files import LoadConcept, SaveConcept  # noqa: E402
from concept_forge.trainers import atomic  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402


def ti(name="my_dog", n=2, width=32, value=0.5):
    return Concept(name, "ti", "sd1", {"l": torch.full((n, width), value)}, provenance={"seed": 1})


def keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def test_save_writes_a_stock_embedding_that_stock_clip_text_encode_uses(model_folders):
    out = run_node(SaveConcept, concept=ti(), name="", overwrite=False)
    path = model_folders / "embeddings" / "my_dog.safetensors"
    assert keys(path) == {"emb_params": (2, 32)}
    assert "embedding:my_dog" in ui_text(out)
    clip = tc.tiny_clip("sd1", embedding_directory=str(model_folders / "embeddings"))
    items = [t for t, _ in clip.tokenize("a embedding:my_dog")["l"][0] if torch.is_tensor(t)]
    assert len(items) == 2 and torch.equal(items[0], torch.full((32,), 0.5))


def test_save_refuses_to_overwrite_unless_asked(model_folders):
    run_node(SaveConcept, concept=ti(value=0.5), name="", overwrite=False)
    with pytest.raises(FileExistsError, match="Save Concept: .*my_dog.safetensors already exists; turn on overwrite"):
        run_node(SaveConcept, concept=ti(value=0.9), name="", overwrite=False)
    run_node(SaveConcept, concept=ti(value=0.9), name="", overwrite=True)
    loaded = run_node(LoadConcept, file="embeddings/my_dog.safetensors", name="").args[0]
    assert float(loaded.vectors["l"][0, 0]) == pytest.approx(0.9)


def test_save_under_another_name_renames_the_concept(model_folders):
    run_node(SaveConcept, concept=ti(), name="rex", overwrite=False)
    assert run_node(LoadConcept, file="embeddings/rex.safetensors", name="").args[0].name == "rex"


@pytest.mark.parametrize("bad", ["../escape", "sub/dir", "two words"])
def test_save_refuses_names_with_paths_or_spaces(model_folders, bad):
    with pytest.raises(ValueError, match="Save Concept: "):
        run_node(SaveConcept, concept=ti(), name=bad, overwrite=False)
    assert not any(model_folders.rglob("*.safetensors"))


def test_a_full_disk_reports_and_leaves_nothing_behind(model_folders, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "save_file", disk_full)
    with pytest.raises(OSError, match="Save Concept: could not write .*No space left on device.*nothing was written"):
        run_node(SaveConcept, concept=ti(), name="", overwrite=False)
    assert list((model_folders / "embeddings").iterdir()) == []


def test_method_concepts_without_a_stock_layout_go_to_models_concepts(model_folders):
    concept = Concept("cv", "catversion", "sd1", {}, tensors={"catversion.residual": torch.ones(3)})
    run_node(SaveConcept, concept=concept, name="", overwrite=False)
    assert (model_folders / "concepts" / "cv.safetensors").exists()
    assert "concepts/cv.safetensors" in paths.file_choices()


def test_load_lists_and_reads_third_party_embeddings(model_folders):
    vectors = torch.randn(3, 768)
    torch.save({"string_to_param": {"*": vectors}, "name": "shrek", "step": 100},
               model_folders / "embeddings" / "shrek.pt")
    assert "embeddings/shrek.pt" in LoadConcept.define_schema().inputs[0].options
    concept = run_node(LoadConcept, file="embeddings/shrek.pt", name="ogre").args[0]
    assert (concept.name, concept.method, concept.arch) == ("ogre", "ti", "sd1")
    assert torch.equal(concept.vectors["l"], vectors)


def test_load_validation_names_missing_files_and_bad_names(model_folders):
    missing = LoadConcept.validate_inputs(file="embeddings/nope.safetensors")
    assert "embeddings/nope.safetensors was not found" in missing
    run_node(SaveConcept, concept=ti(), name="", overwrite=False)
    assert LoadConcept.validate_inputs(file="embeddings/my_dog.safetensors") is True
    assert "path separator" in LoadConcept.validate_inputs(file="embeddings/my_dog.safetensors", name="a/b")


def test_models_concepts_merges_with_an_existing_registration(tmp_path):
    import folder_paths

    extra = tmp_path / "elsewhere"
    folder_paths.folder_names_and_paths["concepts"] = ([str(extra)], set())
    folder_paths.models_dir = str(tmp_path)
    paths.register_model_folders()
    folders, extensions = folder_paths.folder_names_and_paths["concepts"]
    assert str(extra) in folders and str(tmp_path / "concepts") in folders and ".safetensors" in extensions

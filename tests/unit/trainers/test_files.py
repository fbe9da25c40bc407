import json
import pickle

import pytest
import torch
from concept_forge.trainers import atomic
from concept_forge.trainers.concept import Concept
from concept_forge.trainers.files import METADATA_KEY, read_concept, save_concept
from safetensors import safe_open
from safetensors.torch import save_file


def file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}, f.metadata()


def sd1_concept(n=2, name="my_dog"):
    g = torch.Generator().manual_seed(0)
    return Concept(name, "ti", "sd1", {"l": torch.randn(n, 768, generator=g)},
                   state={"note": 1}, provenance={"init_word": "dog", "steps": 50})


def test_sd1_file_holds_exactly_emb_params_and_round_trips(tmp_path):
    concept = sd1_concept()
    path = save_concept(concept, tmp_path / "my_dog.safetensors")
    keys, metadata = file_keys(path)
    assert keys == {"emb_params": (2, 768)}
    record = json.loads(metadata[METADATA_KEY])
    assert record["method"] == "ti" and record["arch"] == "sd1" and record["provenance"]["init_word"] == "dog"
    back = read_concept(path)
    assert back.name == "my_dog" and back.method == "ti" and back.arch == "sd1"
    assert torch.equal(back.vectors["l"], concept.vectors["l"])
    assert back.state == {"note": 1} and back.provenance == concept.provenance


def test_sdxl_file_holds_exactly_clip_l_and_clip_g(tmp_path):
    concept = Concept("x", "dti", "sdxl", {"l": torch.ones(3, 768), "g": torch.full((3, 1280), 2.0)},
                      state={"magnitude": {"l": 0.4, "g": 0.6}})
    path = save_concept(concept, tmp_path / "x.safetensors")
    assert file_keys(path)[0] == {"clip_l": (3, 768), "clip_g": (3, 1280)}
    back = read_concept(path)
    assert back.method == "dti" and back.state == {"magnitude": {"l": 0.4, "g": 0.6}}
    assert torch.equal(back.vectors["g"], concept.vectors["g"])


def test_sd2_file_uses_emb_params_of_width_1024(tmp_path):
    path = save_concept(Concept("h", "ti", "sd2", {"h": torch.ones(1, 1024)}), tmp_path / "h.safetensors")
    assert file_keys(path)[0] == {"emb_params": (1, 1024)}
    assert read_concept(path).arch == "sd2"


def catversion_concept():
    tensors = {f"catversion.l.9.{part}": torch.arange(6.0).view(1, 6) + 1 for part in ("keys", "values")}
    return Concept("cv", "catversion", "sd1", {}, state={"layers": {"l": [9]}, "class_word": "dog", "mask_bias": 1.0},
                   tensors=tensors)


def test_method_tensors_round_trip_beside_the_vectors(tmp_path):
    concept = catversion_concept()
    path = save_concept(concept, tmp_path / "cv.safetensors")
    back = read_concept(path)
    assert back.vectors == {} and back.state == concept.state
    assert torch.equal(back.tensors["catversion.l.9.keys"], concept.tensors["catversion.l.9.keys"])


def test_existing_file_is_not_overwritten_without_asking(tmp_path):
    path = save_concept(sd1_concept(n=1), tmp_path / "c.safetensors")
    with pytest.raises(FileExistsError):
        save_concept(sd1_concept(n=2), path)
    assert file_keys(path)[0] == {"emb_params": (1, 768)}
    save_concept(sd1_concept(n=2), path, overwrite=True)
    assert file_keys(path)[0] == {"emb_params": (2, 768)}


def test_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = save_concept(sd1_concept(n=1), tmp_path / "c.safetensors")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_concept(sd1_concept(n=2), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert file_keys(path)[0] == {"emb_params": (1, 768)}


def test_a1111_pt_reads_with_weights_only_and_keeps_its_provenance(tmp_path):
    vectors = torch.randn(3, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "shrek", "step": 4500, "sd_checkpoint_name": "v1-5"}, tmp_path / "shrek.pt")
    c = read_concept(tmp_path / "shrek.pt")
    assert (c.name, c.method, c.arch) == ("shrek", "ti", "sd1")
    assert torch.equal(c.vectors["l"], vectors)
    assert c.provenance["step"] == 4500 and c.provenance["sd_checkpoint_name"] == "v1-5"


def test_kohya_emb_params_and_sd2_width(tmp_path):
    save_file({"emb_params": torch.ones(2, 1024)}, str(tmp_path / "k.safetensors"))
    c = read_concept(tmp_path / "k.safetensors")
    assert c.arch == "sd2" and c.vectors["h"].shape == (2, 1024)


def test_diffusers_token_dict_single_vector(tmp_path):
    torch.save({"<cat-toy>": torch.ones(768)}, tmp_path / "learned_embeds.bin")
    c = read_concept(tmp_path / "learned_embeds.bin")
    assert c.name == "learned_embeds" and c.vectors["l"].shape == (1, 768)


def test_sdxl_third_party(tmp_path):
    save_file({"clip_g": torch.ones(2, 1280), "clip_l": torch.ones(2, 768)}, str(tmp_path / "xl.safetensors"))
    c = read_concept(tmp_path / "xl.safetensors")
    assert c.arch == "sdxl" and c.vectors["l"].shape == (2, 768) and c.vectors["g"].shape == (2, 1280)


@pytest.mark.parametrize("arch, widths", [("sd3", {"l": 768, "g": 1280, "t5xxl": 4096}),
                                          ("flux", {"l": 768, "t5xxl": 4096}), ("lumina2", {"gemma2_2b": 2304})])
def test_family_files_hold_the_keys_comfyuis_tokenizers_read_and_round_trip(tmp_path, arch, widths):
    vectors = {k: torch.full((2, w), float(i + 1)) for i, (k, w) in enumerate(widths.items())}
    path = save_concept(Concept("x", "ti", arch, vectors), tmp_path / "x.safetensors")
    names = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl", "gemma2_2b": "gemma2_2b"}
    assert file_keys(path)[0] == {names[k]: (2, w) for k, w in widths.items()}
    back = read_concept(path)
    assert back.arch == arch and all(torch.equal(back.vectors[k], v) for k, v in vectors.items())
    # the same tensors without the pack's metadata (another tool's file) read as the same family
    save_file({names[k]: v for k, v in vectors.items()}, str(tmp_path / "plain.safetensors"))
    assert read_concept(tmp_path / "plain.safetensors").arch == arch


def test_diffusers_flux_embeddings_load_as_flux_and_save_under_the_key_comfyui_reads(tmp_path):
    # train_dreambooth_lora_flux_advanced.py writes T5's vectors under "t5", which stock ComfyUI does not read
    save_file({"clip_l": torch.ones(2, 768), "t5": torch.full((2, 4096), 2.0)}, str(tmp_path / "emb.safetensors"))
    c = read_concept(tmp_path / "emb.safetensors")
    assert c.arch == "flux" and torch.equal(c.vectors["t5xxl"], torch.full((2, 4096), 2.0))
    assert "diffusers" in c.provenance["source_format"]
    saved = save_concept(c, tmp_path / "fixed.safetensors")
    assert file_keys(saved)[0] == {"clip_l": (2, 768), "t5xxl": (2, 4096)}


def test_unknown_width_names_the_widths_it_expects(tmp_path):
    save_file({"emb_params": torch.ones(1, 640)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="width 640 match neither SD 1.x \\(768\\) nor SD 2.x \\(1024\\)"):
        read_concept(tmp_path / "w.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_that_need_code_execution_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    with pytest.raises(ValueError, match="refused"):
        read_concept(tmp_path / "evil.pt")


def test_file_names_become_prompt_safe_concept_names(tmp_path):
    save_file({"emb_params": torch.ones(1, 768)}, str(tmp_path / "my style (v2).safetensors"))
    assert read_concept(tmp_path / "my style (v2).safetensors").name == "my_style__v2_"


def test_diffusers_sdxl_output_two_files_load_as_one_sdxl_concept_from_either(tmp_path):
    small, big = torch.randn(1, 768), torch.randn(1, 1280)
    save_file({"<cat-toy>": small}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<cat-toy>": big}, str(tmp_path / "learned_embeds_2.safetensors"))
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        c = read_concept(tmp_path / name)
        assert c.arch == "sdxl" and torch.equal(c.vectors["l"], small) and torch.equal(c.vectors["g"], big)
        assert c.name == "learned_embeds"
    (tmp_path / "learned_embeds_2.safetensors").unlink()
    assert read_concept(tmp_path / "learned_embeds.safetensors").arch == "sd1"  # alone it is an SD 1.x embedding

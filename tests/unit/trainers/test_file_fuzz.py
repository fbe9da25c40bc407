"""Concept files are hostile until parsed: 1200 fuzzed files (torn, forged, of the wrong structure, full of NaN, zero
or too many vectors, code-running pickles) each load as a usable concept or are refused with a ValueError that says
why. Nothing else escapes, no refused file's code runs, and nothing unusable is accepted."""

import io
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from concept_forge.trainers.concept import Concept
from concept_forge.trainers.files import MAX_VECTORS, check_concept, read_concept, save_concept
from safetensors.torch import save_file

CASES = 1200
MARKER = "concept_forge_fuzz_ran_code"


class RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def valid_files(folder: Path) -> list[Path]:
    good = {
        "ti.safetensors": Concept("ti", "ti", "sd1", {"l": torch.randn(2, 768)}),
        "xl.safetensors": Concept("xl", "dti", "sdxl", {"l": torch.randn(1, 768), "g": torch.randn(1, 1280)},
                                  state={"magnitude": {"l": 0.4, "g": 0.6}}),
        "cv.safetensors": Concept("cv", "catversion", "sd1", {}, tensors={
            f"catversion.l.9.{p}": torch.randn(1, 768) for p in ("keys", "values")},
            state={"layers": {"l": [9]}, "class_word": "dog", "mask_bias": 1.0}),
    }
    paths = [save_concept(c, folder / name) for name, c in good.items()]
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "a1111"}, folder / "a1111.pt")
    return paths + [folder / "a1111.pt"]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # torn
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:  # flipped bytes, in the header as often as in the tensors
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), 400)) if rng.random() < 0.5 else rng.randrange(len(data))
            data[i] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # a forged header length
        return struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, len(data) * 2])) + bytes(data[8:])
    if kind == 3:  # garbage appended
        return bytes(data) + rng.randbytes(rng.randint(1, 64))
    return rng.randbytes(rng.randint(0, 512))


def forged_safetensors(path: Path, rng: random.Random) -> None:
    """A well-formed safetensors file whose content is wrong in some way."""
    width = rng.choice([768, 1024, 1280, 32, 0, 1])
    n = rng.choice([0, 1, 2, MAX_VECTORS, MAX_VECTORS + 1, 300])
    value = rng.choice(["ok", "nan", "inf", "zero", "int", "half"])
    t = torch.randn(n, width) if n and width else torch.zeros(n, width)
    t = {"ok": t, "nan": t.masked_fill(torch.rand_like(t) < 0.1, float("nan")), "inf": t + float("inf"),
         "zero": torch.zeros_like(t), "int": t.long(), "half": t.half()}[value]
    key = rng.choice(["emb_params", "clip_l", "clip_g", "clip_h", "*", "string_to_param", "weird"])
    tensors = {key: t}
    if rng.random() < 0.3:
        tensors["clip_g" if key != "clip_g" else "clip_l"] = torch.randn(rng.choice([1, 2]), rng.choice([768, 1280]))
    metadata = None
    if rng.random() < 0.3:  # a forged Concept Forge record
        record = rng.choice(['{"arch": "sd1", "method": "dti", "name": "x"}', '{"arch": "sd9"}', "[1, 2]", "{",
                             '{"arch": "sdxl", "method": "ti", "name": "x", "format": 1}',
                             '{"arch": "sd1", "method": "catversion", "name": "x", "state": {"layers": {"l": [3]}, '
                             '"class_word": "a", "mask_bias": 0}, "tensor_keys": []}',
                             '{"arch": "sd1", "method": "ti", "name": "x", "tensor_keys": ["missing"]}'])
        metadata = {"concept_forge": record}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def forged_pickle(path: Path, rng: random.Random) -> None:
    kind = rng.randrange(6)
    if kind == 0:
        content = RunsCode()
    elif kind == 1:
        content = {"string_to_param": rng.choice([{}, [], None, {"*": "text"}, {"*": torch.randn(3)},
                                                  torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2,
                                                                                                        768))})])}
    elif kind == 2:
        deep: object = torch.randn(1, 768)
        for _ in range(rng.choice([10, 5000])):
            deep = {"x": deep}
        content = deep
    elif kind == 3:
        content = rng.choice([[torch.randn(1, 768)], "text", 42, None, {1: torch.randn(1, 768)}])
    elif kind == 4:
        content = {"emb_params": torch.randn(2, 768).to_sparse()}
    else:
        content = {"emb_params": torch.randn(rng.choice([1, 80]), rng.choice([768, 5]))}
    buffer = io.BytesIO()
    try:
        torch.save(content, buffer)
    except RecursionError:
        buffer = io.BytesIO(pickle.dumps(RunsCode()))
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(1234)
    seeds = valid_files(folder)
    paths = []
    for i in range(CASES):
        kind = i % 3
        if kind == 0:
            source = rng.choice(seeds)
            path = folder / f"mutated{i}{source.suffix}"
            path.write_bytes(mutate_bytes(source.read_bytes(), rng))
        elif kind == 1:
            path = folder / f"forged{i}.safetensors"
            forged_safetensors(path, rng)
        else:
            path = folder / f"forged{i}.pt"
            forged_pickle(path, rng)
        paths.append(path)
    return folder, paths


def test_every_fuzzed_file_loads_as_a_usable_concept_or_is_refused_saying_why(fuzzed, monkeypatch):
    folder, paths = fuzzed
    monkeypatch.chdir(folder)
    outcomes = {"loaded": 0, "refused": 0}
    for path in paths:
        try:
            concept = read_concept(path)
        except ValueError as e:
            message = str(e)
            assert message and "\x1b[" not in message and "Traceback" not in message, (path.name, message)
            outcomes["refused"] += 1
            continue
        check_concept(concept)  # accepted means usable: finite, dense, 1..75 non-zero vectors, state present
        outcomes["loaded"] += 1
    assert not (folder / MARKER).exists(), "a pickle ran code"
    assert outcomes["loaded"] >= 50 and outcomes["refused"] >= 600, outcomes


@pytest.mark.parametrize(("content", "message"), [
    ({"emb_params": torch.full((1, 768), float("nan"))}, "contain NaN or infinite values"),
    ({"emb_params": torch.zeros(2, 768)}, "include a zero vector"),
    ({"emb_params": torch.randn(MAX_VECTORS + 1, 768)}, f"a prompt holds 1 to {MAX_VECTORS} vectors"),
    ({"clip_g": torch.randn(1, 1280)}, "SDXL's clip_g alone; an SDXL embedding needs clip_l too"),
])
def test_garbage_is_refused_with_what_is_wrong(tmp_path, content, message):
    save_file(content, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message):
        read_concept(tmp_path / "bad.safetensors")


def test_the_original_textual_inversion_pt_with_a_parameter_dict_loads(tmp_path):
    vectors = torch.randn(2, 768)
    torch.save({"string_to_token": {"*": 265}, "name": "cat-toy", "step": 3000,
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}, tmp_path / "toy.pt")
    concept = read_concept(tmp_path / "toy.pt")
    assert concept.arch == "sd1" and torch.equal(concept.vectors["l"], vectors)


def test_pickles_are_refused_below_torch_2_6_saying_why(tmp_path, monkeypatch):
    torch.save({"emb_params": torch.randn(1, 768)}, tmp_path / "old.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ValueError, match=r"older than 2.6, whose safe loading can be bypassed.*CVE-2025-32434"):
        read_concept(tmp_path / "old.pt")


@pytest.mark.parametrize(("record", "message"), [
    ("[1, 2]", "metadata is malformed: not a record"),
    ('{"method": "ti", "name": "x"}', "unknown base model None"),
    ('{"arch": "sd1", "method": "ti", "name": "x", "format": "x"}', "format 'x'"),
    ('{"arch": "sd1", "method": "ti", "name": "x", "tensor_keys": ["nope"]}', "names tensors the file does not hold"),
    ("{", "not valid JSON"),
    ('{"arch": "sd1", "method": "dti", "name": "x", "state": {"magnitude": "big"}}', "magnitude is malformed"),
])
def test_a_forged_concept_record_is_refused_saying_what_is_wrong(tmp_path, record, message):
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "forged.safetensors"),
              metadata={"concept_forge": record})
    with pytest.raises(ValueError, match=message):
        read_concept(tmp_path / "forged.safetensors")


@pytest.mark.parametrize(("content", "message"), [
    ({"emb_params": torch.ones(1, 768, dtype=torch.int64)}, "the vectors are torch.int64, not floating-point"),
    ({"emb_params": torch.full((1, 768), 3e38)}, "far beyond any embedding's"),
])
def test_vectors_that_are_no_embedding_are_refused(tmp_path, content, message):
    save_file(content, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message):
        read_concept(tmp_path / "bad.safetensors")


def test_a_kohya_sdxl_file_beside_an_unrelated_name_2_file_loads_on_its_own(tmp_path):
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "kxl.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "kxl_2.safetensors"))
    assert read_concept(tmp_path / "kxl.safetensors").arch == "sdxl"


def test_an_empty_string_to_param_says_so(tmp_path):
    torch.save({"string_to_param": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="its string_to_param holds no vectors"):
        read_concept(tmp_path / "empty.pt")

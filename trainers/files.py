"""Concept files (docs/DESIGN.md, "The concept value and its files").

Token concepts (TI, DTI, BaTex) are written in the layout every embedding loader reads: SD 1.x/2.x a single
tensor `emb_params` [n, d]; SDXL exactly `clip_l` [n, 768] and `clip_g` [n, 1280]; SD 3.5 those and `t5xxl`
[n, 4096]; Flux.1 `clip_l` and `t5xxl` (the keys ComfyUI's tokenizers for these families read); Lumina 2
`gemma2_2b` (its tokenizer's key, though stock ComfyUI resolves no `embedding:` for Gemma). Everything else a
concept carries (method, state, provenance) is JSON in the safetensors metadata under `concept_forge`, so the same file
works with stock `embedding:<name>`, A1111 and kohya, and round-trips to a full Concept here. Any third-party
embedding reads as a TI concept. Files are written atomically; pickles are never written, and `.pt` files are
read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import Tensor

from .atomic import write_safetensors
from .concept import (
    ARCH_ENCODERS,
    ARCH_LABELS,
    ENCODER_NAMES,
    MULTI_ENCODER_ARCHS,
    Arch,
    Concept,
    arch_for_width,
    cpu_float,
)
from .methods.catversion import tensor_key

METADATA_KEY = "concept_forge"
SAFE_UNPICKLING = (2, 6)  # the first torch whose weights-only unpickler has no known bypass
MAX_VECTORS = 75  # the tokens one CLIP chunk holds
MAX_NORM = 1000.0  # no usable embedding is this long; a forged or diverged one can be
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # torch colours its messages; a refusal is plain text
# what each method's concept must carry in its state to be used (Apply, Slerp, CatVersion Residual, Info)
METHOD_STATE: dict[str, tuple[str, ...]] = {"ti": (), "dti": ("magnitude",), "batex": (),
                                            "catversion": ("layers", "class_word", "mask_bias"),
                                            "tuning_encoder": ()}
FORMAT_VERSION = 1
EXTENSIONS = (".safetensors", ".pt", ".bin")


def file_tensors(concept: Concept) -> dict[str, Tensor]:
    """The tensors of a concept's file: the stock embedding layout first, then any method tensors."""
    out: dict[str, Tensor] = {}
    if concept.vectors:
        if concept.arch in MULTI_ENCODER_ARCHS:
            out = {ENCODER_NAMES[k]: v for k, v in concept.vectors.items()}
        else:
            (vectors,) = concept.vectors.values()
            out = {"emb_params": vectors}
    clash = set(out) & set(concept.tensors)
    if clash:
        raise ValueError(f"Concept tensors {sorted(clash)} collide with the embedding keys.")
    out.update(concept.tensors)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def file_metadata(concept: Concept) -> dict[str, str]:
    record = {
        "format": FORMAT_VERSION,
        "name": concept.name,
        "method": concept.method,
        "arch": concept.arch,
        "state": dict(concept.state),
        "provenance": dict(concept.provenance),
        "tensor_keys": sorted(concept.tensors),
    }
    return {METADATA_KEY: json.dumps(record, sort_keys=True), "format": "pt"}


def save_concept(concept: Concept, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write `concept` to `path` atomically (see `trainers.atomic`).

    Args:
        concept (`Concept`): what to write.
        path (`str | PathLike`): the target `.safetensors` file; its folder is created if needed.
        overwrite (`bool`, defaults to `False`): replace an existing file; otherwise raise `FileExistsError`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Concept files are .safetensors, got {path.name!r}.")
    return write_safetensors(file_tensors(concept), path, file_metadata(concept), overwrite)


def read_concept(path: str | os.PathLike[str], name: str | None = None) -> Concept:
    """Read a concept file or any third-party embedding file as a Concept, or refuse it.

    Files are hostile until parsed: whatever goes wrong while reading (a torn or forged file, a structure of the
    wrong kind) becomes a ValueError that says what, and a file that parses but cannot be a concept (NaN or
    infinite values, a zero vector, a sparse tensor, too many vectors, a method without its state) is refused.

    Args:
        path (`str | PathLike`): a `.safetensors`, `.pt` or `.bin` file.
        name (`str`, *optional*): the concept's name; defaults to the name stored in the file, else the file stem.
    """
    path = Path(path)
    try:
        concept = _read(path, name)
        check_concept(concept)
    except RecursionError:
        raise ValueError(f"{path.name}: its structure is nested too deeply to be an embedding.") from None
    except Exception as e:
        reason = str(e) if isinstance(e, ValueError) else \
            f"{path.name}: its contents are not an embedding or a concept ({type(e).__name__}: {e})"
        raise ValueError(ANSI.sub("", reason)) from e
    return concept


def _read(path: Path, name: str | None) -> Concept:
    content: Any
    if path.suffix.lower() == ".safetensors":
        metadata, content = _read_safetensors(path)
    elif path.suffix.lower() in (".pt", ".bin"):
        metadata = {}
        content = _load_pickle(path)
    else:
        raise ValueError(f"{path.name}: unsupported file type; expected one of {EXTENSIONS}.")
    if METADATA_KEY in metadata:
        return _concept_from_record(metadata[METADATA_KEY], content, name)
    pair = _diffusers_sdxl_pair(path)
    if pair is not None:
        stem, vectors = pair
        return Concept(name=name or _safe_stem(Path(stem)), method="ti", arch="sdxl", vectors=vectors,
                       provenance={"source_file": f"{stem}.safetensors + {stem}_2.safetensors"})
    arch, vectors, provenance = parse_embedding(content, path.name)
    return Concept(name=name or _safe_stem(path), method="ti", arch=arch, vectors=vectors,
                   provenance={"source_file": path.name, **provenance})


def _diffusers_sdxl_pair(path: Path) -> tuple[str, dict[str, Tensor]] | None:
    """diffusers' SDXL textual inversion writes two files, `<stem>.safetensors` (CLIP-L, 768 wide) and
    `<stem>_2.safetensors` (CLIP-G, 1280 wide), each one `{token: vectors}`: either one stands for the pair.
    Returns the pair's name (`<stem>`) and its vectors, or None when `path` is not one of such a pair."""
    if path.suffix.lower() != ".safetensors":
        return None
    first = path.with_name(path.name[: -len("_2.safetensors")] + path.suffix) if path.stem.endswith("_2") else path
    second = first.with_name(f"{first.stem}_2{first.suffix}")
    if not (first.is_file() and second.is_file()):
        return None
    tensors = []
    for p in (first, second):
        metadata, content = _read_safetensors(p)
        if len(content) != 1 or METADATA_KEY in metadata:
            return None  # not a diffusers file: read `path` on its own
        tensors.append(next(iter(content.values())))
    if [t.shape[-1] for t in tensors] != [768, 1280]:
        return None
    return first.stem, {"l": _as_matrix(tensors[0], first.name), "g": _as_matrix(tensors[1], second.name)}


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def _load_pickle(path: Path) -> Any:
    """A `.pt`/`.bin` through torch's weights-only unpickler, which refuses code; below torch 2.6 it has known
    bypasses (CVE-2025-32434), so there the file is refused."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < SAFE_UNPICKLING:
        raise ValueError(f"{path.name} is a pickle file, and this torch ({torch.__version__}) is older than 2.6, "
                         "whose safe loading can be bypassed to run code (CVE-2025-32434); convert the file to "
                         ".safetensors with a trusted tool, or update torch.")
    try:  # the original textual_inversion code saves string_to_param as an nn.ParameterDict
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal or a corrupt file: both unreadable for us
        first_line = ANSI.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path.name} is not a plain tensor file (it may need unsafe unpickling, which is "
                         f"refused): {first_line}") from e


def check_concept(concept: Concept) -> None:
    """Refuse a concept no prompt can use. The Concept itself already holds a known method and model, one [n, d]
    matrix per encoder of that model with one n; here its values are checked: dense, finite, 1 to MAX_VECTORS
    vectors of sane length, and the state its method needs."""
    for key, v in concept.vectors.items():
        label = f"the {ENCODER_NAMES.get(key, key)} vectors"
        _check_tensor(v, label)
        if not 1 <= v.shape[0] <= MAX_VECTORS:
            raise ValueError(f"{label} have shape {tuple(v.shape)}; a prompt holds 1 to {MAX_VECTORS} vectors.")
        norms = v.double().norm(dim=-1)
        if bool((norms == 0).any()):
            raise ValueError(f"{label} include a zero vector, which a prompt would silently lose.")
        if bool((norms > MAX_NORM).any()):
            raise ValueError(f"{label} include one of length {float(norms.max()):.3g}, far beyond any embedding's "
                             f"(a vocabulary's are about 0.4 to 1, a long-trained one's a few units).")
    for key, t in concept.tensors.items():
        _check_tensor(t, f"tensor {key}")
    missing = [k for k in METHOD_STATE[concept.method] if k not in concept.state]
    if missing:
        raise ValueError(f"the {concept.method} concept lacks its state ({', '.join(missing)}).")
    if concept.method == "catversion":
        _check_catversion(concept)
    if concept.method == "dti":
        magnitude = concept.state["magnitude"]
        if not isinstance(magnitude, Mapping) or set(magnitude) != set(concept.vectors) or not all(
                isinstance(m, (int, float)) and 0 < m < MAX_NORM for m in magnitude.values()):
            raise ValueError("the dti concept's magnitude is malformed (one length per text encoder).")


def _check_tensor(t: Any, label: str) -> None:
    if not isinstance(t, Tensor) or t.layout != torch.strided or not t.is_floating_point():
        raise ValueError(f"{label} are not a dense floating-point tensor.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label} contain NaN or infinite values.")


def _check_catversion(concept: Concept) -> None:
    layers = concept.state["layers"]
    if not isinstance(layers, Mapping) or not all(isinstance(v, list) and v for v in layers.values()):
        raise ValueError("the catversion concept's layers are malformed.")
    for key, indices in layers.items():
        for i in indices:
            for part in ("keys", "values"):
                if tensor_key(key, i, part) not in concept.tensors:
                    raise ValueError(f"the catversion concept lacks its {part} for clip_{key} layer {i}.")


def _concept_from_record(text: str, content: Mapping[str, Tensor], name: str | None) -> Concept:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("its Concept Forge metadata is not valid JSON (the file was changed after it was "
                         "written).") from None
    problem = _record_problem(record, content)
    if problem:
        raise ValueError(f"its Concept Forge metadata is malformed: {problem}.")
    if record.get("format", 0) > FORMAT_VERSION:
        raise ValueError(f"This concept file has format {record['format']}; update Concept Forge to read it.")
    arch: Arch = record["arch"]
    keys = ARCH_ENCODERS[arch]
    vectors: dict[str, Tensor]
    if arch in MULTI_ENCODER_ARCHS:
        vectors = {k: cpu_float(content[ENCODER_NAMES[k]]) for k in keys if ENCODER_NAMES[k] in content}
    else:
        vectors = {keys[0]: cpu_float(content["emb_params"])} if "emb_params" in content else {}
    tensors = {k: cpu_float(content[k]) for k in record.get("tensor_keys", [])}
    return Concept(name=name or record["name"], method=record["method"], arch=arch, vectors=vectors,
                   state=record.get("state", {}), tensors=tensors, provenance=record.get("provenance", {}))


def _record_problem(record: Any, content: Mapping[str, Tensor]) -> str | None:
    """What makes a Concept Forge record unusable, before any of it is used."""
    if not isinstance(record, Mapping):
        return "not a record"
    if record.get("arch") not in ARCH_ENCODERS:
        return f"unknown base model {record.get('arch')!r}"
    if not isinstance(record.get("method"), str) or not isinstance(record.get("name"), str):
        return "no method or name"
    if not isinstance(record.get("format", 0), int):
        return f"format {record.get('format')!r}"
    keys = record.get("tensor_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in content for k in keys):
        return "it names tensors the file does not hold"
    if not isinstance(record.get("state", {}), Mapping) or not isinstance(record.get("provenance", {}), Mapping):
        return "its state or provenance is not a record"
    return None


def parse_embedding(content: Any, label: str) -> tuple[Arch, dict[str, Tensor], dict[str, Any]]:
    """Find the token vectors in a third-party embedding, in the order ComfyUI's own loader looks.

    Understands A1111 `.pt` (`string_to_param`), kohya/diffusers (`emb_params`, `{token: tensor}`), SDXL
    (`clip_l` + `clip_g`), SD 3.5 (those + `t5xxl`), Flux.1 (`clip_l` + `t5xxl`, or diffusers' `clip_l` + `t5`) and
    Lumina 2 (`gemma2_2b`). Returns the architecture, the vectors per encoder and what provenance the file carries.
    """
    if isinstance(content, Mapping) and "string_to_param" in content:
        params = content["string_to_param"]
        if not isinstance(params, (Mapping, torch.nn.ParameterDict)) or not len(params):
            raise ValueError(f"{label}: its string_to_param holds no vectors.")
        a1111 = {k: content[k] for k in ("name", "step", "sd_checkpoint_name")
                 if isinstance(content.get(k), (str, int))}
        return (*_single_encoder(_as_matrix(next(iter(params.values())), label), label), a1111)
    if not isinstance(content, Mapping):
        raise ValueError(f"{label}: expected a dict of tensors, got {type(content).__name__}.")
    tensors = {k: v for k, v in content.items() if isinstance(v, Tensor)}
    provenance: dict[str, Any] = {}
    if "t5" in tensors and "t5xxl" not in tensors and "clip_l" in tensors:
        # diffusers' Flux pivotal tuning (train_dreambooth_lora_flux_advanced.py) keys T5's vectors "t5"; ComfyUI's
        # tokenizer reads "t5xxl", so Save Concept writes them back under that key
        tensors["t5xxl"] = tensors.pop("t5")
        provenance["source_format"] = "diffusers Flux embeddings (clip_l + t5)"
    families: tuple[tuple[Arch, set[str]], ...] = (("sd3", {"clip_l", "clip_g", "t5xxl"}),
                                                    ("sdxl", {"clip_l", "clip_g"}), ("flux", {"clip_l", "t5xxl"}),
                                                    ("lumina2", {"gemma2_2b"}))
    for arch, keys in families:  # the family whose encoder keys the file holds, the most specific first
        if keys <= tensors.keys():
            return arch, {k: _as_matrix(tensors[ENCODER_NAMES[k]], label) for k in ARCH_ENCODERS[arch]}, provenance
    for key in ("clip_h", "emb_params", "clip_l"):
        if key in tensors:
            return (*_single_encoder(_as_matrix(tensors[key], label), label), {})
    if not tensors:
        raise ValueError(f"{label}: no tensors found; this is not an embedding file.")
    first = next(iter(tensors.values()))  # diffusers {token: tensor}: the first tensor, as ComfyUI reads it
    return (*_single_encoder(_as_matrix(first, label), label), {})


def _as_matrix(t: Any, label: str) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{label}: the vectors are {getattr(t, 'dtype', type(t).__name__)}, not floating-point "
                         "numbers; this is not an embedding.")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{label}: expected token vectors of shape [n, d], got {tuple(t.shape)}.")
    return cpu_float(t)


def _single_encoder(vectors: Tensor, label: str) -> tuple[Arch, dict[str, Tensor]]:
    """The architecture of a one-encoder embedding, from its width, and its vectors keyed by that encoder."""
    arch = arch_for_width(vectors.shape[-1])
    if arch is None and vectors.shape[-1] == 1280:
        raise ValueError(f"{label}: vectors of width 1280 are SDXL's clip_g alone; an SDXL embedding needs clip_l "
                         "too (diffusers writes it beside this file as <name>.safetensors, this one being "
                         "<name>_2.safetensors).")
    if arch is None:
        raise ValueError(f"{label}: vectors of width {vectors.shape[-1]} match neither {ARCH_LABELS['sd1']} (768) "
                         f"nor {ARCH_LABELS['sd2']} (1024); an SDXL embedding needs both clip_l and clip_g.")
    return arch, {ARCH_ENCODERS[arch][0]: vectors}


def _safe_stem(path: Path) -> str:
    """A concept name from a file name: characters a prompt cannot carry become '_'."""
    stem = "".join(c if c.isalnum() or c in "_-." else "_" for c in path.stem)
    return stem.lstrip(".") or "concept"

"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the step, the method's parameters, the optimizer's state, the noise generator's state, the
loss history and a fingerprint of the run's settings; the sample plan needs nothing, being a pure function of the
seed. It is one safetensors file (tensors) with the rest as JSON in its metadata — no pickle — written atomically,
so a process killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from .atomic import write_safetensors

FORMAT = "concept_forge.train_state"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    step: int                          # optimizer steps done
    parameters: list[Tensor]           # the method's parameters, in `Method.parameters()` order
    optimizer: dict[str, Any]          # `optimizer.state_dict()`
    noise_generator: Tensor            # `torch.Generator.get_state()` of the noise/timestep stream
    losses: list[float]
    heldout_before: float | None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)


def pack(value: Any, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able copy of `value` with every tensor moved into `tensors` and replaced by a reference."""
    if isinstance(value, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: pack(v, tensors) for k, v in value.items()}
        return {"__items__": [[pack(k, tensors), pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [pack(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a value of type {type(value).__name__}")


def unpack(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in value["__items__"]}
        return {k: unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v, tensors) for v in value]
    return value


def save_state(state: TrainState, path: str | os.PathLike[str]) -> Path:
    """Write `state` to `path` atomically."""
    tensors: dict[str, Tensor] = {}
    record = pack({"step": state.step, "parameters": state.parameters, "optimizer": state.optimizer,
                   "noise_generator": state.noise_generator, "losses": state.losses,
                   "heldout_before": state.heldout_before, "fingerprint": state.fingerprint,
                   "heldout_curve": state.heldout_curve}, tensors)
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "state": json.dumps(record)}
    return write_safetensors(tensors, path, metadata)


def load_state(path: str | os.PathLike[str]) -> TrainState:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{Path(path).name} is not a Concept Forge training checkpoint.")
        if int(metadata.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{Path(path).name} was written by a newer Concept Forge; update to resume from it.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = unpack(json.loads(metadata["state"]), tensors)
    return TrainState(**record)


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint and the run that wants to continue it."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]

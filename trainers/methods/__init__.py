"""The methods. Each is a parameterization plus an optimizer rule; none of them loops (see `trainers.loop`).

A method module exposes `Options` (a frozen dataclass with the paper's defaults, including `learning_rate`,
`steps` and `flip_p`) and `build(host, init_word, num_vectors, options, seed) -> Method`; optionally
`training_prompts(prompts, per_image, init_word)` when it trains on other prompts than the templates.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..concept import Method as MethodName
from ..host import Host
from . import batex, catversion, dti, ti, tuning_encoder
from .base import Method, freeze_encoders, init_vectors

__all__ = ["Method", "MODULES", "create_method", "freeze_encoders", "init_vectors", "method_options",
           "method_prompts"]

MODULES: dict[str, ModuleType] = {"ti": ti, "dti": dti, "batex": batex, "catversion": catversion,
                                  "tuning_encoder": tuning_encoder}


def _module(name: str) -> ModuleType:
    if name not in MODULES:
        raise ValueError(f"method {name!r} is not available; choose one of {', '.join(MODULES)}.")
    return MODULES[name]


def method_options(name: str, overrides: Any = None) -> Any:
    """The method's options: its paper defaults, or `overrides` when they belong to this method."""
    options_class = _module(name).Options
    if overrides is None:
        return options_class()
    if not isinstance(overrides, options_class):
        given = next((n.upper() for n, m in MODULES.items() if isinstance(overrides, m.Options)), "unknown")
        raise ValueError(f"method_options are {given} options but the method is {name!r}; connect the options "
                         f"node of {name!r} or change the method.")
    return overrides


def create_method(name: MethodName, host: Host, init_word: str, num_vectors: int, options: Any,
                  seed: int = 0) -> Method:
    """Build the method `name` on `host`, initialised from `init_word` (random initialisations use `seed`)."""
    return _module(name).build(host, init_word, num_vectors, options, seed)  # type: ignore[no-any-return]


def method_prompts(name: str, prompts: list[str], per_image: bool, init_word: str) -> list[str]:
    """The prompts a method trains on: the templates or captions, unless the method has its own rule."""
    rule = getattr(_module(name), "training_prompts", None)
    return prompts if rule is None else list(rule(prompts, per_image, init_word.strip()))

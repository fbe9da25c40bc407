"""The methods. Each is a parameterization plus an optimizer rule; none of them loops (see `trainers.loop`).

A method module exposes `Options` (a frozen dataclass with the paper's defaults, including `learning_rate`,
`steps` and `flip_p`) and `build(host, init_word, num_vectors, options) -> Method`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..concept import Method as MethodName
from ..host import Host
from . import dti, ti
from .base import Method, init_vectors

__all__ = ["Method", "MODULES", "create_method", "init_vectors", "method_options"]

MODULES: dict[str, ModuleType] = {"ti": ti, "dti": dti}


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


def create_method(name: MethodName, host: Host, init_word: str, num_vectors: int, options: Any) -> Method:
    """Build the method `name` on `host`, initialised from `init_word`."""
    return _module(name).build(host, init_word, num_vectors, options)  # type: ignore[no-any-return]

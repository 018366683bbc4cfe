"""The method registry: every module of this package except ``base`` defines one merge
method (``METHOD = SomeMethod()``), found by ``pkgutil`` the first time a method is asked
for. Adding a method is one new file here (plus its tests): the spec parser, the planner,
the executors, adapter output and the API's JSON Schema all read it from the registry.

Torch-free: method modules import torch only inside the hooks that touch tensors.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import MergeMethod

_REGISTRY: dict[str, MergeMethod] = {}


def _discover() -> dict[str, MergeMethod]:
    if not _REGISTRY:
        found: dict[str, MergeMethod] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            method = getattr(module, "METHOD", None)
            if not isinstance(method, MergeMethod):
                raise TypeError(f"{module.__name__} defines no METHOD (a MergeMethod instance)")
            if method.name in found:
                raise TypeError(f"method {method.name!r} is defined twice ({module.__name__})")
            found[method.name] = method
        _REGISTRY.update(found)
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every registered method name, alphabetically."""
    return tuple(sorted(_discover()))


def all_methods() -> list[MergeMethod]:
    return [_discover()[n] for n in names()]


def get(name: str) -> MergeMethod:
    """The registered method ``name`` (KeyError if there is none: the spec parser checks)."""
    return _discover()[name]


__all__ = ["MergeMethod", "all_methods", "get", "names"]

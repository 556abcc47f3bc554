"""Lazy public names for the subpackages (PEP 562): ``from sidrec.index import SIDIndex`` imports only
``sidrec.index.sid_index``, not every module of the package (some import torch or Great Expectations)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, modules: list[str], names: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``names`` maps a public name to the module
    (of ``modules``) that defines it; a module name itself gives the submodule."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(names) | set(modules))

    return __getattr__, __dir__, sorted(names)

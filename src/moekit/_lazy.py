"""A package's public names, imported from their modules when first asked for (PEP 562).

Why: a package's ``__init__`` runs whenever any of its modules is imported, so names re-exported
there eagerly would import their modules' dependencies (scikit-learn, SciPy, matplotlib, pandas)
into every process that imports the package for anything: the worker processes of `moekit
vowels`, which only train, started 1.2 s later for it.

Example:
    >>> __getattr__, __dir__ = lazy_names("moekit.data", {"read_csv": "moekit.data.tabular"})
    >>> __getattr__("read_csv").__module__
    'moekit.data.tabular'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_names(package: str, names: dict[str, str]
               ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` whose ``names`` (name ->
    the module defining it; a subpackage or module of ``package`` maps to itself) are imported on
    first use."""

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        found = importlib.import_module(module)
        return found if module == f"{package}.{name}" else getattr(found, name)

    def __dir__() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__

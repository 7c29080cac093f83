"""The errors and warnings moekit raises, in one place, so that callers can catch or filter them.

    >>> import warnings
    >>> from moekit.exceptions import ConvergenceWarning
    >>> warnings.simplefilter("ignore", ConvergenceWarning)  # a grid search of short fits

A :class:`DataError` names the Python parameters that fix it as :class:`Setting` parts, so that the
command line can print its own flags instead (``missing='drop'`` becomes ``--missing drop``):

    >>> err = DataError("missing values in column 'a'; pass ", Setting("missing", "drop"), ".")
    >>> str(err)
    "missing values in column 'a'; pass missing='drop'."
    >>> err.render(lambda s: f"--{s.name} {s.value}")
    "missing values in column 'a'; pass --missing drop."
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class MoekitError(Exception):
    """The base of every error moekit raises on purpose."""


class _NameOnly:
    def __repr__(self) -> str:
        return "NAME_ONLY"


NAME_ONLY: Any = _NameOnly()


@dataclass(frozen=True)
class Setting:
    """A parameter setting named in an error message: ``name=value`` in Python; with the value left
    out (``NAME_ONLY``), the parameter itself."""

    name: str
    value: Any = NAME_ONLY

    def python(self) -> str:
        return self.name if self.value is NAME_ONLY else f"{self.name}={self.value!r}"


class DataError(MoekitError, ValueError):
    """The data (or a run folder) cannot be used as given; the message says where and how to fix it.

    Built from text parts and :class:`Setting` parts; ``str(err)`` writes each setting as a Python
    keyword (``missing='drop'``) and :meth:`render` with any other spelling (the CLI's flags).
    """

    def __init__(self, *parts: str | Setting) -> None:
        self.parts = parts
        super().__init__(self.render(Setting.python))

    @property
    def settings(self) -> tuple[Setting, ...]:
        return tuple(p for p in self.parts if isinstance(p, Setting))

    def render(self, spell: Callable[[Setting], str]) -> str:
        """The message with each setting written by ``spell``."""
        return "".join(spell(p) if isinstance(p, Setting) else p for p in self.parts)


class VowelLabelError(MoekitError, RuntimeError):
    """The vowel labels of the Peterson & Barney table look swapped or altered."""


class ConvergenceWarning(UserWarning):
    """A fit stopped before its criterion: EM hit its iteration cap, or a solver stalled."""


class DivergenceWarning(RuntimeWarning):
    """A fit diverged: its loss became NaN or infinite, or EM's log-likelihood fell."""


__all__ = ["NAME_ONLY", "ConvergenceWarning", "DataError", "DivergenceWarning", "MoekitError",
           "Setting", "VowelLabelError"]

"""Saved JSON read back with suspicion: a bounded read, and fields taken one by one, each checked.

A file a user can edit is hostile input: it may be huge, nested past Python's recursion limit, or
hold a string where a number belongs. :func:`read_json_file` reads it within a size bound and
:class:`SavedRecord` takes its fields, so that every problem is a
:class:`~moekit.exceptions.DataError` naming the file, the field (``metadata.sklearn.classes``), the
value it holds (in JSON's spelling) and the fix, raised before anything is built from it.

    >>> record = SavedRecord("load_model", Path("m/config.json"), "config", {"n_experts": "4"})
    >>> record.integer("n_experts", minimum=1)
    Traceback (most recent call last):
    ...
    moekit.exceptions.DataError: load_model: 'm/config.json': config.n_experts must be an integer \
>= 1; got "4" (a string). The file was edited or damaged: restore it, or save the model again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moekit.exceptions import DataError

MAX_JSON_BYTES = 32 * 2**20  # room for a run's metadata (encodings, validation rows) on big tables
FIX = "The file was edited or damaged: restore it, or save the model again."
_SHOWN_CHARS = 60


def describe(value: Any) -> str:
    """``value`` as the JSON file spells it, shortened, with its JSON kind.

    Example:
        >>> describe("4"), describe(True), describe(4.0), describe(None)
        ('"4" (a string)', 'true (a boolean)', '4.0 (a fraction)', 'null')
    """
    if value is None:
        return "null"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS - 3] + "..."
    kinds = [(bool, "a boolean"), (int, "a whole number"), (float, "a fraction"),
             (str, "a string"), (list, "a list"), (dict, "an object")]
    kind = next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
    if isinstance(value, float) and not math.isfinite(value):
        kind = "not a finite number"
    return f"{text} ({kind})"


def read_json_file(owner: str, path: Path | str, *, max_bytes: int = MAX_JSON_BYTES,
                   fix: str = FIX) -> Any:
    """The JSON value in ``path``, read only if it is at most ``max_bytes`` long; a file too large,
    too deeply nested, not UTF-8 or not JSON is a DataError naming it, ending with ``fix``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{owner}: {str(path)!r} is {size:,} bytes; moekit reads JSON files of "
                            f"at most {max_bytes:,} bytes, and writes far smaller ones. {fix}")
        with path.open("rb") as file:
            raw = file.read(max_bytes + 1)  # the size may have changed since stat: stay in bound
    except OSError as err:
        raise DataError(f"{owner}: cannot read {str(path)!r}: {err.strerror or err}.") from None
    if len(raw) > max_bytes:
        raise DataError(f"{owner}: {str(path)!r} is over {max_bytes:,} bytes. {fix}")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise DataError(f"{owner}: {str(path)!r} is nested too deeply to be a file moekit wrote. "
                        f"{fix}") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, or an integer too long
        raise DataError(f"{owner}: {str(path)!r} is not valid JSON ({err}). {fix}") from None


class SavedRecord:
    """A JSON object found at ``field`` of the file ``path``; its fields are taken checked.

    Every check raises a DataError that starts with ``owner`` and the file, names the field's full
    path and the value, and ends with the fix.
    """

    def __init__(self, owner: str, path: Path, field: str, data: Any) -> None:
        self.owner, self.path, self.field = owner, path, field
        if not isinstance(data, dict):
            raise self.error(f"{field} must be a JSON object; got {describe(data)}.")
        self.data: dict[str, Any] = data

    def name(self, key: str) -> str:
        """The full path of one of this record's fields."""
        return f"{self.field}.{key}" if self.field else key

    def error(self, problem: str, fix: str = FIX) -> DataError:
        return DataError(f"{self.owner}: {str(self.path)!r}: {problem} {fix}")

    def refuse(self, key: str, need: str, value: Any) -> DataError:
        """The error for field ``key``, which must be ``need`` and holds ``value``."""
        return self.error(f"{self.name(key)} must be {need}; got {describe(value)}.")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        """The raw value of a required field."""
        if key not in self.data:
            raise self.error(f"{self.name(key)} is missing.")
        return self.data[key]

    def child(self, key: str) -> SavedRecord:
        return SavedRecord(self.owner, self.path, self.name(key), self.get(key))

    def integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.get(key)
        bound = "" if minimum is None else f" >= {minimum}"
        if (isinstance(value, bool) or not isinstance(value, int)
                or (minimum is not None and value < minimum)):
            raise self.refuse(key, f"an integer{bound}", value)
        return value

    def number(self, key: str, *, optional: bool = False) -> float | None:
        """A finite number (an integer is one); None allowed when ``optional``."""
        value = self.get(key)
        if value is None and optional:
            return None
        if not is_finite_number(value):
            raise self.refuse(key, "a finite number" + (" or null" if optional else ""), value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.refuse(key, "true or false", value)
        return value

    def text(self, key: str, *, choices: Iterable[str] | None = None,
            optional: bool = False) -> str | None:
        value = self.get(key)
        if value is None and optional:
            return None
        options = None if choices is None else sorted(choices)
        if not isinstance(value, str) or (options is not None and value not in options):
            need = "a string" if options is None else f"one of {options}"
            raise self.refuse(key, need + (" or null" if optional else ""), value)
        return value

    def array(self, key: str, *, length: int | None = None, optional: bool = False
             ) -> list[Any] | None:
        value = self.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, list) or (length is not None and len(value) != length):
            need = "a list" if length is None else f"a list of {length}"
            raise self.refuse(key, need + (" or null" if optional else ""), value)
        return value

    def numbers(self, key: str, *, length: int, positive: bool = False) -> list[float]:
        """A list of ``length`` finite numbers (each > 0 when ``positive``)."""
        values = self.array(key)
        assert values is not None
        need = f"{length} finite numbers" + (" > 0" if positive else "")
        if len(values) != length:
            raise self.error(f"{self.name(key)} must hold {need}; it holds {len(values)}.")
        for i, v in enumerate(values):
            if not is_finite_number(v) or (positive and v <= 0):
                raise self.error(f"{self.name(key)} must hold {need}; got {self.name(key)}[{i}]="
                                 f"{describe(v)}.")
        return [float(v) for v in values]


def is_finite_number(value: Any) -> bool:
    """An int or float, not a bool, and finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False

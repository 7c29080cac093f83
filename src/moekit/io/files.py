"""Files written whole or not at all, and values made JSON-ready.

Every file moekit writes goes through :func:`atomic_path`: written to ``.NAME.xxxxxxxx.tmp`` beside
it and renamed into place, so a crash never leaves a half-written file under the real name (what a
killed write leaves is removed by the next run written there:
:func:`moekit.io.run_folder.clean_leftovers`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, else removed.

    Example:
        >>> with atomic_path(tmp_dir / "results.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it private; a saved result should read like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def jsonable(value: Any) -> Any:
    """``value`` made JSON-ready: dicts, lists, tuples and arrays recursively, numpy scalars as
    Python numbers, and a non-finite float (NaN, inf) as None.

    Example:
        >>> jsonable({"a": np.array([1.0, np.nan]), "b": (np.int64(2), math.inf)})
        {'a': [1.0, None], 'b': [2, None]}
    """
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value

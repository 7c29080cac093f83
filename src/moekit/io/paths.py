"""Paths read from files kept inside their folder, and output paths checked before any work.

A run folder's JSON is a file a user can edit: a model path ``../../x`` or a link leading out must
not make moekit read or write outside the run (:func:`inside`, :func:`plain_name`). An output that
cannot be written is refused before the work that would be lost (:func:`check_writable`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from moekit.exceptions import DataError, Setting

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def inside(root: Path | str, relative: Any, *, source: Path | str, field: str) -> Path:
    """``root / relative``, refusing a path that leads out of ``root``: not a non-empty string,
    absolute, with a ``..`` part, or through a link that points outside. ``source`` and ``field``
    name where the path was read, for the message.

    Example:
        >>> inside(Path("run"), "models/a", source="results.json", field="path").as_posix()
        'run/models/a'
    """
    root, where = Path(root), f"{field} in {str(source)!r} is {relative!r}"
    # anything but a string (or one with a NUL byte) reads as "/": absolute, so refused
    parts = PurePosixPath(relative if isinstance(relative, str) and "\x00" not in relative else "/")
    if not relative or parts.is_absolute() or ".." in parts.parts:
        raise DataError(f"{where}: it must be a relative path without '..', inside the run folder "
                        f"{str(root)!r}.")
    if not (root / parts).resolve().is_relative_to(root.resolve()):
        raise DataError(f"{where}, a link leading outside the run folder {str(root)!r} (to "
                        f"{str((root / parts).resolve())!r}); a run's paths stay inside it.")
    return root / parts


def plain_name(name: Any, *, source: Path | str, field: str) -> str:
    """``name`` if it can be one file name (letters, digits, ``_ . -``, no leading dot), else a
    :class:`DataError` naming where it was read."""
    if not isinstance(name, str) or not PLAIN_NAME.match(name) or ".." in name:
        raise DataError(f"{field} in {str(source)!r} must be a plain name (letters, digits, "
                        f"_ . -); got {name!r}.")
    return name


def not_writable(out: Path, parent: Path, reason: str) -> DataError:
    return DataError(Setting("out", str(out)), f" cannot be written: {reason} ({str(parent)!r}); "
                     "choose a folder you can write to.")


def check_writable(out: Path | str, *, folder: bool = True) -> None:
    """Refuse, before any work, an output path that cannot be written: ``out`` is a file where a
    folder is wanted (or the reverse), an ancestor is a file, or the nearest existing ancestor does
    not let a folder be made in it (probed by making and removing one)."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise DataError(Setting("out", str(out)), " is a file; give a folder.")
    if not folder and out.is_dir():
        raise DataError(Setting("out", str(out)), " is a folder; give the path of a file.")
    parent = out.parent  # a run is built beside its folder, a file likewise
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise not_writable(out, parent, "it is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".probe"))
    except OSError as err:
        raise not_writable(out, parent, err.strerror or str(err)) from None

"""Run folders built whole: a run is filled in a sibling folder and put in place with one rename.

A run folder (`moekit fit`, `vowels`, `vowels-sweep`, `demo`, `compare-solvers`) is built in the
sibling ``.NAME.partial`` by :func:`run_folder`: its manifest (``.moekit-run.json``) is written
last, then one rename puts it in place, swapping out a run it replaces (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames), which is deleted after. Readers require
the manifest (:func:`require_manifest`), so an interrupted run is never taken for a complete one.
What killed writes leave (``.NAME.*.tmp``, ``.NAME.partial``, ``.NAME.old``) is never read, and is
removed by the next run written there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moekit._version import __version__
from moekit.exceptions import DataError, Setting
from moekit.io.files import remove, write_text_atomic
from moekit.io.paths import check_writable, not_writable
from moekit.io.records import read_json_file

logger = logging.getLogger(__name__)

MANIFEST_FILE, MANIFEST_FORMAT = ".moekit-run.json", "moekit-run"
# A resumable run keeps its state here, inside its partial folder; neither reaches the final run.
CHECKPOINT_DIR, RESUME_FILE = "checkpoint", ".moekit-resume.json"
RERUN_FIX = "The file was edited or damaged: rewrite it with the moekit command that made it."
LEFTOVER = re.compile(r"^\..+(\.[a-z0-9_]{8}\.(tmp|probe)|\.partial|\.old)$")


def partial_folder(out: Path | str) -> Path:
    """Where the run for ``out`` is built: the sibling ``.NAME.partial`` (a fixed name, so that an
    interrupted run can be found and resumed)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _aside_folder(out: Path) -> Path:  # where a replaced run waits to be deleted
    return out.parent / f".{out.name}.old"


def clean_leftovers(folder: Path | str) -> list[Path]:
    """Delete, in ``folder`` and below, what killed writes left: atomic writes' temporary files
    (``.NAME.xxxxxxxx.tmp``) and folders built or set aside but never swapped in (``.NAME.partial``,
    ``.NAME.old``). Returns what was removed."""
    removed = []
    for parent, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if LEFTOVER.match(name):
                removed.append(Path(parent, name))
                remove(removed[-1])
        dirs[:] = [d for d in dirs if not LEFTOVER.match(d)]
    return removed


@functools.cache
def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (``renameat2(RENAME_EXCHANGE)``); False where the system or the
    file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(built: Path | str, out: Path | str) -> None:
    """Put the folder ``built`` at ``out`` with one rename; what was at ``out`` is swapped out in
    that rename, then deleted."""
    built, out = Path(built), Path(out)
    aside = _aside_folder(out)
    remove(aside)
    if not os.path.lexists(out):
        os.rename(built, out)
        return
    if _exchange(built, out):
        os.rename(built, aside)  # ``built`` now holds what was at ``out``
    else:  # two renames: a kill between them leaves the old run in .NAME.old, the new in built
        os.rename(out, aside)
        os.rename(built, out)
    remove(aside)


@contextmanager
def folder_built_whole(out: Path | str) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` to fill; on success it replaces ``out`` in one rename,
    on an error it is deleted and ``out`` is left as it was."""
    out = Path(out)
    build = partial_folder(out)
    remove(build)
    build.mkdir(parents=True)
    try:
        yield build
    except BaseException:
        remove(build)
        raise
    swap_in(build, out)


def is_resumable(build: Path) -> bool:
    """Whether a partial run folder holds an interrupted run's checkpoint (and no manifest: a
    finished run removes its checkpoint before its manifest is written)."""
    checkpoint = build / CHECKPOINT_DIR
    return (checkpoint.is_dir() and not (build / MANIFEST_FILE).exists()
            and any(checkpoint.iterdir()))


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not LEFTOVER.match(p.name))


def _run_path(out: Path | str) -> Path:
    """``out`` made absolute (so that ``.`` has a name to build beside), a link to a run resolved
    (the run is replaced, not the link)."""
    out = Path(os.path.abspath(out))
    out = out.resolve() if out.is_symlink() else out
    if not out.name:
        raise DataError(Setting("out", str(out)), " is the root folder; give a folder inside it.")
    return out


def check_run_destination(out: Path | str, *, overwrite: bool = False, resume: bool = False,
                          older: Collection[str] = ()) -> None:
    """Refuse, before any work, a run folder that cannot be (re)written: ``out`` is a file; it holds
    files and ``overwrite`` is off; it holds files but is not a moekit run (no manifest, none of the
    ``older`` files an older moekit wrote); or an interrupted run's checkpoint waits beside it and
    neither ``resume`` nor ``overwrite`` says what to do with it."""
    out = _run_path(out)
    check_writable(out)
    entries = _entries(out) if out.is_dir() else []
    if entries and not overwrite:
        raise DataError(f"{str(out)!r} already holds files; pass ", Setting("overwrite", True),
                        " to replace its run, or choose another ", Setting("out"), ".")
    if entries and MANIFEST_FILE not in entries and not set(older) & set(entries):
        raise DataError(f"{str(out)!r} holds files that are not a moekit run (e.g. "
                        f"{entries[0]!r}); moekit replaces only its own runs: choose another ",
                        Setting("out"), ".")
    if is_resumable(partial_folder(out)) and not (resume or overwrite):
        raise DataError(f"an interrupted run left its work in {str(partial_folder(out))!r}; pass ",
                        Setting("resume", True), " to continue it, or ", Setting("overwrite", True),
                        " to start again.")


def _make_build(out: Path, build: Path, resume: bool) -> list[Path]:
    """The partial folder, ready: kept as it is to resume, else made empty. Returns the folders
    made above it (deleted again if the run fails)."""
    remove(_aside_folder(out))
    if resume and is_resumable(build):
        logger.info("resuming the interrupted run in %s", build)
        clean_leftovers(build)
        return []
    if build.exists() or build.is_symlink():
        logger.info("removing %s, left by an interrupted run", build)
        remove(build)
    made = []
    for parent in reversed(out.parents):
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    build.mkdir()
    return made


def write_manifest(folder: Path | str, command: str) -> Path:
    """Write ``folder``'s manifest (the command, moekit's version, the time, every file): the last
    file of a run, whose presence says the run is complete."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not LEFTOVER.match(p.name))
    record = {"format": MANIFEST_FORMAT, "format_version": 1, "command": command,
              "moekit_version": __version__,
              "written": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
    write_text_atomic(folder / MANIFEST_FILE, json.dumps(record, indent=1))
    return folder / MANIFEST_FILE


@contextmanager
def run_folder(out: Path | str, command: str, *, overwrite: bool = False, resume: bool = False,
               older: Collection[str] = ()) -> Iterator[Path]:
    """Build the run of ``command`` for the folder ``out``: yield its partial folder to fill; on
    success write the manifest last and swap the run in for ``out`` in one rename.

    ``overwrite`` replaces a run already in ``out`` (only a moekit run: one with a manifest or one
    of the ``older`` files); ``resume`` keeps the checkpoint an interrupted run left in the partial
    folder. On an error (KeyboardInterrupt included) the partial folder is deleted, unless it holds
    a checkpoint: then it is kept for ``resume``, and a note on the exception says where.

    Example:
        >>> with run_folder("runs/demo", "demo", overwrite=True) as build:  # doctest: +SKIP
        ...     write_text_atomic(build / "results.json", "{}")
    """
    out = _run_path(out)
    check_run_destination(out, overwrite=overwrite, resume=resume, older=older)
    build = partial_folder(out)
    try:
        made = _make_build(out, build, resume)
    except OSError as err:
        raise not_writable(out, Path(err.filename or out), err.strerror or str(err)) from None
    try:
        yield build
    except BaseException as err:
        if is_resumable(build):  # its checkpoint is work that a rerun with ``resume`` goes on from
            err.add_note(f"the run so far is kept in {build}; rerun with --resume (resume=True "
                         "in Python) to continue it")
        else:
            remove(build)
            for parent in reversed(made):
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
        raise
    remove(build / CHECKPOINT_DIR)
    remove(build / RESUME_FILE)
    write_manifest(build, command)
    swap_in(build, out)


def require_manifest(folder: Path | str, commands: Collection[str], rerun: str
                     ) -> dict[str, Any]:
    """The manifest of a complete run of one of ``commands`` in ``folder``; a :class:`DataError`
    otherwise (``rerun`` is the command line the message gives to make the run again)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file() and not _entries(folder):
        raise DataError(f"{str(folder)!r} is not a moekit run folder: it is empty; give the folder "
                        "a moekit command wrote (its ", Setting("out"), ").")
    if not path.is_file():
        raise DataError(f"{str(folder)!r} is not a complete moekit run: it has no manifest "
                        f"({MANIFEST_FILE}), so it was interrupted, or written by an older moekit. "
                        "Rerun `", rerun, "`.")
    record = read_json_file("require_manifest", path, fix=RERUN_FIX)
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{str(path)!r} is not a moekit run manifest; rerun `", rerun, "`.")
    if record.get("command") not in commands:
        wanted = " or ".join(f"`moekit {c}`" for c in sorted(commands))
        raise DataError(f"{str(folder)!r} is a run of `moekit {record.get('command')}`; this "
                        f"needs a run of {wanted}.")
    return record


def record_or_check_identity(build: Path | str, identity: dict[str, Any], *, resume: bool,
                             command: str, what: str,
                             explain: Mapping[str, Callable[[Any, Any], str]] | None = None
                             ) -> None:
    """Record what makes a run that run (``identity``: its options, a digest of its data) in its
    partial folder ``build``; when resuming one that recorded it, refuse (a DataError) an identity
    that differs, naming every difference: ``--name`` before and now, or for the entries of
    ``explain`` (not options) what ``explain[key](before, now)`` says.

    ``command`` names the command in a damaged record's message ('moekit fit --resume'), ``what``
    the run ('fit')."""
    record, identity = Path(build) / RESUME_FILE, json.loads(json.dumps(identity))
    if not (resume and record.is_file()):
        write_text_atomic(record, json.dumps(identity, indent=1))
        return
    before = read_json_file(command, record, fix=RERUN_FIX)
    before = before if isinstance(before, dict) else {}
    changed = [k for k, v in identity.items() if before.get(k) != v]
    if not changed:
        return
    where = f"cannot resume the interrupted {what} in {str(build)!r}: it ran with "
    parts: list[str | Setting] = [where]
    for i, key in enumerate(changed):
        parts.append(", " if i else "")
        if explain and key in explain:
            parts.append(explain[key](before.get(key), identity[key]))
        else:
            parts += [Setting(key, before.get(key)), ", not ", Setting(key, identity[key])]
    raise DataError(*parts, "; rerun with its options, or pass ", Setting("overwrite", True),
                    " to start again.")


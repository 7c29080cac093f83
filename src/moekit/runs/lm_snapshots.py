"""Snapshots of the MoE model over a `moekit lm train` run, kept after it ends (the checkpoint is
not): ``RUN/snapshots/step_XXXXXX/``, :func:`~moekit.io.models.save_model` folders like ``RUN/moe``,
so that `moekit lm analyze` can measure how the routing settles (routing saturation).

A snapshot is taken at every multiple of the interval below the last step (step 0 included: the
initial routing); the final model is ``RUN/moe`` itself. Each folder is saved beside its place
(``.step_XXXXXX.xxxxxxxx.tmp``, what :func:`~moekit.io.run_folder.clean_leftovers` removes) and
put in place with one rename, and is recorded in the history (``history['snapshots']``) only
once it is whole. The history travels in the checkpoint, so on resume the folders on disk that
the checkpoint's history does not record (written after it, before a kill) are deleted and are
written again, the same bits, when the resumed run reaches their step (:func:`prune_snapshots`).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moekit.io.files import remove
from moekit.io.models import save_model
from moekit.io.run_folder import swap_in

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
SNAPSHOTS_PER_RUN = 8  # the default interval: steps / 8, so a handful of points over the run
NAME = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class Snapshot:
    """A saved snapshot: the number of steps its weights had run, and its model folder."""

    step: int
    path: Path


def snapshot_name(step: int) -> str:
    """The folder name of the snapshot after ``step`` steps.

        >>> snapshot_name(250)
        'step_000250'
    """
    return f"step_{step:06d}"


def snapshot_interval(every: int | None, steps: int) -> int:
    """Steps between snapshots: ``every`` as given (0: none), or for None about ``steps`` /
    SNAPSHOTS_PER_RUN, rounded, at least 1.

        >>> snapshot_interval(None, 1000), snapshot_interval(None, 30), snapshot_interval(0, 30)
        (125, 4, 0)
    """
    return max(1, round(steps / SNAPSHOTS_PER_RUN)) if every is None else every


def snapshot_due(step: int, every: int, steps: int, history: dict[str, Any]) -> bool:
    """Whether the weights after ``step`` steps are to be saved now: a multiple of ``every``
    below the last step, and not already recorded in ``history``."""
    if not every or step % every or step >= steps:
        return False
    return not any(s["step"] == step for s in history.get("snapshots", []))


def save_snapshot(model: nn.Module, build: Path, step: int, history: dict[str, Any]) -> Path:
    """Save ``model`` as the snapshot of ``step`` in the run folder ``build`` (replacing one a
    killed run left there), then record it in ``history['snapshots']``; returns its folder."""
    folder = Path(build) / SNAPSHOT_DIR / snapshot_name(step)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a saved model should read like any other
    try:
        save_model(model, tmp, metadata={"lm_snapshot": {"step": step}})
        swap_in(tmp, folder)
    finally:
        remove(tmp)  # gone after the swap; what a failed save left otherwise
    history.setdefault("snapshots", []).append(
        {"step": step, "path": folder.relative_to(build).as_posix()})
    logger.info("lm train: snapshot of step %d in %s", step, folder)
    return folder


def prune_snapshots(build: Path, history: dict[str, Any]) -> list[Path]:
    """Delete the snapshot folders in ``build`` that ``history`` does not record (written after
    the checkpoint it came from); returns them."""
    recorded = {s["step"] for s in history.get("snapshots", [])}
    stale = [s.path for s in list_snapshots(build) if s.step not in recorded]
    for path in stale:
        remove(path)
    return stale


def list_snapshots(run: Path) -> list[Snapshot]:
    """The snapshots in the run folder ``run``, by step (none when it has no snapshots folder)."""
    folder = Path(run) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [Snapshot(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := NAME.match(p.name))]
    return sorted(found, key=lambda s: s.step)

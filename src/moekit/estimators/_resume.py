"""Resuming an estimator's fit from its checkpoint folder (the ``checkpoint`` parameter).

The folder holds ``fit.json``, what the fit is (the estimator, its parameters, a fingerprint of X
and of the encoded y, and the seed), and one checkpoint per stage of the fit, named by the stage:
``n_experts_3.pt`` for each candidate of n_experts='auto', ``alpha_0.5.pt`` for each prior precision
of alpha='auto', ``final.pt`` for the fit on every row. A gradient stage is saved every
``CHECKPOINT_EVERY`` epochs and goes on from its last save (:mod:`moekit.fitting.checkpoint`); an
EM stage is saved when it ends (EM fits are short: one interrupted midway runs again from its
start, deterministically). A finished stage is read back, not run. So a fit killed at any point and
run again on the same folder ends bit for bit where an uninterrupted fit would.

A folder written by another fit (other parameters, other data, another estimator) is refused, naming
each difference. What may differ: ``verbose``, ``checkpoint`` (the folder may be moved) and
``max_epochs``, if raised (each stage then goes on from where it stopped). A fit with
random_state=None (or a RandomState) resumes with the seed the interrupted fit drew.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from moekit.exceptions import DataError, Setting
from moekit.fitting.checkpoint import fingerprint, load_em_result, save_em_result
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.io.files import jsonable, write_text_atomic

MANIFEST = "fit.json"
FORMAT = 1
CHECKPOINT_EVERY = 10  # epochs between saves of a gradient stage
MAY_CHANGE = ("checkpoint", "verbose")  # and max_epochs, raised


@dataclass(frozen=True)
class FitStages:
    """The checkpoint folder of one estimator fit: where each stage is saved."""

    folder: Path

    def path(self, stage: str) -> str:
        return str(self.folder / f"{stage}.pt")


def _record(estimator: Any, X: np.ndarray, t: np.ndarray, seed: int) -> dict[str, Any]:
    params = {name: jsonable(value) for name, value in estimator.get_params().items()
              if name not in MAY_CHANGE}
    if not isinstance(estimator.random_state, numbers.Integral):
        params["random_state"] = None  # drawn: the resumed fit takes the saved seed
    data = {"X": fingerprint(X), "y": fingerprint(t)}
    if hasattr(estimator, "classes_"):
        data["classes"] = str([str(c) for c in estimator.classes_])
    return {"format": FORMAT, "estimator": type(estimator).__name__, "params": params,
            "data": data, "seed": seed}


def _differences(saved: dict[str, Any], current: dict[str, Any]
                 ) -> list[tuple[str | Setting, str | Setting]]:
    if saved["estimator"] != current["estimator"]:
        return [(f"a {saved['estimator']}", f"a {current['estimator']}")]
    found: list[tuple[str | Setting, str | Setting]] = []
    old, new = saved["params"], current["params"]
    for name in dict.fromkeys([*old, *new]):
        if name == "max_epochs" and new[name] >= old.get(name, new[name]):
            continue  # raised: each stage goes on
        if old.get(name) != new.get(name):
            found.append((Setting(name, old.get(name)), Setting(name, new.get(name))))
    old, new = saved["data"], current["data"]
    found.extend((f"{name}: {old.get(name)}", f"{name}: {new.get(name)}")
                 for name in dict.fromkeys([*old, *new]) if old.get(name) != new.get(name))
    return found


def _joined(items: list[str | Setting]) -> list[str | Setting]:
    return [part for i, item in enumerate(items) for part in ([", "] if i else []) + [item]]


def _read_manifest(owner: str, path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{owner}: the checkpoint record {str(path)!r} cannot be read ({err}); "
                        "delete its folder to start the fit again.") from err
    keys = ("format", "estimator", "params", "data", "seed")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT \
            or not all(k in saved for k in keys):
        raise DataError(f"{owner}: {str(path)!r} is not the record of an estimator fit written "
                        f"by this moekit (format {FORMAT}); delete its folder to start the fit "
                        "again.")
    return saved


def _folder(owner: str, checkpoint: Any) -> Path:
    folder = Path(checkpoint)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{owner}: ", Setting("checkpoint", str(folder)),
                        " is a file; give a folder (it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{owner}: the folder ", Setting("checkpoint", str(folder)),
                        f" cannot be created ({err.strerror or err}); give a writable one."
                        ) from err
    return folder


def open_stages(estimator: Any, X: np.ndarray, t: np.ndarray, seed: int
                ) -> tuple[FitStages | None, int]:
    """The stages of this fit in ``estimator.checkpoint`` (None without one) and the seed to fit
    with; a DataError naming each difference when the folder holds another fit."""
    if estimator.checkpoint is None:
        return None, seed
    owner = type(estimator).__name__
    folder = _folder(owner, estimator.checkpoint)
    record = _record(estimator, X, t, seed)
    path = folder / MANIFEST
    if path.is_file():
        saved = _read_manifest(owner, path)
        found = _differences(saved, record)
        if found:
            raise DataError(
                f"{owner}: the checkpoint folder {str(folder)!r} holds another fit: it was "
                "written with ", *_joined([old for old, _ in found]), "; this fit has ",
                *_joined([new for _, new in found]), "; fit with the same parameters (max_epochs "
                "may be raised) and data to resume it, or pass another ", Setting("checkpoint"),
                " folder.")
        if record["params"]["random_state"] is None:
            record["seed"] = int(saved["seed"])
    write_text_atomic(path, json.dumps(record, indent=2))
    return FitStages(folder), int(record["seed"])


def fit_em_stage(model: nn.Module, x_ND: Tensor, y: Tensor, config: EMConfig,
                 path: str | None) -> EMResult:
    """:func:`~moekit.fitting.em.fit_em`, read back from ``path`` when that stage has finished
    (and saved there when it finishes)."""
    if path is None:
        return fit_em(model, x_ND, y, config)
    data = {"x": x_ND, "y": y}
    result = load_em_result(path, model, config, data)
    if result is None:
        result = fit_em(model, x_ND, y, config)
        save_em_result(path, model, result, data)
    return result

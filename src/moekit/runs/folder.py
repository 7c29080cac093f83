"""A `moekit fit` run folder, read back: the fitted estimator, the table's encoding, the summary,
and the rows of a CSV file as the model sees them (what predict, report and analyze start from).

A run folder holds:

    model/          the fitted estimator (safetensors + config.json with feature names, classes,
                    scalers and the table's encoding)
    summary.json    the options, the data's shape, training and validation scores, expert loads
    report.html     learning curves, the gate's partition (2 features), and the routing analysis
    figures/        the report's own figures as PNG files
    analysis/model/ the routing analysis: analysis.json, analysis.html and its figures
    .moekit-run.json the manifest, written last: a folder without it is an interrupted run (or one
                    from an older moekit) and is refused (:func:`require_run`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.data.tabular import Preprocessing, read_csv
from moekit.estimators.persistence import load_estimator
from moekit.exceptions import DataError, Setting
from moekit.io.paths import inside
from moekit.io.records import read_json_file
from moekit.io.run_folder import RERUN_FIX, partial_folder, require_manifest

MODEL_DIR, SUMMARY_FILE, REPORT_FILE = "model", "summary.json", "report.html"
RERUN = {"fit": "moekit fit DATA.csv --target COLUMN --out {run} --overwrite",
         "vowels": "moekit vowels --out {run}"}


def require_run(run: Path, commands: tuple[str, ...]) -> dict[str, Any]:
    """The manifest of the complete run of one of ``commands`` in ``run`` (see
    :func:`moekit.io.run_folder.require_manifest`); else a :class:`DataError` saying what to do."""
    if not run.is_dir() and partial_folder(run).is_dir():
        raise DataError(f"no run folder at {str(run)!r}: an interrupted run left its work in "
                        f"{str(partial_folder(run))!r}; rerun its command with ",
                        Setting("resume", True), " (`moekit fit`) to finish it.")
    if not run.is_dir():
        raise DataError(f"no run folder at {str(run)!r}; give the folder "
                        f"{' or '.join(f'`moekit {c}`' for c in commands)} wrote (its ",
                        Setting("out"), ").")
    rerun = "` or `".join(RERUN[c].format(run=run) for c in commands)
    return require_manifest(run, commands, rerun)


def read_summary(run: Path) -> dict[str, Any]:
    """A fit run's summary.json (a JSON object), with its "data" path checked to be text."""
    path = run / SUMMARY_FILE
    summary = read_json_file("load_run", path, fix=RERUN_FIX) if path.is_file() else {}
    if not isinstance(summary, dict) or not isinstance(summary.get("data", ""), str):
        raise DataError(f"{str(path)!r} is not a `moekit fit` summary (a JSON object whose "
                        "\"data\" is the path of the CSV file); rerun `moekit fit`, or pass ",
                        Setting("data", "DATA.csv"), ".")
    return summary


def load_run(run: Path | str) -> tuple[Any, Preprocessing, dict[str, Any]]:
    """The fitted estimator, the table's encoding and the summary of a complete `moekit fit` run
    folder (one with its manifest: an interrupted run is refused)."""
    run = Path(run)
    require_run(run, ("fit",))
    model = inside(run, MODEL_DIR, source=run, field="the model folder")
    estimator = load_estimator(model)
    try:
        prep = Preprocessing.from_dict(estimator.metadata_["preprocessing"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{str(model)!r} was not written by `moekit fit` (its metadata has no "
                        f"valid table encoding: {type(err).__name__}: {err}).") from None
    return estimator, prep, read_summary(run)


def as_class_labels(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Targets read back from a CSV in the dtype of the fitted classes (1 and 1.0 are one class)."""
    try:
        return y.astype(classes.dtype)
    except (TypeError, ValueError):
        return y


@dataclass
class RunData:
    """A fitted run and the rows of a CSV file as its model sees them."""

    estimator: Any
    prep: Preprocessing
    summary: dict[str, Any]
    source: str  # the absolute path of the CSV file read
    inputs: pd.DataFrame  # the model's input columns, (N, D)
    rows: np.ndarray  # each input row's position in the file (0 = the first data row)
    y: np.ndarray | None  # the target where the file has it (as fitted when every row has one)
    known: np.ndarray | None  # which rows have a target (all of them when ``labelled_only``)


def scores_name(task: str) -> str:
    """The score a run reports: accuracy for a classifier, R^2 for a regression."""
    return "accuracy" if task == "classify" else "R^2"


def data_file(run: Path, summary: dict[str, Any], data: Path | str | None = None) -> Path:
    """The absolute path of the CSV to read a run's rows from: ``data`` (relative to the current
    folder), else the file the run was fitted on (summary.json's "data", recorded absolute by
    `moekit fit`; an older run's relative path is taken from the current folder). A recorded file
    that is gone is a :class:`DataError` that says to pass ``data`` (``--data``).

    Example:
        >>> data_file(Path("runs/fit"), {"data": "/home/me/wine.csv"})  # doctest: +SKIP
        PosixPath('/home/me/wine.csv')
    """
    if data is not None:
        return Path(data).resolve()
    recorded = summary.get("data")
    if not recorded:
        raise DataError(f"{str(run)!r} does not record its data file; pass ",
                        Setting("data", "DATA.csv"), ".")
    path = Path(recorded)
    relative = "" if path.is_absolute() else (
        f" (recorded relative to the folder `moekit fit` ran in, read from {str(Path.cwd())!r})")
    path = path.resolve()
    if not path.is_file():
        raise DataError(f"no data file at {str(path)!r}, the CSV file the run in {str(run)!r} was "
                        f"fitted on{relative}: it was moved or deleted. Pass ",
                        Setting("data", "DATA.csv"), " with its new place (the same table).")
    return path


def load_run_data(run: Path | str, data: Path | str | None = None, *,
                  labelled_only: bool = True) -> RunData:
    """Load a run and read ``data`` (default: the CSV it was fitted on) through its encoding; the
    file's path is made absolute (:func:`data_file`), so a run is read the same from any folder.

    With ``labelled_only`` and a target column, rows without a target are left out, as fitting left
    them out (so the saved validation rows point at the same rows); otherwise every row is kept.
    """
    estimator, prep, summary = load_run(run)
    source = data_file(Path(run), summary, data)
    frame = read_csv(source)
    y = known = None
    if prep.target in frame.columns and labelled_only:
        X, y, rows = prep.labelled(frame)
        known = np.ones(len(y), dtype=bool)
    else:
        X, rows = prep.transform(frame)
        if prep.target in frame.columns:
            y = frame[prep.target].to_numpy()[rows]
            known = ~pd.isna(y)
    if y is not None and prep.task == "classify" and known.all():
        y = as_class_labels(y, estimator.classes_)
    return RunData(estimator, prep, summary, str(source),
                   pd.DataFrame(X, columns=prep.input_names), rows, y, known)



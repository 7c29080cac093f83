"""A `moekit fit` run folder, read back: the fitted estimator, the table's encoding, the summary,
and the rows of a CSV file as the model sees them (what predict, report and analyze start from).

A run folder holds:

    model/          the fitted estimator (safetensors + config.json with feature names, classes,
                    scalers and the table's encoding)
    summary.json    the options, the data's shape, training and validation scores, expert loads
    report.html     learning curves, the gate's partition (2 features), and the routing analysis
    figures/        the report's own figures as PNG files
    analysis/model/ the routing analysis: analysis.json, analysis.html and its figures
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.data.tabular import Preprocessing, read_csv
from moekit.estimators.persistence import load_estimator
from moekit.exceptions import DataError, Setting

MODEL_DIR, SUMMARY_FILE, REPORT_FILE = "model", "summary.json", "report.html"


def load_run(run: Path | str) -> tuple[Any, Preprocessing, dict[str, Any]]:
    """The fitted estimator, the table's encoding and the summary of a `moekit fit` run folder."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no run folder at {str(run)!r}; give the folder `moekit fit` wrote (its ",
                        Setting("out"), ").")
    estimator = load_estimator(run / MODEL_DIR)
    try:
        prep = Preprocessing.from_dict(estimator.metadata_["preprocessing"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{str(run / MODEL_DIR)!r} was not written by `moekit fit` (it has no "
                        f"table encoding: {err!r}).") from None
    summary_path = run / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return estimator, prep, summary


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
    source: str
    inputs: pd.DataFrame  # the model's input columns, (N, D)
    rows: np.ndarray  # each input row's position in the file (0 = the first data row)
    y: np.ndarray | None  # the target where the file has it (as fitted when every row has one)
    known: np.ndarray | None  # which rows have a target (all of them when ``labelled_only``)


def scores_name(task: str) -> str:
    """The score a run reports: accuracy for a classifier, R^2 for a regression."""
    return "accuracy" if task == "classify" else "R^2"


def load_run_data(run: Path | str, data: Path | str | None = None, *,
                  labelled_only: bool = True) -> RunData:
    """Load a run and read ``data`` (default: the CSV it was fitted on) through its encoding.

    With ``labelled_only`` and a target column, rows without a target are left out, as fitting left
    them out (so the saved validation rows point at the same rows); otherwise every row is kept.
    """
    estimator, prep, summary = load_run(run)
    source = data or summary.get("data")
    if source is None:
        raise DataError(f"{str(run)!r} does not record its data file; pass ",
                        Setting("data", "DATA.csv"), ".")
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



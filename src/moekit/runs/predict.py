"""`moekit predict`: every row of a CSV file predicted by a fitted run, scored where the file has
the target column."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, r2_score

from moekit.exceptions import DataError, Setting
from moekit.io.files import write_text_atomic
from moekit.io.paths import check_writable
from moekit.runs.folder import as_class_labels, load_run_data, scores_name


@dataclass
class PredictOutcome:
    predictions: pd.DataFrame
    score: float | None
    score_name: str
    path: Path | None


def predict_run(run: Path | str, data: Path | str, *, proba: bool = False,
                out: Path | str | None = None) -> PredictOutcome:
    """Predict every row of ``data`` with a fitted run; with the target present, score it too.

    The output has the row number (1 = the first data row), the prediction and, with ``proba``, one
    column per class. Rows skipped under ``--missing drop`` are absent.
    """
    if out is not None:  # before any work: --out must be a file that can be written
        check_writable(out, folder=False)
    d = load_run_data(run, data, labelled_only=False)
    estimator, prep = d.estimator, d.prep
    if proba and prep.task != "classify":
        raise DataError(Setting("proba", True), " needs a classifier; this run is a regression.")
    if proba:  # one forward pass gives both the probabilities and the predicted class
        proba_NC = estimator.predict_proba(d.inputs)
        predicted = estimator.classes_[proba_NC.argmax(1)]
    else:
        predicted = estimator.predict(d.inputs)
    predictions = pd.DataFrame({"row": d.rows + 1, f"predicted_{prep.target}": predicted})
    if proba:
        for c, column in zip(estimator.classes_, proba_NC.T, strict=True):
            predictions[f"p({c})"] = column
    score, score_name = None, scores_name(prep.task)
    if d.known is not None and d.known.any():
        truth = d.y[d.known]
        if prep.task == "classify":
            truth, metric = as_class_labels(truth, estimator.classes_), accuracy_score
        else:
            truth, metric = truth.astype(np.float64), r2_score
        score = float(metric(truth, predicted[d.known]))
    path = None
    if out is not None:
        path = Path(out)
        write_text_atomic(path, predictions.to_csv(index=False))
    return PredictOutcome(predictions, score, score_name, path)



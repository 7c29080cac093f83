"""A fitted estimator's scores in the target's own units (not the standardised ones the model is
fitted on): what the `moekit fit` report shows and the run's summary stores.

Shape legend: N rows, C classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)

TASKS = ("classify", "regress")
# Each metric's name in the report, and whether higher is better.
METRIC_NAMES = {
    "rmse": ("RMSE (root mean squared error)", False),
    "mae": ("MAE (mean absolute error)", False),
    "r2": ("R^2 (1 - MSE / variance of the target)", True),
    "target_std": ("standard deviation of the target (the RMSE of predicting its mean)", False),
    "accuracy": ("accuracy", True),
    "balanced_accuracy": ("balanced accuracy (mean recall over classes)", True),
    "log_loss": ("log-loss (nats per row)", False),
    "baseline_accuracy": ("majority-class baseline accuracy", True),
}


def select_rows(inputs: Any, rows: Any) -> Any:
    """The rows at positions ``rows`` of a DataFrame or an array (N, D)."""
    return inputs.iloc[rows] if isinstance(inputs, pd.DataFrame) else np.asarray(inputs)[rows]


def row_positions(rows: Any, n_rows: int) -> np.ndarray:
    """``rows`` as integer positions (a boolean mask of length N is turned into its positions);
    a ValueError names a position outside [0, N)."""
    rows = np.asarray(rows).reshape(-1)
    if rows.dtype.kind == "b":
        if len(rows) != n_rows:
            raise ValueError(f"fit_metrics: a boolean rows mask must have one entry per row "
                             f"({n_rows}); got {len(rows)}.")
        return np.flatnonzero(rows)
    if rows.size and rows.dtype.kind not in "iu":
        raise ValueError(f"fit_metrics: rows must be integer row positions or a boolean mask; "
                         f"got dtype {rows.dtype}.")
    rows = rows.astype(np.intp)
    bad = rows[(rows < 0) | (rows >= n_rows)]
    if bad.size:
        raise ValueError(f"fit_metrics: rows must be positions in [0, {n_rows}); got "
                         f"{int(bad[0])}.")
    return rows


def fit_metrics(estimator: Any, inputs: Any, y: Any, rows: Any, task: str) -> dict[str, float]:
    """Scores of a fitted estimator on ``rows``, from its ``predict`` / ``predict_proba`` (so in
    the target's own units and labels).

    Args:
        estimator: a fitted MixtureOfExpertsClassifier or MixtureOfExpertsRegressor (or any
            scikit-learn estimator with ``predict``, and ``predict_proba`` + ``classes_`` to
            classify).
        inputs: the model's inputs (N, D), a DataFrame (with the fitted column names) or an array.
        y: the targets (N,): class labels as fitted, or numbers in the target's units.
        rows: the positions (or a boolean mask, N) of the rows to score, e.g. the validation rows.
        task: 'classify' or 'regress'.

    Returns:
        With no rows, ``{}``. Else for 'regress': ``rmse``, ``mae`` (target units), ``r2`` and
        ``target_std`` (the standard deviation of ``y`` on these rows, ddof 0: the RMSE of always
        predicting their mean, so ``r2 = 1 - (rmse / target_std)^2``); for 'classify':
        ``accuracy``, ``balanced_accuracy``, ``log_loss`` (nats per row, from ``predict_proba``)
        and ``baseline_accuracy`` (always predicting the most common class of these rows: the
        best any constant prediction scores here). Every value is a float; ``r2`` is NaN with
        fewer than 2 rows.

    Example:
        >>> reg = MixtureOfExpertsRegressor(n_experts=2).fit(X[train], y[train])  # doctest: +SKIP
        >>> fit_metrics(reg, X, y, val, "regress")["rmse"]                       # doctest: +SKIP
    """
    if task not in TASKS:
        raise ValueError(f"fit_metrics: task must be one of {TASKS}; got task={task!r}.")
    y_all = np.asarray(y)
    rows = row_positions(rows, len(y_all))
    if not rows.size:
        return {}
    x_rows, y_N = select_rows(inputs, rows), y_all[rows]
    if task == "regress":
        return regression_metrics(y_N, estimator.predict(x_rows))
    proba_NC = estimator.predict_proba(x_rows)
    return classification_metrics(y_N, proba_NC, estimator.classes_)


def regression_metrics(actual_N: np.ndarray, predicted_N: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, R^2 and the target's standard deviation (ddof 0), in the target's units.

    Example:
        >>> m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
        >>> round(m["rmse"] ** 2, 4), m["mae"], round(m["r2"], 4)
        (0.3333, 0.3333333333333333, 0.5)
    """
    actual_N = np.asarray(actual_N, dtype=np.float64)
    predicted_N = np.asarray(predicted_N, dtype=np.float64).reshape(actual_N.shape)
    with warnings.catch_warnings():  # one row: R^2 is undefined and sklearn says so
        warnings.simplefilter("ignore")
        r2 = float(r2_score(actual_N, predicted_N)) if len(actual_N) > 1 else float("nan")
    return {"rmse": float(np.sqrt(mean_squared_error(actual_N, predicted_N))),
            "mae": float(mean_absolute_error(actual_N, predicted_N)), "r2": r2,
            "target_std": float(np.std(actual_N, axis=0).mean())}


def classification_metrics(y_N: np.ndarray, proba_NC: np.ndarray,
                           classes: Sequence[Any]) -> dict[str, float]:
    """Accuracy, balanced accuracy, log-loss and the majority-class baseline of probabilities
    ``proba_NC`` whose columns follow ``classes``.

    Example:
        >>> m = classification_metrics(np.array(["a", "b", "b"]),
        ...                            np.array([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4]]), ["a", "b"])
        >>> round(m["accuracy"], 4), m["balanced_accuracy"], round(m["baseline_accuracy"], 4)
        (0.6667, 0.75, 0.6667)
    """
    classes = np.asarray(classes)
    proba_NC = np.asarray(proba_NC, dtype=np.float64)
    proba_NC = proba_NC / proba_NC.sum(1, keepdims=True)  # rows sum to 1 to float64 rounding
    predicted_N = classes[proba_NC.argmax(1)]
    _, counts = np.unique(np.asarray(y_N).astype(str), return_counts=True)
    with warnings.catch_warnings():  # a class absent from these rows: sklearn warns, scores stand
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y_N, predicted_N))
    return {"accuracy": float(accuracy_score(y_N, predicted_N)), "balanced_accuracy": balanced,
            "log_loss": float(log_loss(y_N, proba_NC, labels=classes)),
            "baseline_accuracy": float(counts.max() / counts.sum())}


def confusion_counts(y_N: np.ndarray, predicted_N: np.ndarray,
                     classes: Sequence[Any]) -> np.ndarray:
    """The confusion matrix (C, C) of int counts: row = true class, column = predicted class, both
    in the order of ``classes``; a label outside ``classes`` is a ValueError naming it.

    Example:
        >>> confusion_counts(np.array(["a", "b", "b"]), np.array(["a", "a", "b"]), ["a", "b"])
        array([[1, 0],
               [1, 1]])
    """
    names = [str(c) for c in classes]
    index = {name: i for i, name in enumerate(names)}
    counts_CC = np.zeros((len(names), len(names)), dtype=np.int64)
    for truth, guess in zip(np.asarray(y_N).astype(str), np.asarray(predicted_N).astype(str),
                            strict=True):
        for label in (truth, guess):
            if label not in index:
                raise ValueError(f"confusion_counts: label {str(label)!r} is not one of the "
                                 f"classes {names}; pass every label in classes.")
        counts_CC[index[truth], index[guess]] += 1
    return counts_CC

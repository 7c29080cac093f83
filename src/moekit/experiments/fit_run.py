"""`moekit fit / predict / report`: a mixture of experts on a user's CSV file.

A run folder holds:

    model/          the fitted estimator (safetensors + config.json with feature names, classes,
                    scalers and the table's encoding)
    summary.json    the options, the data's shape, training and validation scores, expert loads
    report.html     learning curves, the gate's partition (2 features), and the routing analysis
                    (expert loads, expert by class, interventions; moekit.experiments.analyze)
    figures/        the report's own figures as PNG files
    analysis/model/ the routing analysis: analysis.json, analysis.html and its figures
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, r2_score

from moekit._estimator_base import holdout_split
from moekit.estimator_io import load_estimator, save_estimator
from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.experiments.fit_report import expert_loads, write_fit_report
from moekit.io import write_text_atomic
from moekit.tabular import DataError, Preprocessing, prepare_fit, read_csv

logger = logging.getLogger(__name__)

MODEL_DIR, SUMMARY_FILE, REPORT_FILE = "model", "summary.json", "report.html"


@dataclass(frozen=True)
class FitRunConfig:
    """The options of `moekit fit`; see :func:`run_fit`."""

    data: str
    target: str
    out: str = "runs/fit"
    task: str | None = None
    n_experts: int | str = 4
    expert: str = "auto"
    hidden: int = 32
    loss: str = "nll"
    solver: str = "adam"
    gate: str = "softmax"
    lr: float = 0.01
    alpha: float | str = "auto"
    max_epochs: int = 500
    validation_fraction: float = 0.2
    one_hot: bool = False
    missing: str = "error"
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


@dataclass
class FitOutcome:
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _estimator(config: FitRunConfig, task: str):
    cls = MixtureOfExpertsClassifier if task == "classify" else MixtureOfExpertsRegressor
    return cls(n_experts=config.n_experts, expert=config.expert, expert_hidden=config.hidden,
               loss=config.loss, solver=config.solver, gate=config.gate, lr=config.lr,
               alpha=config.alpha, max_epochs=config.max_epochs,
               random_state=config.seed, verbose=int(config.progress))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{str(out)!r} already holds files; pass --overwrite to replace its "
                        "run, or choose another --out.")


def split_rows(y: np.ndarray, task: str, fraction: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row positions (stratified by class where every class has 2 rows)."""
    if fraction == 0:
        return np.arange(len(y)), np.arange(0)
    labels = y.astype(str) if task == "classify" else None
    return tuple(holdout_split(len(y), fraction, seed, labels))


def run_fit(config: FitRunConfig) -> FitOutcome:
    """Read the CSV, fit a mixture on the training rows, score it, save the run and its report.

    Every check on the data and the options runs before anything is written.
    """
    if not 0 <= config.validation_fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1); got {config.validation_fraction}.")
    out = Path(config.out)
    _check_out(out, config.overwrite)
    started = time.perf_counter()
    frame = read_csv(config.data)
    X, y, prep = prepare_fit(frame, config.target, task=config.task, one_hot=config.one_hot,
                             missing=config.missing)
    train, val = split_rows(y, prep.task, config.validation_fraction, config.seed)
    estimator = _estimator(config, prep.task)
    inputs = pd.DataFrame(X, columns=prep.input_names)
    estimator.fit(inputs.iloc[train], y[train])
    summary = summarize(estimator, inputs, y, train, val, prep)
    summary.update(data=str(config.data), options=asdict(config),
                   seconds=round(time.perf_counter() - started, 2))
    files = {"model": save_estimator(estimator, out / MODEL_DIR,
                                     metadata={"preprocessing": prep.to_dict(),
                                               "validation_rows": val.tolist()})}
    files["summary"] = out / SUMMARY_FILE
    write_text_atomic(files["summary"], json.dumps(summary, indent=2))
    files["report"] = write_fit_report(out / REPORT_FILE, estimator, inputs, y, summary)
    return FitOutcome(summary, files)


def summarize(estimator: Any, inputs: pd.DataFrame, y: np.ndarray, train: np.ndarray,
              val: np.ndarray, prep: Preprocessing) -> dict[str, Any]:
    """Scores, the number of experts, epochs and each expert's load on every row."""
    score_name = "accuracy" if prep.task == "classify" else "R^2"
    summary: dict[str, Any] = {
        "task": prep.task, "target": prep.target, "rows": len(y), "train_rows": len(train),
        "validation_rows": len(val), "features": list(prep.features),
        "inputs": prep.input_names, "n_experts": int(estimator.n_experts_),
        "n_experts_curve": estimator.n_experts_curve_, "epochs": int(estimator.n_iter_),
        "stop_reason": estimator.stop_reason_, "alpha": float(estimator.alpha_),
        "alpha_curve": estimator.alpha_curve_, "score_name": score_name,
        "train_score": float(estimator.score(inputs.iloc[train], y[train])),
        "validation_score": float(estimator.score(inputs.iloc[val], y[val])) if len(val) else None,
        "expert_loads": expert_loads(estimator.gate_proba(inputs)),
    }
    if prep.task == "classify":
        summary["classes"] = estimator.classes_.tolist()
    return summary


def load_run(run: Path | str) -> tuple[Any, Preprocessing, dict[str, Any]]:
    """The fitted estimator, the table's encoding and the summary of a `moekit fit` run folder."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no run folder at {str(run)!r}; give the --out folder of `moekit fit`.")
    estimator = load_estimator(run / MODEL_DIR)
    try:
        prep = Preprocessing.from_dict(estimator.metadata_["preprocessing"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{str(run / MODEL_DIR)!r} was not written by `moekit fit` (it has no "
                        f"table encoding: {err!r}).") from None
    summary_path = run / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return estimator, prep, summary


@dataclass
class PredictOutcome:
    predictions: pd.DataFrame
    score: float | None
    score_name: str
    path: Path | None


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


def load_run_data(run: Path | str, data: Path | str | None = None, *,
                  labelled_only: bool = True) -> RunData:
    """Load a run and read ``data`` (default: the CSV it was fitted on) through its encoding.

    With ``labelled_only`` and a target column, rows without a target are left out, as fitting left
    them out (so the saved validation rows point at the same rows); otherwise every row is kept.
    """
    estimator, prep, summary = load_run(run)
    source = data or summary.get("data")
    if source is None:
        raise DataError(f"{str(run)!r} does not record its data file; pass --data DATA.csv.")
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


def predict_run(run: Path | str, data: Path | str, *, proba: bool = False,
                out: Path | str | None = None) -> PredictOutcome:
    """Predict every row of ``data`` with a fitted run; with the target present, score it too.

    The output has the row number (1 = the first data row), the prediction and, with ``proba``, one
    column per class. Rows skipped under ``--missing drop`` are absent.
    """
    d = load_run_data(run, data, labelled_only=False)
    estimator, prep = d.estimator, d.prep
    if proba and prep.task != "classify":
        raise DataError("--proba needs a classifier; this run is a regression.")
    if proba:  # one forward pass gives both the probabilities and the predicted class
        proba_NC = estimator.predict_proba(d.inputs)
        predicted = estimator.classes_[proba_NC.argmax(1)]
    else:
        predicted = estimator.predict(d.inputs)
    predictions = pd.DataFrame({"row": d.rows + 1, f"predicted_{prep.target}": predicted})
    if proba:
        for c, column in zip(estimator.classes_, proba_NC.T):
            predictions[f"p({c})"] = column
    score, score_name = None, "accuracy" if prep.task == "classify" else "R^2"
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


def report_run(run: Path | str, data: Path | str | None = None) -> Path:
    """Rewrite a run's report.html from its model and its data (default: its fitting CSV)."""
    d = load_run_data(run, data)
    if d.y is None:
        raise DataError(f"{d.source!r} has no target column {d.prep.target!r}; the report "
                        "needs it.")
    val = np.asarray(d.estimator.metadata_.get("validation_rows", []), dtype=int)
    val = val[val < len(d.y)]
    train = np.setdiff1d(np.arange(len(d.y)), val)
    summary = {**d.summary, **summarize(d.estimator, d.inputs, d.y, train, val, d.prep),
               "data": d.source}
    return write_fit_report(Path(run) / REPORT_FILE, d.estimator, d.inputs, d.y, summary)

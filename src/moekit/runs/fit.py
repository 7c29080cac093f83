"""`moekit fit` and `moekit report`: a mixture of experts fitted to a user's CSV file, and the run
folder it writes (:mod:`moekit.runs.folder` lists its files).

The defaults of :class:`FitRunConfig` are the estimators' (one source: `moekit fit` and
``MixtureOfExpertsClassifier()`` fit the same model), except what only a run has: its data, its
folder, and the share of rows held out to score it.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.data.tabular import Preprocessing, prepare_fit, read_csv
from moekit.estimators import (
    BaseMixtureEstimator,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
    holdout_split,
    save_estimator,
)
from moekit.exceptions import DataError, Setting
from moekit.io.files import write_text_atomic
from moekit.reports.fit import expert_loads, write_fit_report
from moekit.runs.folder import MODEL_DIR, REPORT_FILE, SUMMARY_FILE, load_run_data, scores_name

logger = logging.getLogger(__name__)

# The estimators' defaults, read from their signature.
ESTIMATOR_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(BaseMixtureEstimator.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty}
# FitRunConfig field -> the estimator parameter it sets.
ESTIMATOR_PARAMETERS = {"n_experts": "n_experts", "expert": "expert", "hidden": "expert_hidden",
                        "loss": "loss", "solver": "solver", "gate": "gate", "lr": "lr",
                        "alpha": "alpha", "max_epochs": "max_epochs"}


@dataclass(frozen=True)
class FitRunConfig:
    """The options of `moekit fit`; see :func:`run_fit`. The model's options default to the
    estimators' (``ESTIMATOR_DEFAULTS``)."""

    data: str
    target: str
    out: str = "runs/fit"
    task: str | None = None
    n_experts: int | str = ESTIMATOR_DEFAULTS["n_experts"]
    expert: str = ESTIMATOR_DEFAULTS["expert"]
    hidden: int = ESTIMATOR_DEFAULTS["expert_hidden"]
    loss: str = ESTIMATOR_DEFAULTS["loss"]
    solver: str = ESTIMATOR_DEFAULTS["solver"]
    gate: str = ESTIMATOR_DEFAULTS["gate"]
    lr: float = ESTIMATOR_DEFAULTS["lr"]
    alpha: float | str = ESTIMATOR_DEFAULTS["alpha"]
    max_epochs: int = ESTIMATOR_DEFAULTS["max_epochs"]
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


def _estimator(config: FitRunConfig, task: str) -> BaseMixtureEstimator:
    cls = MixtureOfExpertsClassifier if task == "classify" else MixtureOfExpertsRegressor
    params = {param: getattr(config, name) for name, param in ESTIMATOR_PARAMETERS.items()}
    return cls(**params, random_state=config.seed, verbose=int(config.progress))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(Setting("out", str(out)), " is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{str(out)!r} already holds files; pass ", Setting("overwrite", True),
                        " to replace its run, or choose another ", Setting("out"), ".")


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
        raise DataError(Setting("validation_fraction"), " must be in [0, 1); got "
                        f"{config.validation_fraction}.")
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
    score_name = scores_name(prep.task)
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

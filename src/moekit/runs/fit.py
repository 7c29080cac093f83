"""`moekit fit` and `moekit report`: a mixture of experts fitted to a user's CSV file, and the run
folder it writes (:mod:`moekit.runs.folder` lists its files).

The defaults of :class:`FitRunConfig` are the estimators' (one source: `moekit fit` and
``MixtureOfExpertsClassifier()`` fit the same model), except what only a run has: its data, its
folder, and the share of rows held out to score it.
"""

from __future__ import annotations

import hashlib
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
from moekit.io.paths import inside
from moekit.io.run_folder import (
    CHECKPOINT_DIR,
    check_run_destination,
    clean_leftovers,
    record_or_check_identity,
    run_folder,
)
from moekit.reports.fit import ANALYSIS_DIR, expert_loads, write_fit_report
from moekit.reports.metrics import fit_metrics
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
# What marks a folder as a `moekit fit` run of a moekit older than the manifest (--overwrite may
# replace it), and the options that are not the fit's: a resumed fit may change them
# (max_epochs may be raised: the estimator's own check allows it and refuses it lowered).
OLDER_FIT = (SUMMARY_FILE, MODEL_DIR)
NOT_THE_FITS = {"out", "overwrite", "resume", "progress", "max_epochs", "threads"}


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
    resume: bool = False
    progress: bool = True
    threads: int | None = None


@dataclass
class FitOutcome:
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _estimator(config: FitRunConfig, task: str, checkpoint: Path | None = None
               ) -> BaseMixtureEstimator:
    """The estimator ``config`` describes; with ``checkpoint`` (a folder), one that saves its
    state there as it fits and resumes from a checkpoint of the same fit found there."""
    cls = MixtureOfExpertsClassifier if task == "classify" else MixtureOfExpertsRegressor
    params = {param: getattr(config, name) for name, param in ESTIMATOR_PARAMETERS.items()}
    if checkpoint is not None and "checkpoint" in ESTIMATOR_DEFAULTS:
        params["checkpoint"] = str(checkpoint)
    return cls(**params, random_state=config.seed, verbose=int(config.progress),
               threads=config.threads)


# Identity entries that are not options: how a difference in them is said.
FIT_NOT_OPTIONS = {"data_sha256": lambda before, now: "other contents in the data file",
                   "data": lambda before, now: f"the data file {before!r}, not {now!r}"}


def _fit_identity(config: FitRunConfig, data: Path) -> dict[str, Any]:
    """What makes a fit the same fit: its options, the data file and its content."""
    return {**{k: v for k, v in asdict(config).items() if k not in NOT_THE_FITS},
            "data": str(data), "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest()}


def _start_or_resume(build: Path, config: FitRunConfig, data: Path) -> None:
    """Record the fit's identity in its partial folder; when resuming, refuse a fit whose options
    or data differ from the interrupted one's, naming each difference."""
    record_or_check_identity(build, _fit_identity(config, data), resume=config.resume,
                             command="moekit fit --resume", what="fit", explain=FIT_NOT_OPTIONS)


def split_rows(y: np.ndarray, task: str, fraction: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row positions (stratified by class where every class has 2 rows)."""
    if fraction == 0:
        return np.arange(len(y)), np.arange(0)
    labels = y.astype(str) if task == "classify" else None
    return tuple(holdout_split(len(y), fraction, seed, labels))


def run_fit(config: FitRunConfig) -> FitOutcome:
    """Read the CSV, fit a mixture on the training rows, score it, save the run and its report.

    Every check on the data, the options and the output folder runs before anything is written.
    The run is built in ``.OUT.partial`` beside ``out`` and put in place whole at the end
    (:func:`moekit.io.run_folder.run_folder`); the fit checkpoints itself there, so that a fit
    killed part way continues with ``resume=True`` (`--resume`), to the same weights.
    """
    if not 0 <= config.validation_fraction < 1:
        raise DataError(Setting("validation_fraction"), " must be in [0, 1); got "
                        f"{config.validation_fraction}.")
    out, data = Path(config.out), Path(config.data).resolve()  # the CSV, from any folder
    check_run_destination(out, overwrite=config.overwrite, resume=config.resume, older=OLDER_FIT)
    started = time.perf_counter()
    frame = read_csv(config.data)
    X, y, prep = prepare_fit(frame, config.target, task=config.task, one_hot=config.one_hot,
                             missing=config.missing)
    train, val = split_rows(y, prep.task, config.validation_fraction, config.seed)
    inputs = pd.DataFrame(X, columns=prep.input_names)
    with run_folder(out, "fit", overwrite=config.overwrite, resume=config.resume,
                    older=OLDER_FIT) as build:
        _start_or_resume(build, config, data)
        estimator = _estimator(config, prep.task, build / CHECKPOINT_DIR)
        estimator.fit(inputs.iloc[train], y[train])
        estimator.set_params(checkpoint=None)  # the partial folder is gone once the run is in place
        summary = summarize(estimator, inputs, y, train, val, prep)
        summary.update(data=str(data), options=asdict(config),
                       seconds=round(time.perf_counter() - started, 2))
        save_estimator(estimator, build / MODEL_DIR, metadata={
            "preprocessing": prep.to_dict(), "validation_rows": val.tolist()})
        write_text_atomic(build / SUMMARY_FILE, json.dumps(summary, indent=2))
        write_fit_report(build / REPORT_FILE, estimator, inputs, y, summary, validation_rows=val)
    return FitOutcome(summary, {"model": out / MODEL_DIR, "summary": out / SUMMARY_FILE,
                                "report": out / REPORT_FILE})


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
        "train_metrics": _finite(fit_metrics(estimator, inputs, y, train, prep.task)),
        "validation_metrics": _finite(fit_metrics(estimator, inputs, y, val, prep.task)),
        "expert_loads": expert_loads(estimator.gate_proba(inputs)),
        "choices": getattr(estimator, "choices_", []),
        "interrupted": bool(getattr(estimator, "interrupted_", False)),
        "threads": getattr(estimator, "threads_", None),
    }
    if prep.task == "classify":
        summary["classes"] = estimator.classes_.tolist()
    return summary


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for JSON: a NaN (R^2 of one row) becomes null."""
    return {k: v if np.isfinite(v) else None for k, v in metrics.items()}


def report_run(run: Path | str, data: Path | str | None = None) -> Path:
    """Rewrite a run's report.html from its model and its data (default: its fitting CSV);
    first delete what killed writes left in the run folder."""
    run = Path(run)
    d = load_run_data(run, data)
    for name in ("figures", ANALYSIS_DIR):  # the report writes there: both inside the run
        inside(run, name, source=run, field=f"the {name} folder")
    clean_leftovers(run)
    if d.y is None:
        raise DataError(f"{d.source!r} has no target column {d.prep.target!r}; the report "
                        "needs it.")
    try:
        val = np.asarray(d.estimator.metadata_.get("validation_rows", []), dtype=int).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"metadata.validation_rows in {str(run / MODEL_DIR / 'config.json')!r} "
                        "must be a list of row numbers; rerun `moekit fit`.") from None
    val = val[(val >= 0) & (val < len(d.y))]
    train = np.setdiff1d(np.arange(len(d.y)), val)
    summary = {**d.summary, **summarize(d.estimator, d.inputs, d.y, train, val, d.prep),
               "data": d.source}
    return write_fit_report(Path(run) / REPORT_FILE, d.estimator, d.inputs, d.y, summary,
                            validation_rows=val)

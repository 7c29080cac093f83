"""What the estimators' 'auto' settings become for one fit, and why: the compute dtype, the rows per
update, whether rows are held out to stop early, and the size of a step (for the thread count).

Each rule is a plain function of the parameters and the data's size, so that it can be read and
tested apart from the estimator; :func:`describe` turns the choices into the sentences of the
``choices_`` attribute and of the `moekit fit` report.

The dtype is the training's: the fitted model is kept and predicts in float64, so that a row's
prediction does not depend on the rows beside it. The same weights predict the bundled data sets in
float32 as in float64 to BATCH_INDEPENDENCE_TOL in every probability
(tests/estimators/test_fast_path.py), and float32 halves the time of a step on these machines;
minibatches reach the full-batch optimum in tens of epochs where full batch needs hundreds: three
linear pieces, 1,350 training rows, 3 linear experts: full-batch Adam stopped at the 500-epoch cap
with held-out loss 0.159, minibatches of 256 by patience after 282 epochs at 0.084 (in 2.2x the
time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

BATCH_ROWS = 256  # the smallest minibatch (scikit-learn's MLP uses 200); fewer rows: full batch
MAX_BATCH_ROWS = 1024
UPDATES_PER_EPOCH = 8  # a batch doubles from BATCH_ROWS while an epoch keeps this many updates
MIN_PATIENCE_UPDATES = 100  # a fit stops after no fewer updates without improvement
MIN_ROWS_TO_STOP_EARLY = 50  # below this, a 10 % hold-out is too small to stop by
SELECTION_ROWS = 50_000  # n_experts='auto' fits its candidates on at most this many training rows
BATCH_INDEPENDENCE_TOL = 1e-5  # float32 against float64 predictions of the same weights
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FitSettings:
    """One fit's resolved settings."""

    dtype: torch.dtype
    batch_size: int | None
    early_stopping: bool
    criterion: str  # how n_experts='auto' chooses: 'validation' or 'bic'


def compute_dtype(dtype: str, solver: str) -> torch.dtype:
    """'auto' is float32 for the gradient solvers, float64 for EM (its least-squares and Newton
    systems need the digits)."""
    if dtype == "auto":
        return torch.float64 if solver == "em" else torch.float32
    return DTYPES[dtype]


def rows_per_update(batch_size: int | str | None, solver: str, n_rows: int) -> int | None:
    """'auto': full batch (None) for EM, L-BFGS and up to BATCH_ROWS rows; else BATCH_ROWS,
    doubled up to MAX_BATCH_ROWS while an epoch still makes UPDATES_PER_EPOCH updates (small
    tables need many updates per epoch; large ones pay less per-step overhead in bigger batches).

    Example:
        >>> [rows_per_update("auto", "adam", n) for n in (200, 1350, 7200, 72_000)]
        [None, 256, 512, 1024]
    """
    if batch_size != "auto":
        return batch_size  # type: ignore[return-value]
    if solver in ("em", "lbfgs") or n_rows <= BATCH_ROWS:
        return None
    rows = BATCH_ROWS
    while rows * 2 <= MAX_BATCH_ROWS and n_rows >= rows * 2 * UPDATES_PER_EPOCH:
        rows *= 2
    return rows


def patience_epochs(n_iter_no_change: int, batch_size: int | None, n_rows: int) -> int:
    """Epochs without improvement before a fit stops: ``n_iter_no_change``, raised so that they
    hold at least MIN_PATIENCE_UPDATES updates (a small table's epoch is one or two updates: ten
    of them stop a fit that has barely started; measured on diabetes, 317 training rows, the
    kept epoch was the 6th).

    Example:
        >>> [patience_epochs(10, batch, rows) for batch, rows in [(None, 300), (256, 317),
        ...                                                       (512, 7200)]]
        [100, 50, 10]
    """
    updates = 1 if batch_size is None else math.ceil(n_rows / batch_size)
    return max(n_iter_no_change, math.ceil(MIN_PATIENCE_UPDATES / updates))


def stops_early(early_stopping: bool | str, solver: str, n_rows: int) -> bool:
    """'auto' holds rows out for the gradient solvers when there are MIN_ROWS_TO_STOP_EARLY rows."""
    if early_stopping != "auto":
        return bool(early_stopping)
    return solver != "em" and n_rows >= MIN_ROWS_TO_STOP_EARLY


def size_criterion(auto_criterion: str, solver: str, early_stopping: bool) -> str:
    """'auto' is the held-out loss where rows are held out, else BIC (EM's linear experts)."""
    if auto_criterion != "auto":
        return auto_criterion
    return "validation" if early_stopping else "bic"


def resolve(params: dict[str, Any], n_rows: int) -> FitSettings:
    """The settings of a fit on ``n_rows`` rows, from the estimator's ``get_params()``."""
    solver = params["solver"]
    early = stops_early(params["early_stopping"], solver, n_rows)
    if params["n_experts"] == "auto" and params["auto_criterion"] == "validation":
        early = True  # the held-out loss needs held-out rows
    return FitSettings(dtype=compute_dtype(params["dtype"], solver),
                       batch_size=rows_per_update(params["batch_size"], solver, n_rows),
                       early_stopping=early,
                       criterion=size_criterion(params["auto_criterion"], solver, early))


def step_multiply_adds(model: torch.nn.Module, batch_rows: int) -> float:
    """About the multiply-adds of one update: every weight once per row, forward and backward."""
    return 3.0 * batch_rows * sum(p.numel() for p in model.parameters())


def describe(params: dict[str, Any], settings: FitSettings, *, n_rows: int, n_train: int,
             threads: int, threads_chosen: bool) -> list[dict[str, Any]]:
    """The chosen settings, each with the reason, as {"setting", "value", "why"} records."""
    choices = []

    def add(setting: str, value: Any, why: str) -> None:
        choices.append({"setting": setting, "value": value, "why": why})

    auto = "chosen by moekit ('auto')"
    dtype = str(settings.dtype).removeprefix("torch.")
    add("dtype", dtype, f"{auto}: trained in float32 by the gradient solvers (it predicts as "
        f"float64 does to {BATCH_INDEPENDENCE_TOL:g}), in float64 by EM; the fitted model predicts "
        "in float64" if params["dtype"] == "auto" else "set by the caller")
    batch = settings.batch_size or "all rows"
    if params["batch_size"] == "auto":
        why = (f"{auto}: full batch for {params['solver']!r}" if params["solver"] in ("em", "lbfgs")
               else f"{auto}: minibatches of {BATCH_ROWS} to {MAX_BATCH_ROWS} rows, at least "
               f"{UPDATES_PER_EPOCH} updates an epoch; full batch up to {BATCH_ROWS} training rows "
               f"({n_train} here)")
    else:
        why = "set by the caller"
    add("batch_size", batch, why)
    if settings.early_stopping:
        why = (f"{n_rows - n_train} of {n_rows} rows held out; the epoch with the lowest held-out "
               f"loss is kept, after n_iter_no_change epochs (at least {MIN_PATIENCE_UPDATES} "
               "updates) without improvement")
    else:
        why = "no rows held out: the fit stops when the training loss stops improving"
    origin = auto if params["early_stopping"] == "auto" else "set by the caller"
    add("early_stopping", settings.early_stopping, f"{origin}; {why}")
    add("threads", threads, "one thread for small steps, else the idle cores (moekit.threads)"
        if threads_chosen else "the caller's (threads, OMP_NUM_THREADS or torch.set_num_threads)")
    return choices

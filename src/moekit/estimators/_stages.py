"""The fits an estimator's ``fit`` runs: each a *stage* (a candidate number of experts, a candidate
prior, or the final fit), built, trained and scored on the same rows.

Shape legend: N rows, D features, V held-out rows.

With early stopping (the default for the gradient solvers), every stage trains on the same training
rows and stops by the same held-out rows, and keeps its best epoch; the chosen candidate is then the
final model, as it was fitted exactly as a final fit would be (no refit). A candidate prior is
warm-started from the stage before it (the stronger prior's optimum), so it costs a short
continuation, not a fit. Without early stopping (EM, or ``early_stopping=False``), stages fit every
row and the prior is chosen on a hold-out, then refitted (one extra fit per candidate).

Each stage has its own labelled progress bar and checkpoint file (:mod:`._resume`; a warm-started
stage's name carries the digest of the weights it starts from); Ctrl-C stops
the stage under way with its best epoch kept, and the estimator runs no further stage.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moekit.estimators._resume import CHECKPOINT_EVERY, FitStages, fit_em_stage
from moekit.estimators._settings import SELECTION_ROWS, FitSettings, patience_epochs
from moekit.exceptions import ConvergenceWarning
from moekit.fitting.callbacks import KeepBest
from moekit.fitting.config import TrainConfig
from moekit.fitting.gradient import fit
from moekit.nn.dense import DenseMixture

SOLVERS = {"gd": "sgd", "adam": "adam", "lbfgs": "lbfgs"}


@dataclass
class Stage:
    """One fitted stage: its model, the fit's result, and what it was."""

    model: DenseMixture
    result: Any  # a TrainResult, or an EMResult
    n_experts: int
    precision: float
    label: str = ""
    warm_from: Stage | None = None  # the stage whose weights it started from

    def chain(self) -> list[Stage]:
        """The stages that led here, first to last (this one alone unless warm-started)."""
        return [*(self.warm_from.chain() if self.warm_from else []), self]

    @property
    def interrupted(self) -> bool:
        return self.result.stop_reason == "interrupted"


def weights_digest(model: torch.nn.Module) -> str:
    """The first 12 hex digits of the SHA-256 of the model's weights, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


class StageFitter:
    """Fits stages of one estimator fit on fixed data: ``x_ND`` and the encoded targets ``t``,
    with the rows held out for early stopping when ``settings.early_stopping``."""

    def __init__(self, estimator: Any, x_ND: torch.Tensor, t: np.ndarray, seed: int,
                 settings: FitSettings, stages: FitStages | None) -> None:
        self.estimator, self.x_ND, self.t, self.seed = estimator, x_ND, t, seed
        self.settings, self.stages = settings, stages
        self.train_rows, self.val_rows = (estimator._holdout_rows(t, seed)
                                          if settings.early_stopping else (np.arange(len(t)), None))

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    def selection_rows(self) -> np.ndarray | None:
        """A fixed random sample of SELECTION_ROWS training rows for candidate fits, or None when
        there are no more rows than that."""
        if self.n_train <= SELECTION_ROWS:
            return None
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(self.train_rows, SELECTION_ROWS, replace=False))

    def fit(self, n_experts: int, precision: float, stage: str, label: str, *,
            warm_from: Stage | None = None, rows: np.ndarray | None = None) -> Stage:
        """Build and fit one mixture at prior ``precision`` (on ``rows``, default the training
        rows), starting from ``warm_from``'s weights when given. Convergence warnings wait for the
        final fit, so that candidates do not repeat them."""
        est = self.estimator
        model = est._build(n_experts, self.seed, self.settings.dtype)
        if warm_from is not None:
            model.load_state_dict(warm_from.model.state_dict())
            # a resumed fit may have taken the stage before further (max_epochs raised): a
            # checkpoint is this stage's only if it started from the same weights
            stage = f"{stage}_from_{weights_digest(model)}"
        rows = self.train_rows if rows is None else rows
        path = None if self.stages is None else self.stages.path(stage)
        x_ND, y = self.x_ND[rows], est._target_tensor(self.t[rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if est.solver == "em":
                config = est._em_config(self.seed, len(rows), precision=precision)
                result = fit_em_stage(model, x_ND, y, config, path)
                return Stage(model, result, n_experts, precision, label)
            config = self.train_config(len(rows), precision, label, path)
            if self.val_rows is None:
                result = fit(model, x_ND, y, config, resume=path is not None)
            else:
                result = fit(model, x_ND, y, config, x_val=self.x_ND[self.val_rows],
                             y_val=est._target_tensor(self.t[self.val_rows]),
                             callbacks=[KeepBest("val_loss")], resume=path is not None)
        return Stage(model, result, n_experts, precision, label, warm_from)

    def train_config(self, n_rows: int, precision: float, label: str = "fit",
                     checkpoint_path: str | None = None) -> TrainConfig:
        est = self.estimator
        return TrainConfig(loss=est._loss_name(), optimizer=SOLVERS[est.solver], lr=est.lr,
                           max_epochs=est.max_epochs, batch_size=self.settings.batch_size,
                           weight_decay=est._alpha(n_rows, precision),
                           patience=patience_epochs(est.n_iter_no_change,
                                                    self.settings.batch_size, n_rows),
                           min_delta=est.tol,
                           monitor="val_loss" if self.val_rows is not None else "train_loss",
                           seed=self.seed, train_metrics="running", progress=bool(est.verbose),
                           progress_label=label, on_interrupt="stop",
                           checkpoint_path=checkpoint_path, checkpoint_every=CHECKPOINT_EVERY)

    def held_out_losses(self, stage: Stage, rows: np.ndarray | None = None) -> np.ndarray:
        """Each held-out row's loss under ``stage``'s model, (V,)."""
        rows = self.val_rows if rows is None else rows
        return self.estimator._row_losses(stage.model, self.x_ND[rows], self.t[rows])

"""The shared machinery of moekit's scikit-learn estimators: parameters, validation, training by
gradient or EM, the choice of the number of experts, and the gate's view of a fitted mixture.

Shape legend: N rows, D features, O outputs (C classes for a classifier), E experts.

The public classes are in :mod:`moekit.estimators`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, is_classifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit.em import EMConfig, fit_em
from moekit.experts import ACTIVATIONS, ExpertConfig
from moekit.gaussian_gate import LocalizedMixtureOfExperts
from moekit.history import History
from moekit.layers import MixtureOfExperts
from moekit.training import (
    Callback,
    TrainConfig,
    TrainState,
    evaluate,
    fit,
    make_optimizer,
    prepare_targets,
    train_epoch,
)

DTYPE = torch.float64  # exact enough that predictions do not depend on how rows are batched
LOSSES = {"nll", "competitive", "cooperative"}
SOLVERS = {"gd": "sgd", "adam": "adam", "lbfgs": "lbfgs"}
MIN_ROWS_TO_CHOOSE = 20  # below this, a 10 % hold-out is too small to choose alpha by


def holdout_split(n_rows: int, fraction: float, seed: int, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out row positions; stratified by ``labels`` when every label has at
    least 2 rows (and the split can honour it), else a plain shuffled split."""
    rows = np.arange(n_rows)
    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        stratify = labels if counts.min() >= 2 else None
    try:
        return train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows of some class for this fraction
        return train_test_split(rows, test_size=fraction, random_state=seed)


def one_standard_error_choice(losses_CV: np.ndarray, strengths: list[float]
                              ) -> tuple[int, np.ndarray, np.ndarray]:
    """Of C candidates scored on the same V held-out rows, the strongest (largest ``strengths``)
    whose mean loss is within one standard error of the lowest, the SE being that of the paired
    row-by-row difference from the lowest. Returns its index, the mean losses (C,) and the SEs (C,).
    A candidate with a non-finite loss (a diverged fit) is never chosen, unless all are: then
    the first."""
    losses_CV = np.nan_to_num(losses_CV, nan=np.inf, posinf=np.inf)
    mean_C = losses_CV.mean(1)
    best = int(np.argmin(mean_C))
    n_val = losses_CV.shape[1]
    with np.errstate(invalid="ignore"):  # inf - inf where a fit diverged
        diff_CV = losses_CV - losses_CV[best]
        se_C = diff_CV.std(1, ddof=1) / math.sqrt(n_val) if n_val > 1 else np.zeros(len(mean_C))
        within = [c for c in range(len(mean_C)) if mean_C[c] - mean_C[best] <= se_C[c]]
    chosen = max(within, key=lambda c: strengths[c]) if within else 0
    return chosen, mean_C, se_C


class _KeepBest(Callback):
    """Remember the weights of the epoch with the best validation loss; restore them at the end."""

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        loss = state.history[-1]["val_loss"]
        if loss < self.best_loss:
            self.best_loss = loss
            self.best_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def on_train_end(self, state: TrainState) -> None:
        if self.best_state is not None:
            state.model.load_state_dict(self.best_state)


class _MixtureEstimator(BaseEstimator):
    """What the classifier and the regressor share: parameters, training, the gate's view."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_experts": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "expert": [StrOptions({"auto", "linear", "mlp"})],
        "expert_hidden": [Interval(Integral, 1, None, closed="left")],
        "expert_activation": [StrOptions(set(ACTIVATIONS))],
        "gate": [StrOptions({"softmax", "gaussian"})],
        "loss": [StrOptions(LOSSES)],
        "solver": [StrOptions({*SOLVERS, "em"})],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "auto_candidates": ["array-like"],
        "alpha_candidates": ["array-like"],
        "auto_criterion": [StrOptions({"bic", "validation"})],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(self, *, n_experts: int | str = 4, expert: str = "auto", expert_hidden: int = 64,
                 expert_activation: str = "tanh", gate: str = "softmax", loss: str = "nll",
                 solver: str = "adam",
                 max_epochs: int = 500, lr: float = 0.01, batch_size: int | None = None,
                 alpha: float | str = "auto", tol: float = 1e-4, n_iter_no_change: int = 10,
                 early_stopping: bool = False, validation_fraction: float = 0.1,
                 auto_candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8), auto_criterion: str = "bic",
                 alpha_candidates: tuple[float, ...] = (2.0, 0.5),
                 random_state: int | np.random.RandomState | None = None,
                 verbose: int = 0) -> None:
        self.n_experts = n_experts
        self.expert = expert
        self.expert_hidden = expert_hidden
        self.expert_activation = expert_activation
        self.gate = gate
        self.loss = loss
        self.solver = solver
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.alpha = alpha
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.auto_candidates = auto_candidates
        self.auto_criterion = auto_criterion
        self.alpha_candidates = alpha_candidates
        self.random_state = random_state
        self.verbose = verbose

    # --- what subclasses define ---------------------------------------------------------------
    _head = "identity"

    def _encode_targets(self, y: np.ndarray, *, reset: bool, classes: Any = None) -> np.ndarray:
        raise NotImplementedError

    def _loss_name(self) -> str:
        raise NotImplementedError

    def _n_outputs(self) -> int:
        raise NotImplementedError

    def _log_likelihood(self, model: MixtureOfExperts, x_ND: torch.Tensor, t: np.ndarray) -> float:
        raise NotImplementedError

    def _row_losses(self, model: MixtureOfExperts, x_ND: torch.Tensor, t: np.ndarray
                    ) -> np.ndarray:
        """Each row's loss under what the estimator predicts, (N,); lower is better."""
        raise NotImplementedError

    def _validate_y(self, X: Any, y: Any, *, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # --- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> _MixtureEstimator:
        """Fit the mixture to X (N, D) and y; returns self."""
        self._validate_params()
        self._check_solver()
        X, y = self._validate_y(X, y, reset=True)
        t = self._encode_targets(y, reset=True)
        self._check_enough_rows(X.shape[0])
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self.scaler_ = StandardScaler().fit(X)
        x_ND = self._to_tensor(X)
        precisions = self._precisions()
        self._precision = precisions[0]  # the prior while the number of experts is chosen
        chosen = None
        if self.n_experts == "auto":
            self.n_experts_, self.n_experts_curve_, chosen = self._select_n_experts(x_ND, t, seed)
        else:
            self.n_experts_, self.n_experts_curve_ = self.n_experts, None
        self.alpha_curve_ = None
        if self._chooses_alpha(len(t)):
            self._precision, self.alpha_curve_ = self._select_precision(x_ND, t, self.n_experts_,
                                                                        seed)
        self.alpha_ = self._alpha(len(t))
        # the chosen candidate is the final model when it was fitted the way fit fits it
        by_validation = self.auto_criterion == "validation"
        if (chosen is None or by_validation != self.early_stopping
                or self._precision != precisions[0]):
            chosen = self._train(x_ND, t, self.n_experts_, seed)
        self.model_, result = chosen
        self.history_, self.stop_reason_ = result.history, result.stop_reason
        self.n_iter_ = result.n_iter if self.solver == "em" else result.epochs
        if hasattr(self, "expert_variance_"):  # from an earlier fit by EM
            del self.expert_variance_
        if self.solver == "em" and result.variance_E is not None:
            self.expert_variance_ = result.variance_E.numpy()  # in standardised target units
        self._optimizer, self._generator = None, torch.Generator().manual_seed(seed)
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> _MixtureEstimator:
        """One pass over (X, y), continuing from the current weights; returns self.

        A pass is one epoch of the gradient solver, or one EM iteration on this batch for
        solver='em'. The first call builds the model and fits the input scaler on its batch; a
        classifier's first call needs ``classes``, every class that any batch will hold.
        """
        first = not hasattr(self, "model_")
        if first:
            self._validate_params()
            self._check_solver()
            if self.n_experts == "auto":
                raise ValueError(f"{type(self).__name__}: partial_fit needs a fixed number of "
                                 "experts; got n_experts='auto'. Pass an integer, e.g. "
                                 "n_experts=4.")
            if is_classifier(self) and classes is None:
                raise ValueError(f"{type(self).__name__}: the first call to partial_fit needs "
                                 "classes, every class any batch will hold; e.g. "
                                 "classes=[0, 1, 2].")
        X, y = self._validate_y(X, y, reset=first)
        t = self._encode_targets(y, reset=first, classes=classes)
        seed = 0
        if first:
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
            self.scaler_ = StandardScaler().fit(X)
            self._precision = self._precisions()[0]  # a stream holds out nothing to choose by
            self.model_ = self._build(self.n_experts, seed)
            self.n_experts_, self.n_experts_curve_ = self.n_experts, None
            self.alpha_, self.alpha_curve_ = self._alpha(len(t)), None
            self.history_, self.n_iter_, self.stop_reason_ = History(), 0, "partial_fit"
            self._optimizer, self._generator = None, torch.Generator().manual_seed(seed)
        x_ND = self._to_tensor(X)
        if self.solver == "em":
            config = self._em_config(seed, len(t), max_iter=1, init="data" if first else "model")
            record = fit_em(self.model_, x_ND, self._target_tensor(t), config).history[-1]
        else:
            record = self._gradient_pass(x_ND, t)
        self.n_iter_ += 1
        self.history_.append({**record, "epoch": self.n_iter_})
        return self

    def _gradient_pass(self, x_ND: torch.Tensor, t: np.ndarray) -> dict[str, float]:
        config = self._train_config(0, len(t), max_epochs=1)
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.model_, config)
        if self._generator is None:  # a reloaded estimator
            self._generator = torch.Generator().manual_seed(0)
        targets = prepare_targets(type(self).__name__, "y", self._target_tensor(t),
                                  out_features=self._n_outputs(), loss=config.loss, dtype=DTYPE)
        train_epoch(self.model_, self._optimizer, x_ND, targets, config, self._generator)
        return evaluate(self.model_, x_ND, targets, config, "train")

    def _expert_kind(self) -> str:
        """'auto' is an MLP expert for the gradient solvers and the linear one EM fits exactly."""
        if self.expert == "auto":
            return "linear" if self.solver == "em" else "mlp"
        return self.expert

    def _alpha(self, n_rows: int, precision: float | None = None) -> float:
        """'auto' is c / n_rows: a Gaussian prior on the weights of precision c (``precision``, or
        the one the fit chose) against the summed log-likelihood, so the penalty on the mean loss
        shrinks as rows grow."""
        if self.alpha != "auto":
            return float(self.alpha)
        precision = precision or getattr(self, "_precision", None) or self._precisions()[0]
        return precision / max(n_rows, 1)

    def _precisions(self) -> list[float]:
        try:
            candidates = [float(c) for c in self.alpha_candidates]
        except (TypeError, ValueError):
            candidates = []
        if not candidates or not all(math.isfinite(c) and c > 0 for c in candidates):
            raise ValueError(f"{type(self).__name__}: alpha_candidates must be positive numbers, "
                             f"the prior precisions c of alpha = c / n_samples; got "
                             f"alpha_candidates={self.alpha_candidates!r}. E.g. (2.0, 0.5).")
        return candidates

    def _chooses_alpha(self, n_rows: int) -> bool:
        """alpha='auto' chooses between several precisions when a hold-out can judge them."""
        return self.alpha == "auto" and len(self._precisions()) > 1 and n_rows >= MIN_ROWS_TO_CHOOSE

    def _select_precision(self, x_ND: torch.Tensor, t: np.ndarray, n_experts: int, seed: int
                          ) -> tuple[float, dict[str, list[float]]]:
        """Fit one mixture per prior precision on all but ``validation_fraction`` of the rows and
        score each on the rest; returns the chosen precision and the curve.

        The score is each held-out row's loss under what the estimator predicts: a classifier's
        log-loss, a regressor's squared error. The choice follows the one-standard-error rule:
        the strongest prior whose mean loss is within one standard error (of the paired
        row-by-row difference) of the lowest, so that a small hold-out's noise does not pick a
        weak prior that overfits.
        """
        train_rows, val_rows = self._holdout_rows(t, seed)
        precisions, rows_losses = self._precisions(), []
        for precision in precisions:
            model, _ = self._train(x_ND[train_rows], t[train_rows], n_experts, seed,
                                   validation=False, precision=precision)
            rows_losses.append(self._row_losses(model, x_ND[val_rows], t[val_rows]))
        chosen, mean_C, se_C = one_standard_error_choice(np.stack(rows_losses), precisions)
        return precisions[chosen], {"alpha_candidates": precisions, "val_loss": mean_C.tolist(),
                                    "val_loss_se": se_C.tolist()}

    def _em_config(self, seed: int, n_rows: int, *, max_iter: int | None = None,
                   init: str = "data", precision: float | None = None) -> EMConfig:
        # alpha is the ridge of every weighted least-squares and Newton system
        return EMConfig(max_iter=max_iter or self.max_epochs, tol=max(self.tol, 1e-12),
                        ridge=self._alpha(n_rows, precision) or EMConfig.ridge, init=init, seed=seed,
                        progress=bool(self.verbose))

    def _check_solver(self) -> None:
        """Combinations of parameters EM or the Gaussian gate cannot honour, refused before work."""
        owner = type(self).__name__
        if self.gate == "gaussian" and self.solver != "em":
            raise ValueError(f"{owner}: gate='gaussian' (the localized gate) is fitted by EM; got "
                             f"solver={self.solver!r}. Pass solver='em'.")
        if self.solver != "em":
            return
        refused = {"expert": (self._expert_kind(), "linear"), "loss": (self.loss, "nll"),
                   "early_stopping": (self.early_stopping, False)}
        if self.n_experts == "auto":
            refused["auto_criterion"] = (self.auto_criterion, "bic")
        for name, (value, needed) in refused.items():
            if value != needed:
                raise ValueError(f"{owner}: solver='em' needs {name}={needed!r}; got "
                                 f"{name}={value!r}.")

    def _check_enough_rows(self, n_rows: int) -> None:
        need = max(self._candidates()) if self.n_experts == "auto" else self.n_experts
        if n_rows < max(need, 2):
            raise ValueError(f"{type(self).__name__}: n_experts={self.n_experts} needs at least "
                             f"{max(need, 2)} rows; got n_samples={n_rows}. Use fewer experts or "
                             "more data.")

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        return torch.tensor(self.scaler_.transform(X), dtype=DTYPE)

    def _target_tensor(self, t: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(t))

    def _build(self, n_experts: int, seed: int) -> MixtureOfExperts | LocalizedMixtureOfExperts:
        expert = ExpertConfig(kind=self._expert_kind(), hidden=self.expert_hidden,
                              activation=self.expert_activation, head=self._head)
        generator = torch.Generator().manual_seed(seed)
        if self.gate == "gaussian":
            return LocalizedMixtureOfExperts(self.n_features_in_, self._n_outputs(), n_experts,
                                             expert=expert, generator=generator).to(DTYPE)
        return MixtureOfExperts(self.n_features_in_, self._n_outputs(), n_experts, expert=expert,
                                generator=generator).to(DTYPE)

    def _train_config(self, seed: int, n_rows: int, *, max_epochs: int | None = None,
                      validation: bool = False, precision: float | None = None) -> TrainConfig:
        return TrainConfig(loss=self._loss_name(), optimizer=SOLVERS[self.solver], lr=self.lr,
                           max_epochs=max_epochs or self.max_epochs, batch_size=self.batch_size,
                           weight_decay=self._alpha(n_rows, precision), patience=self.n_iter_no_change,
                           min_delta=self.tol,
                           monitor="val_loss" if validation else "train_loss", seed=seed,
                           progress=bool(self.verbose))

    def _holdout_rows(self, t: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out positions, ``validation_fraction`` held out, stratified by class."""
        labels = t if t.ndim == 1 and t.dtype.kind == "i" else None  # class indices
        return holdout_split(len(t), self.validation_fraction, seed, labels)

    def _train(self, x_ND: torch.Tensor, t: np.ndarray, n_experts: int, seed: int, *,
               validation: bool | None = None, precision: float | None = None):
        """Build and fit one mixture (at ``precision`` if given, else the fit's chosen one); with
        early stopping, the best validation epoch is kept."""
        validation = self.early_stopping if validation is None else validation
        model = self._build(n_experts, seed)
        if self.solver == "em":
            return model, fit_em(model, x_ND, self._target_tensor(t),
                                 self._em_config(seed, len(t), precision=precision))
        if not validation:
            config = self._train_config(seed, len(t), precision=precision)
            return model, fit(model, x_ND, self._target_tensor(t), config)
        train_rows, val_rows = self._holdout_rows(t, seed)
        config = self._train_config(seed, len(train_rows), validation=True, precision=precision)
        keep_best = _KeepBest()
        result = fit(model, x_ND[train_rows], self._target_tensor(t[train_rows]), config,
                     x_val=x_ND[val_rows], y_val=self._target_tensor(t[val_rows]),
                     callbacks=[keep_best])
        return model, result

    def _candidates(self) -> list[int]:
        candidates = sorted({int(c) for c in self.auto_candidates})
        if not candidates or candidates[0] < 1:
            raise ValueError(f"{type(self).__name__}: auto_candidates must be positive integers; "
                             f"got auto_candidates={self.auto_candidates!r}.")
        return candidates

    def _select_n_experts(self, x_ND: torch.Tensor, t: np.ndarray, seed: int):
        """Fit each candidate size and keep the one with the lowest BIC (or validation loss).

        Returns the chosen size, the curve, and the chosen (model, result) pair.
        """
        candidates = self._candidates()
        by_validation = self.auto_criterion == "validation"
        scores, fits = [], []
        for n_experts in candidates:
            model, result = self._train(x_ND, t, n_experts, seed, validation=by_validation)
            fits.append((model, result))
            if by_validation:
                scores.append(min(result.history[:, "val_loss"]))
            else:
                n_params = sum(p.numel() for p in model.parameters())
                log_lik = self._log_likelihood(model, x_ND, t)
                scores.append(-2.0 * log_lik + n_params * math.log(len(t)))
        best = int(np.argmin(scores))
        return candidates[best], {"n_experts": candidates, self.auto_criterion: scores}, fits[best]

    # --- the fitted mixture's view ------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, X: Any):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.model_(self._to_tensor(X))

    def gate_proba(self, X: Any) -> np.ndarray:
        """The gate's mixing proportions p_e(x), shape (N, E); rows sum to 1."""
        return self._forward(X).routing.probs_NE.numpy()

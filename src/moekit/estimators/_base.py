"""The contract moekit's scikit-learn estimators share: parameters, validation, the solver dispatch
(gradient or EM), and the gate's view of a fitted mixture. What a classifier and a regressor do
differently are the abstract hooks; how the number of experts and the prior are chosen is in
:mod:`moekit.estimators._selection`.

Shape legend: N rows, D features, O outputs (C classes for a classifier), E experts.
"""

from __future__ import annotations

import abc
import os
import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, is_classifier
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit.estimators._inputs import check_finite_values, fit_scaler, standardize
from moekit.estimators._plan import StagePlan
from moekit.estimators._resume import open_stages
from moekit.estimators._selection import holdout_split, precision_candidates, size_candidates
from moekit.estimators._settings import (
    DTYPES,
    describe,
    resolve,
    rows_per_update,
    step_multiply_adds,
)
from moekit.estimators._stages import SOLVERS, Stage, StageFitter
from moekit.exceptions import ConvergenceWarning
from moekit.fitting.config import TrainConfig
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig
from moekit.fitting.gradient import evaluate, make_optimizer, train_epoch
from moekit.fitting.history import History
from moekit.fitting.objective import prepare_targets
from moekit.nn.dense import DenseMixture, MixtureOfExperts
from moekit.nn.experts import ACTIVATIONS, ExpertConfig
from moekit.nn.localized import LocalizedMixtureOfExperts
from moekit.nn.outputs import MoEOutput
from moekit.threads import caller_chose_threads, compute_threads

LOSSES = {"nll", "competitive", "cooperative"}
# The fitted model predicts in float64, whatever dtype trained it: a row's prediction then does not
# depend on the rows beside it (to float64 rounding), as scikit-learn's checks require.
DTYPE = torch.float64


class BaseMixtureEstimator(BaseEstimator, abc.ABC):
    """What the classifier and the regressor share: parameters, training, the gate's view.

    Subclasses set ``_head`` (the experts' output head) and define the hooks below.
    """

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
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "alpha": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "auto_candidates": ["array-like"],
        "alpha_candidates": ["array-like"],
        "auto_criterion": [StrOptions({"auto", "bic", "validation"})],
        "dtype": [StrOptions({"auto", *DTYPES})],
        "threads": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "checkpoint": [str, os.PathLike, None],
    }
    _head: ClassVar[str] = "identity"

    def __init__(self, *, n_experts: int | str = 4, expert: str = "auto", expert_hidden: int = 64,
                 expert_activation: str = "tanh", gate: str = "softmax", loss: str = "nll",
                 solver: str = "adam",
                 max_epochs: int = 500, lr: float = 0.01, batch_size: int | str | None = "auto",
                 alpha: float | str = "auto", tol: float = 1e-4, n_iter_no_change: int = 10,
                 early_stopping: bool | str = "auto", validation_fraction: float = 0.1,
                 auto_candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
                 auto_criterion: str = "auto", alpha_candidates: tuple[float, ...] = (2.0, 0.5),
                 dtype: str = "auto", threads: int | None = None,
                 random_state: int | np.random.RandomState | None = None,
                 verbose: int = 0, checkpoint: str | os.PathLike | None = None) -> None:
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
        self.dtype = dtype
        self.threads = threads
        self.random_state = random_state
        self.verbose = verbose
        self.checkpoint = checkpoint

    # --- what subclasses define ---------------------------------------------------------------
    @abc.abstractmethod
    def _validate_y(self, X: Any, y: Any, *, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        """Validated X and y (scikit-learn's ``validate_data``)."""

    @abc.abstractmethod
    def _encode_targets(self, y: np.ndarray, *, reset: bool, classes: Any = None) -> np.ndarray:
        """y as the model fits it: class indices, or standardised values (N, O)."""

    @abc.abstractmethod
    def _loss_name(self) -> str:
        """The error function of :mod:`moekit.fitting.objective` that ``loss`` stands for."""

    @abc.abstractmethod
    def _n_outputs(self) -> int:
        """O: classes, or target columns."""

    @abc.abstractmethod
    def _log_likelihood(self, model: DenseMixture, x_ND: torch.Tensor, t: np.ndarray) -> float:
        """The fitted model's log-likelihood of the encoded targets (for BIC)."""

    @abc.abstractmethod
    def _row_losses(self, model: DenseMixture, x_ND: torch.Tensor, t: np.ndarray) -> np.ndarray:
        """Each row's loss under what the estimator predicts, (N,); lower is better."""

    # --- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> BaseMixtureEstimator:
        """Fit the mixture to X (N, D) and y; returns self."""
        self._validate_params()
        self._check_solver()
        precisions = precision_candidates(type(self).__name__, self.alpha_candidates)
        X, y = self._validate_y(X, y, reset=True)
        t = self._encode_targets(y, reset=True)
        self._check_enough_rows(X.shape[0])
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self._stages, seed = open_stages(self, X, t, seed)
        self.scaler_ = fit_scaler(X)
        settings = resolve(self.get_params(), len(t))
        fitter = StageFitter(self, self._to_tensor(X, settings.dtype), t, seed, settings,
                             self._stages)
        largest = self._build(max(self._sizes()), seed, settings.dtype)
        step = step_multiply_adds(largest, settings.batch_size or fitter.n_train)
        chosen_by_caller = self.threads is not None or caller_chose_threads()
        plan = StagePlan(self, fitter)
        with compute_threads(self.threads, step) as self.threads_:
            stage = plan.run(precisions)
        self.choices_ = describe(self.get_params(), settings, n_rows=len(t),
                                 n_train=fitter.n_train, threads=self.threads_,
                                 threads_chosen=not chosen_by_caller) + plan.choices
        self.n_experts_curve_, self.alpha_curve_ = plan.n_experts_curve, plan.alpha_curve
        self.interrupted_ = plan.interrupted
        self._keep(stage, fitter, seed)
        return self

    def _keep(self, stage: Stage, fitter: StageFitter, seed: int) -> None:
        """The fitted attributes, from the chosen stage."""
        result = stage.result
        if self.interrupted_ and not len(result.history):
            raise KeyboardInterrupt  # stopped before one epoch ended: nothing to keep
        if self.interrupted_:
            warnings.warn(f"{type(self).__name__}: the fit was interrupted (Ctrl-C); the best "
                          "model fitted so far is kept (interrupted_=True).", UserWarning,
                          stacklevel=3)
        else:
            self._warn_if_not_converged(result)
        self.model_, self.n_experts_ = stage.model.to(DTYPE), stage.n_experts
        self.alpha_precision_ = stage.precision if self.alpha == "auto" else None
        self.alpha_ = self._alpha(fitter.n_train, stage.precision)
        self.history_, self.stop_reason_ = _chain_history(stage), result.stop_reason
        self.n_iter_ = result.n_iter if self.solver == "em" else len(self.history_)
        if hasattr(self, "expert_variance_"):  # from an earlier fit by EM
            del self.expert_variance_
        if self.solver == "em" and result.variance_E is not None:
            self.expert_variance_ = result.variance_E.numpy()  # in standardised target units
        self._optimizer, self._generator = None, torch.Generator().manual_seed(seed)

    def _sizes(self) -> list[int]:
        if self.n_experts == "auto":
            return size_candidates(type(self).__name__, self.auto_candidates)
        return [self.n_experts]

    def _warn_if_not_converged(self, result: Any) -> None:
        if result.stop_reason in ("max_epochs", "max_iter"):
            warnings.warn(f"{type(self).__name__}: the fit stopped at max_epochs={self.max_epochs} "
                          "while the loss was still improving by more than tol="
                          f"{self.tol:g}; raise max_epochs.", ConvergenceWarning, stacklevel=3)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> BaseMixtureEstimator:
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
            self.scaler_ = fit_scaler(X)
            # a stream holds out nothing to choose the prior by: the first candidate
            precision = precision_candidates(type(self).__name__, self.alpha_candidates)[0]
            self.alpha_precision_ = precision if self.alpha == "auto" else None
            self.model_ = self._build(self.n_experts, seed, DTYPE)  # streams train as they predict
            self.n_experts_, self.n_experts_curve_ = self.n_experts, None
            self.alpha_, self.alpha_curve_ = self._alpha(len(t), precision), None
            self.history_, self.n_iter_, self.stop_reason_ = History(), 0, "partial_fit"
            self._optimizer, self._generator = None, torch.Generator().manual_seed(seed)
        x_ND = self._to_tensor(X)
        if self.solver == "em":
            config = self._em_config(seed, len(t), max_iter=1, init="data" if first else "model",
                                     precision=self._fitted_precision())
            with warnings.catch_warnings():  # one iteration per call, by design
                warnings.simplefilter("ignore", ConvergenceWarning)
                record = fit_em(self.model_, x_ND, self._target_tensor(t), config).history[-1]
        else:
            record = self._gradient_pass(x_ND, t)
        self.n_iter_ += 1
        self.history_.append({**record, "epoch": self.n_iter_})
        return self

    def _gradient_pass(self, x_ND: torch.Tensor, t: np.ndarray) -> dict[str, float]:
        config = TrainConfig(loss=self._loss_name(), optimizer=SOLVERS[self.solver], lr=self.lr,
                             max_epochs=1, seed=0, progress=False,
                             batch_size=rows_per_update(self.batch_size, self.solver, len(t)),
                             weight_decay=self._alpha(len(t), self._fitted_precision()))
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.model_, config)
        if self._generator is None:  # a reloaded estimator
            self._generator = torch.Generator().manual_seed(0)
        targets = prepare_targets(type(self).__name__, "y", self._target_tensor(t),
                                  out_features=self._n_outputs(), loss=config.loss,
                                  dtype=x_ND.dtype)
        train_epoch(self.model_, self._optimizer, x_ND, targets, config, self._generator)
        return evaluate(self.model_, x_ND, targets, config, "train")

    def _fitted_precision(self) -> float:
        """The prior precision the fit chose (``alpha_precision_``), or the first candidate (a
        folder saved before the choice was recorded)."""
        precision = getattr(self, "alpha_precision_", None)
        return precision or precision_candidates(type(self).__name__, self.alpha_candidates)[0]

    def _expert_kind(self) -> str:
        """'auto' is an MLP expert for the gradient solvers and the linear one EM fits exactly."""
        if self.expert == "auto":
            return "linear" if self.solver == "em" else "mlp"
        return self.expert

    def _alpha(self, n_rows: int, precision: float) -> float:
        """'auto' is c / n_rows: a Gaussian prior on the weights of precision c against the summed
        log-likelihood, so the penalty on the mean loss shrinks as rows grow."""
        if self.alpha != "auto":
            return float(self.alpha)
        return precision / max(n_rows, 1)

    def _em_config(self, seed: int, n_rows: int, *, precision: float, max_iter: int | None = None,
                   init: str = "data") -> EMConfig:
        # alpha is the ridge of every weighted least-squares and Newton system
        return EMConfig(max_iter=max_iter or self.max_epochs, tol=max(self.tol, 1e-12),
                        ridge=self._alpha(n_rows, precision) or EMConfig.ridge, init=init,
                        seed=seed, progress=bool(self.verbose))

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
            if value not in (needed, "auto"):
                raise ValueError(f"{owner}: solver='em' needs {name}={needed!r}; got "
                                 f"{name}={value!r}.")

    def _check_enough_rows(self, n_rows: int) -> None:
        need = (max(size_candidates(type(self).__name__, self.auto_candidates))
                if self.n_experts == "auto" else self.n_experts)
        if n_rows < max(need, 2):
            raise ValueError(f"{type(self).__name__}: n_experts={self.n_experts} needs at least "
                             f"{max(need, 2)} rows; got n_samples={n_rows}. Use fewer experts or "
                             "more data.")

    def _to_tensor(self, X: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """X standardised, as a tensor of ``dtype`` (default: the fitted model's)."""
        columns = getattr(self, "feature_names_in_", None)
        x_ND = standardize(type(self).__name__, "X", self.scaler_, X, columns)
        dtype = dtype or next(self.model_.parameters()).dtype
        return torch.tensor(x_ND, dtype=dtype)

    def _check_finite(self, X: Any = None, y: Any = None) -> None:
        """A DataError naming the first NaN or inf of X (validated) or of y (as given)."""
        owner, columns = type(self).__name__, getattr(self, "feature_names_in_", None)
        for name, values in (("X", X), ("y", y)):
            if values is not None:
                check_finite_values(owner, name, values, columns if name == "X" else None)

    def _target_tensor(self, t: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(t))

    def _build(self, n_experts: int, seed: int, dtype: torch.dtype) -> DenseMixture:
        expert = ExpertConfig(kind=self._expert_kind(), hidden=self.expert_hidden,
                              activation=self.expert_activation, head=self._head)
        generator = torch.Generator().manual_seed(seed)
        if self.gate == "gaussian":
            return LocalizedMixtureOfExperts(self.n_features_in_, self._n_outputs(), n_experts,
                                             expert=expert, generator=generator).to(dtype)
        return MixtureOfExperts(self.n_features_in_, self._n_outputs(), n_experts, expert=expert,
                                generator=generator).to(dtype)

    def _holdout_rows(self, t: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out positions, ``validation_fraction`` held out, stratified by
        class."""
        labels = t if t.ndim == 1 and t.dtype.kind == "i" else None  # class indices
        return holdout_split(len(t), self.validation_fraction, seed, labels)

    # --- the fitted mixture's view ------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, X: Any) -> MoEOutput:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64, ensure_all_finite=False)
        self._check_finite(X)
        return self.model_(self._to_tensor(X))

    def gate_proba(self, X: Any) -> np.ndarray:
        """The gate's mixing proportions p_e(x), shape (N, E); rows sum to 1."""
        return self._forward(X).routing.probs_NE.numpy()


def _chain_history(stage: Stage) -> History:
    """The kept stage's history, after those of the stages it was warm-started from: one path of
    epochs, numbered on, each record naming its ``stage``."""
    chain = stage.chain()
    if len(chain) == 1:
        return stage.result.history
    records, offset = [], 0
    for link in chain:
        records.extend({**record, "epoch": record["epoch"] + offset, "stage": link.label}
                       for record in link.result.history)
        offset += len(link.result.history)
    return History(records)

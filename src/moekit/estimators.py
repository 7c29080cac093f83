"""scikit-learn estimators: a mixture of experts in one line of Python.

Shape legend: N rows, D features, O outputs (C classes for a classifier), E experts.

    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MixtureOfExpertsClassifier(n_experts=3, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape, clf.gate_proba(X[:2]).shape
    ((2, 3), (2, 3))

The estimators follow the scikit-learn contract: ``__init__`` only stores its arguments, ``fit``
validates them and returns ``self``, learned attributes end in ``_``. Inputs (and a regressor's
targets) are standardised inside; every output is in the caller's units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from moekit._estimator_base import _MixtureEstimator


class MixtureOfExpertsClassifier(ClassifierMixin, _MixtureEstimator):
    """A mixture of experts for classification: each expert outputs a class distribution.

    With ``loss='nll'`` the experts are multinomial-logit (softmax) models and the mixture is fitted
    by its log-likelihood; 'competitive' and 'cooperative' are Eq. 2 and Eq. 1 of Jacobs et al.
    (1991) on one-hot targets.

    Parameters:
        n_experts: E, or 'auto' to fit each of ``auto_candidates`` and keep the best by
            ``auto_criterion`` ('bic', or 'validation' loss); the curve is kept in
            ``n_experts_curve_``.
        expert: 'linear' (the paper's), 'mlp' (one hidden layer of ``expert_hidden`` units), or
            'auto' (the default): 'mlp' for the gradient solvers, 'linear' for solver='em'.
        expert_activation: the MLP expert's hidden activation: 'tanh' (the default), 'relu',
            'sigmoid', 'gelu' or 'silu'.
        gate: 'softmax', the paper's gate, or 'gaussian', the localized gate of Xu, Jordan & Hinton
            (1995), fitted with solver='em'.
        loss: 'nll', 'competitive' or 'cooperative'.
        solver: 'gd' (plain gradient descent, the paper's), 'adam', 'lbfgs', or 'em'
            (Jordan & Jacobs 1994: linear experts and loss='nll' only; ``max_epochs`` caps the EM
            iterations, ``tol`` is the relative rise of the log-likelihood below which it stops,
            ``alpha`` the ridge of its least-squares and Newton systems).
        max_epochs, lr, batch_size: passes over the data, step size, rows per step (None: all).
        alpha: L2 penalty on the weights, alpha / 2 * sum of squares, added to the mean loss; or
            'auto' (the default), c / n_samples: a Gaussian prior of precision c on the weights
            against the summed log-likelihood, so that more rows are regularised less. c is the
            one of ``alpha_candidates`` whose mixture, fitted on all but ``validation_fraction``
            of the rows, predicts the rest best (log-loss; a regressor's squared error), by the
            one-standard-error rule: the largest c within one SE of the lowest loss. The mixture
            is then refitted on every row: one extra fit per candidate. With a single candidate,
            fewer than 20 rows, or in ``partial_fit``, c is the first candidate.
        alpha_candidates: the precisions c that alpha='auto' chooses from, (2.0, 0.5) by default.
        tol, n_iter_no_change: stop when the monitored loss has not improved by ``tol`` for
            ``n_iter_no_change`` epochs.
        early_stopping: hold out ``validation_fraction`` of the rows, monitor their loss and keep
            the weights of the best epoch.
        random_state: seeds the initial weights and the shuffling.
        verbose: show a progress bar when > 0.

    Attributes:
        classes_, n_features_in_, feature_names_in_ (when X has string column names), model_ (the
        fitted :class:`~moekit.layers.MixtureOfExperts`, on standardised inputs), scaler_,
        history_ (per-epoch metrics; per EM iteration, with the log-likelihood, for solver='em'),
        n_iter_ (epochs or EM iterations), stop_reason_, n_experts_, n_experts_curve_, alpha_
        (the penalty on all n_samples rows), alpha_curve_ (each candidate precision's mean
        held-out loss per row, log-loss or squared error in standardised units, and its paired
        SE against the lowest; None when nothing was chosen);
        a regressor fitted by EM also has expert_variance_ (E,), in standardised target units.
    """

    _head = "softmax"

    def _validate_y(self, X, y, *, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float64)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        return X, y

    def _encode_targets(self, y, *, reset, classes=None):
        if reset:
            encoder = LabelEncoder().fit(y if classes is None else classes)
            if len(encoder.classes_) < 2:
                raise ValueError(f"{type(self).__name__}: y has one class only "
                                 f"({encoder.classes_[0]!r}); a classifier needs at least 2 "
                                 "classes.")
            self.classes_ = encoder.classes_
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"{type(self).__name__}: y holds classes {unknown.tolist()} that are "
                             f"not in classes={self.classes_.tolist()}; pass every class on the "
                             "first call to partial_fit.")
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def _loss_name(self):
        return "categorical_nll" if self.loss == "nll" else self.loss

    def _n_outputs(self):
        return len(self.classes_)

    def _log_likelihood(self, model, x_ND, t):
        return -float(self._row_losses(model, x_ND, t).sum())

    def _row_losses(self, model, x_ND, t):
        """Each row's log-loss, -log p(y_n | x_n), (N,)."""
        with torch.no_grad():
            proba_NC = model(x_ND).output
        picked_N = proba_NC[torch.arange(len(t)), torch.as_tensor(t)]
        return -picked_N.clamp_min(1e-300).log().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (N, C), columns in the order of ``classes_``."""
        return self._forward(X).output.numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        best_N = self.predict_proba(X).argmax(1)
        return self.classes_[best_N]

    def predict_experts(self, X: Any) -> np.ndarray:
        """Each expert's class probabilities, (N, E, C)."""
        return self._forward(X).expert_outputs.numpy()


class MixtureOfExpertsRegressor(RegressorMixin, _MixtureEstimator):
    """A mixture of experts for regression (one or several outputs).

    With ``loss='nll'`` the mixture is fitted by the Gaussian mixture log-likelihood, Eq. 3 of
    Jacobs et al. (1991); 'competitive' and 'cooperative' are Eq. 2 and Eq. 1. Parameters and
    attributes are those of :class:`MixtureOfExpertsClassifier`, less ``classes_``, plus
    ``y_scaler_``.
    """

    def _validate_y(self, X, y, *, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float64, y_numeric=True,
                             multi_output=True)
        if reset:
            self._y_1d = y.ndim == 1
        return X, y

    def _encode_targets(self, y, *, reset, classes=None):
        y_NO = y.reshape(len(y), -1)
        if reset:
            self.y_scaler_ = StandardScaler().fit(y_NO)
            self.n_outputs_ = y_NO.shape[1]
        elif y_NO.shape[1] != self.n_outputs_:
            raise ValueError(f"{type(self).__name__}: y has {y_NO.shape[1]} outputs but the model "
                             f"was fitted with {self.n_outputs_}.")
        return self.y_scaler_.transform(y_NO)

    def _loss_name(self):
        return "mixture_nll" if self.loss == "nll" else self.loss

    def _n_outputs(self):
        return self.n_outputs_

    def _log_likelihood(self, model, x_ND, t):
        # A Gaussian with one shared variance, its maximum-likelihood estimate (constants dropped).
        mse = float(self._row_losses(model, x_ND, t).mean())
        return -0.5 * t.size * math.log(max(mse, 1e-300))

    def _row_losses(self, model, x_ND, t):
        """Each row's squared error, averaged over outputs (standardised units), (N,)."""
        with torch.no_grad():
            return (model(x_ND).output - torch.as_tensor(t)).square().mean(-1).numpy()

    def _unscale(self, y_NO: np.ndarray) -> np.ndarray:
        return y_NO * self.y_scaler_.scale_ + self.y_scaler_.mean_

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, (N,) for a 1-D y, else (N, O)."""
        y_NO = self._unscale(self._forward(X).output.numpy())
        return y_NO[:, 0] if self._y_1d else y_NO

    def predict_experts(self, X: Any) -> np.ndarray:
        """Each expert's prediction: (N, E) for a 1-D y, else (N, E, O)."""
        y_NEO = self._unscale(self._forward(X).expert_outputs.numpy())
        return y_NEO[..., 0] if self._y_1d else y_NEO

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

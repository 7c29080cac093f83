"""The scikit-learn regressor: a mixture of experts for one or several real-valued outputs.

Shape legend: N rows, D features, O outputs, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.utils.validation import validate_data

from moekit.estimators._base import BaseMixtureEstimator
from moekit.estimators._inputs import fit_scaler, standardize


class MixtureOfExpertsRegressor(RegressorMixin, BaseMixtureEstimator):
    """A mixture of experts for regression (one or several outputs).

    With ``loss='nll'`` the mixture is fitted by the Gaussian mixture log-likelihood, Eq. 3 of
    Jacobs et al. (1991); 'competitive' and 'cooperative' are Eq. 2 and Eq. 1. Parameters and
    attributes are those of :class:`MixtureOfExpertsClassifier`, less ``classes_``, plus
    ``y_scaler_``.
    """

    def _validate_y(self, X, y, *, reset):
        self._check_finite(y=y)
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float64, y_numeric=True,
                             multi_output=True, ensure_all_finite=False)
        self._check_finite(X)
        if reset:
            self._y_1d = y.ndim == 1
        return X, y

    def _encode_targets(self, y, *, reset, classes=None):
        y_NO = y.reshape(len(y), -1)
        if reset:
            self.y_scaler_ = fit_scaler(y_NO)
            self.n_outputs_ = y_NO.shape[1]
        elif y_NO.shape[1] != self.n_outputs_:
            raise ValueError(f"{type(self).__name__}: y has {y_NO.shape[1]} outputs but the model "
                             f"was fitted with {self.n_outputs_}.")
        return standardize(type(self).__name__, "y", self.y_scaler_, y_NO)

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

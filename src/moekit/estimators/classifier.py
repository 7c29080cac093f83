"""The scikit-learn classifier: a mixture of experts whose experts each give a class distribution.

Shape legend: N rows, D features, C classes, E experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from moekit.estimators._base import BaseMixtureEstimator


class MixtureOfExpertsClassifier(ClassifierMixin, BaseMixtureEstimator):
    """A mixture of experts for classification: each expert outputs a class distribution.

    With ``loss='nll'`` the experts are multinomial-logit (softmax) models and the mixture is fitted
    by its log-likelihood; 'competitive' and 'cooperative' are Eq. 2 and Eq. 1 of Jacobs et al.
    (1991) on one-hot targets.

    Parameters:
        n_experts: E, or 'auto': ``auto_candidates`` are fitted from the smallest, and the fewest
            experts whose held-out loss is within one standard error of the lowest are kept
            (``auto_criterion='validation'``; the search stops once two larger counts in a row
            do not lower it); BIC for solver='em' (``auto_criterion='bic'``). The curve is kept in
            ``n_experts_curve_``, the reason in ``choices_``.
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
        max_epochs, lr: passes over the data, step size.
        batch_size: rows per update; None for all; 'auto' (the default): 256, doubled up to 1024
            while an epoch keeps 8 updates; all rows below 256 (and for solver='lbfgs' or 'em').
        alpha: L2 penalty on the weights, alpha / 2 * sum of squares, added to the mean loss; or
            'auto' (the default), c / n_samples: a Gaussian prior of precision c on the weights
            against the summed log-likelihood, so that more rows are regularised less. c is the
            one of ``alpha_candidates`` whose mixture, fitted on all but ``validation_fraction``
            of the rows, predicts the rest best (log-loss; a regressor's squared error), by the
            one-standard-error rule: the largest c within one SE of the lowest loss. With early
            stopping (the default) the candidates share the held-out rows and the chosen one is
            kept, each weaker c warm-started from the stronger one's weights; without it the
            mixture is refitted on every row (one extra fit). With a single candidate, fewer
            than 20 rows, or in ``partial_fit``, c is the first candidate.
        alpha_candidates: the precisions c that alpha='auto' chooses from, (2.0, 0.5) by default.
        tol, n_iter_no_change: stop when the monitored loss has not improved by ``tol`` for
            ``n_iter_no_change`` epochs.
        early_stopping: hold out ``validation_fraction`` of the rows, monitor their loss and keep
            the weights of the best epoch; 'auto' (the default): on for the gradient solvers with
            at least 50 rows. The stages of the 'auto' choices then all train on the same rows and
            the chosen one is kept (no refit); each weaker prior is warm-started from the
            stronger one.
        dtype: the training's float type: 'float32', 'float64', or 'auto' (the default: float32
            for the gradient solvers, float64 for EM). The fitted model predicts in float64.
        threads: threads to train on; None (the default) chooses for the work (one thread for
            small steps, else the idle cores: :mod:`moekit.threads`) unless the caller set a
            count (OMP_NUM_THREADS, torch.set_num_threads); the count is restored after the fit.
        random_state: seeds the initial weights and the shuffling.
        verbose: when > 0, one labelled progress bar per stage (candidate k of n, the prior,
            the final fit) with the held-out loss. Ctrl-C during a fit stops it cleanly: no
            further stage runs, the best model so far is kept and ``interrupted_`` is True.
        checkpoint: a folder (created if missing) where the fit keeps its state: a gradient fit
            every 10 epochs, an EM fit when it ends, one file per stage (each candidate of the
            'auto' choices, then the final fit). Fitting again with the same folder, parameters
            and data resumes where an interrupted fit stopped and ends with the weights an
            uninterrupted fit would have, bit for bit; a finished fit is read back, not rerun.
            A folder of another fit (other parameters or data) is refused, naming each
            difference; ``verbose`` may change and ``max_epochs`` may be raised. The folder is
            kept; one folder per fit (not shared by a grid search). None (the default) keeps
            nothing. ``partial_fit`` does not use it.

    Attributes:
        classes_, n_features_in_, feature_names_in_ (when X has string column names), model_ (the
        fitted :class:`~moekit.nn.dense.MixtureOfExperts`, on standardised inputs), scaler_,
        history_ (per-epoch metrics; per EM iteration, with the log-likelihood, for solver='em';
        a warm-started stage's history follows the one it started from, each record naming its
        ``stage``), n_iter_ (epochs or EM iterations), stop_reason_, n_experts_,
        n_experts_curve_, alpha_ (the penalty c / rows on the rows the kept model trained on),
        alpha_precision_ (the prior precision c that
        alpha='auto' chose; None for a fixed alpha), alpha_curve_ (each candidate precision's mean
        held-out loss per row, log-loss or squared error in standardised units, and its paired
        SE against the lowest; None when nothing was chosen);
        choices_ (each setting moekit chose, its value and why: dtype, batch_size,
        early_stopping, threads, n_experts, alpha), interrupted_ (Ctrl-C stopped the fit),
        threads_ (the thread count it trained on);
        a regressor fitted by EM also has expert_variance_ (E,), in standardised target units.
    """

    _head = "softmax"

    def _validate_y(self, X, y, *, reset):
        self._check_finite(y=y)
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float64, ensure_all_finite=False)
        self._check_finite(X)
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

"""scikit-learn estimators: a mixture of experts in one line of Python.

    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MixtureOfExpertsClassifier(n_experts=3, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape, clf.gate_proba(X[:2]).shape
    ((2, 3), (2, 3))

The estimators follow the scikit-learn contract: ``__init__`` only stores its arguments, ``fit``
validates them and returns ``self``, learned attributes end in ``_``. Inputs (and a regressor's
targets) are standardised inside; every output is in the caller's units. Saved folders hold no
pickle (:mod:`~moekit.estimators.persistence`).
"""

from moekit.estimators._base import BaseMixtureEstimator
from moekit.estimators._selection import holdout_split
from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.persistence import load_estimator, save_estimator
from moekit.estimators.regressor import MixtureOfExpertsRegressor

__all__ = [
    "BaseMixtureEstimator",
    "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor",
    "holdout_split",
    "load_estimator",
    "save_estimator",
]

"""Hostile magnitudes for the estimators: a 1e300 feature (whose square overflows float64) and a
1e-300 one (whose square underflows) are scaled, not turned into NaN or dropped; non-finite values
and a new row out of all proportion to the training data are refused, naming the column, the
value and the fix."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.exceptions import DataError


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    return X, (X[:, 0] - 0.5 * X[:, 1] > 0).astype(int)


def _fit(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ConvergenceWarning of the short fits
        warnings.simplefilter("error", RuntimeWarning)  # an overflow in numpy or sklearn
        return estimator.fit(X, y)


def _classifier():
    return MixtureOfExpertsClassifier(n_experts=2, max_epochs=150, lr=0.05, alpha=0.0,
                                      random_state=0)


def test_a_1e300_feature_is_scaled_not_overflowed():
    X, y = _data()
    plain = _fit(_classifier(), X, y)
    huge = X * [1e300, 1.0]
    clf = _fit(_classifier(), huge, y)
    assert np.isfinite(clf.scaler_.mean_).all() and np.isfinite(clf.scaler_.scale_).all()
    assert np.isfinite(clf.predict_proba(huge)).all()
    # the standardised inputs differ from the plain ones by rounding only, so the fits agree
    assert clf.score(huge, y) == pytest.approx(plain.score(X, y), abs=0.02)


def test_a_feature_scaled_by_a_power_of_two_gives_the_same_model_bit_for_bit():
    X, y = _data()
    plain = _fit(_classifier(), X, y)
    far = _fit(_classifier(), X * [2.0 ** 996, 2.0 ** -996], y)  # ~6.7e299 and ~1.5e-300
    for name, tensor in plain.model_.state_dict().items():
        assert torch.equal(tensor, far.model_.state_dict()[name]), name


def test_a_1e_minus_300_feature_is_not_lost():
    X, y = _data()
    tiny = X * [1e-300, 1.0]  # the label depends on it: without it, accuracy is near chance
    clf = _fit(_classifier(), tiny, y)
    assert clf.scaler_.scale_[0] == pytest.approx(np.std(tiny[:, 0]), rel=1e-12)
    assert clf.score(tiny, y) > 0.9


def test_a_regressor_target_of_1e300_is_scaled_not_overflowed():
    X, _ = _data()
    y = X[:, 0] - 0.5 * X[:, 1]
    params = {"n_experts": 2, "max_epochs": 50, "random_state": 0}
    plain = _fit(MixtureOfExpertsRegressor(**params), X, y)
    huge = _fit(MixtureOfExpertsRegressor(**params), X, y * 2.0 ** 997)  # ~1.3e300
    assert np.array_equal(huge.predict(X), plain.predict(X) * 2.0 ** 997)


def test_a_column_of_inf_is_refused_naming_it():
    X, y = _data()
    frame = pd.DataFrame({"height": X[:, 0], "weight": np.inf})
    with pytest.raises(DataError, match=r"^MixtureOfExpertsClassifier: X must be finite \(no NaN "
                                        r"or inf\); got X\[0, 'weight'\]=inf \(200 non-finite "
                                        r"values\)\. Drop or impute those rows first\.$"):
        _classifier().fit(frame, y)


def test_nan_in_a_regressor_target_is_refused_naming_it():
    X, y = _data()
    y = y.astype(float)
    y[7] = np.nan
    with pytest.raises(DataError, match=r"^MixtureOfExpertsRegressor: y must be finite \(no NaN "
                                        r"or inf\); got y\[7\]=nan \(1 non-finite value\)"):
        MixtureOfExpertsRegressor().fit(X, y)


def test_predict_with_an_overflowing_row_is_refused_naming_the_column_and_the_fix():
    X, y = _data()
    clf = _fit(_classifier(), pd.DataFrame(X, columns=["height", "weight"]), y)
    row = pd.DataFrame([[0.5, 1e300]], columns=["height", "weight"])
    with pytest.raises(DataError, match=r"^MixtureOfExpertsClassifier: X\[0, 'weight'\]=1e\+300 "
                                        r"is out of all proportion to that column in the training "
                                        r"data \(mean .*, standard deviation .*\): standardised, "
                                        r"its square overflows float64\. Rescale that column as "
                                        r"the training data were \(e\.g\. divide it by 1e\+300\), "
                                        r"or drop the row\.$"):
        clf.predict(row)


def test_predict_with_a_nan_row_is_refused_naming_it():
    X, y = _data()
    clf = _fit(_classifier(), X, y)
    with pytest.raises(DataError, match=r"X must be finite \(no NaN or inf\); got X\[1, 0\]=nan"):
        clf.predict_proba([[0.0, 0.0], [np.nan, 1.0]])

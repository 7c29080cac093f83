"""`fit_metrics`: scores in the target's own units, checked by hand and against sklearn.metrics."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.reports.metrics import confusion_counts, fit_metrics


class Stub:
    """An estimator whose predictions are fixed: predict -> ``predicted``, and predict_proba."""

    def __init__(self, predicted=None, proba=None, classes=None):
        self.predicted, self.proba, self.classes_ = predicted, proba, classes

    def predict(self, X):
        return self.predicted[np.asarray(X)[:, 0].astype(int)]

    def predict_proba(self, X):
        return self.proba[np.asarray(X)[:, 0].astype(int)]


def row_ids(n):
    return pd.DataFrame({"row": np.arange(n)})  # the stub reads the row's id from its input


def test_regression_worked_example():
    # rows 0..3 scored: actual 10, 20, 30, 40; predicted 12, 18, 30, 44
    # errors 2, -2, 0, 4 -> MSE (4 + 4 + 0 + 16) / 4 = 6, MAE 8 / 4 = 2
    # mean 25, variance (225 + 25 + 25 + 225) / 4 = 125 -> R^2 = 1 - 6 / 125 = 0.952
    y = np.array([10.0, 20.0, 30.0, 40.0, 999.0])  # the last row is not scored
    stub = Stub(predicted=np.array([12.0, 18.0, 30.0, 44.0, 0.0]))
    m = fit_metrics(stub, row_ids(5), y, [0, 1, 2, 3], "regress")
    assert m == pytest.approx({"rmse": math.sqrt(6), "mae": 2.0, "r2": 0.952,
                               "target_std": math.sqrt(125)})
    assert m["r2"] == pytest.approx(1 - (m["rmse"] / m["target_std"]) ** 2)


def test_classification_worked_example():
    # true a, a, b, c; probabilities below, so predicted a, b, b, a
    # accuracy 2/4; recall a 1/2, b 1/1, c 0/1 -> balanced (0.5 + 1 + 0) / 3 = 0.5
    # log-loss -(ln 0.7 + ln 0.4 + ln 0.8 + ln 0.2) / 4; majority class a: 2/4
    proba = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    stub = Stub(proba=proba, classes=np.array(["a", "b", "c"]))
    y = np.array(["a", "a", "b", "c"])
    m = fit_metrics(stub, row_ids(4), y, np.ones(4, dtype=bool), "classify")
    expected_log_loss = -(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(0.2)) / 4
    assert m == pytest.approx({"accuracy": 0.5, "balanced_accuracy": 0.5,
                               "log_loss": expected_log_loss, "baseline_accuracy": 0.5})


@pytest.fixture(scope="module")
def lines():
    """A target far from mean 0 / variance 1 (mean ~1000, sd ~400): standardised scores would
    differ from these by orders of magnitude."""
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"x": rng.uniform(-2, 2, 120)})
    y = 1000.0 + 200.0 * X["x"].to_numpy() + rng.normal(0, 30.0, 120)
    return X, y


def test_regression_against_sklearn_in_target_units(lines):
    X, y = lines
    val = np.arange(90, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = MixtureOfExpertsRegressor(n_experts=2, expert="linear", alpha=0.01, max_epochs=60,
                                        random_state=0).fit(X.iloc[:90], y[:90])
    m = fit_metrics(reg, X, y, val, "regress")
    predicted = reg.predict(X.iloc[val])
    assert m["rmse"] == pytest.approx(math.sqrt(metrics.mean_squared_error(y[val], predicted)))
    assert m["mae"] == pytest.approx(metrics.mean_absolute_error(y[val], predicted))
    assert m["r2"] == pytest.approx(metrics.r2_score(y[val], predicted))
    assert m["target_std"] == pytest.approx(np.std(y[val]))
    assert 10 < m["rmse"] < 200 and m["r2"] > 0.5  # in the target's units: near the noise's 30


def test_classification_against_sklearn():
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"x1": rng.normal(size=150), "x2": rng.normal(size=150)})
    y = np.where(X["x1"] > 0.5, "high", np.where(X["x1"] < -0.5, "low", "mid"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MixtureOfExpertsClassifier(n_experts=2, expert="linear", alpha=0.01,
                                         max_epochs=40, random_state=0).fit(X, y)
    rows = np.arange(0, 150, 3)
    m = fit_metrics(clf, X, y, rows, "classify")
    proba = clf.predict_proba(X.iloc[rows])
    predicted = clf.predict(X.iloc[rows])
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y[rows], predicted))
    assert m["balanced_accuracy"] == pytest.approx(
        metrics.balanced_accuracy_score(y[rows], predicted))
    assert m["log_loss"] == pytest.approx(metrics.log_loss(y[rows], proba, labels=clf.classes_))
    _, counts = np.unique(y[rows], return_counts=True)
    assert m["baseline_accuracy"] == pytest.approx(counts.max() / len(rows))


def test_no_rows_no_scores_and_bad_arguments():
    stub = Stub(predicted=np.zeros(3))
    assert fit_metrics(stub, row_ids(3), np.zeros(3), [], "regress") == {}
    with pytest.raises(ValueError, match=r"task must be one of \('classify', 'regress'\); got "
                                         r"task='regression'"):
        fit_metrics(stub, row_ids(3), np.zeros(3), [0], "regression")
    with pytest.raises(ValueError, match=r"rows must be positions in \[0, 3\); got 5"):
        fit_metrics(stub, row_ids(3), np.zeros(3), [0, 5], "regress")
    with pytest.raises(ValueError, match="one entry per row \\(3\\); got 2"):
        fit_metrics(stub, row_ids(3), np.zeros(3), [True, False], "regress")


def test_confusion_counts_worked_example():
    # true a, b, b, c; predicted a, a, b, b -> row a: [1 0 0], row b: [1 1 0], row c: [0 1 0]
    counts = confusion_counts(np.array(["a", "b", "b", "c"]), np.array(["a", "a", "b", "b"]),
                              ["a", "b", "c"])
    assert counts.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    assert counts.sum() == 4
    with pytest.raises(ValueError, match=r"label 'd' is not one of the classes \['a', 'b'\]"):
        confusion_counts(np.array(["a", "d"]), np.array(["a", "a"]), ["a", "b"])

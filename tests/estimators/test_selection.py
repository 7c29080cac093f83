"""How the estimators choose the number of experts and the prior, as plain functions, and the
fitted attributes that record the choice."""

import math

import numpy as np
import pytest
from sklearn.datasets import load_iris

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.estimators._selection import (
    bic,
    holdout_split,
    precision_candidates,
    select_n_experts,
    select_precision,
    size_candidates,
)


def test_bic_worked_example():
    # -2 * (-50) + 4 * log(20) = 100 + 11.983
    assert bic(-50.0, 4, 20) == pytest.approx(100 + 4 * math.log(20))


def test_select_n_experts_keeps_the_lowest_score_and_its_fit():
    fitted = []

    def fit(n):
        fitted.append(n)
        return f"model {n}", {"n": n}

    chosen, curve, best = select_n_experts([1, 2, 4], fit, lambda f: abs(f[1]["n"] - 2), "bic")
    assert fitted == [1, 2, 4] and chosen == 2 and best == ("model 2", {"n": 2})
    assert curve == {"n_experts": [1, 2, 4], "bic": [1, 0, 2]}


def test_select_precision_scores_every_candidate_on_the_held_out_rows():
    losses = {2.0: np.array([1.0, 1.0, 1.0, 1.0]), 0.5: np.array([0.0, 0.1, 0.0, 0.1])}
    chosen, curve = select_precision([2.0, 0.5], lambda c: c, lambda model: losses[model])
    assert chosen == 0.5  # lower by far more than one SE
    assert curve["alpha_candidates"] == [2.0, 0.5] and curve["val_loss"] == [1.0, 0.05]


def test_holdout_split_is_stratified_when_every_class_has_two_rows():
    labels = np.array([0] * 10 + [1] * 10)
    train, val = holdout_split(20, 0.2, 0, labels)
    assert sorted(np.r_[train, val]) == list(range(20))
    assert np.bincount(labels[val]).tolist() == [2, 2]


@pytest.mark.parametrize("bad", [(), (1.0, 0.0), ("x",), None])
def test_bad_precision_candidates_name_the_parameter(bad):
    with pytest.raises(ValueError, match=r"Owner: alpha_candidates must be positive numbers"):
        precision_candidates("Owner", bad)


def test_size_candidates_are_sorted_and_positive():
    assert size_candidates("Owner", (4, 1, 4, 2)) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"Owner: auto_candidates must be positive integers"):
        size_candidates("Owner", (0, 2))


def test_the_chosen_precision_is_a_fitted_attribute():
    X, y = load_iris(return_X_y=True)
    auto = MixtureOfExpertsClassifier(n_experts=2, max_epochs=10, random_state=0).fit(X, y)
    n_train = len(y) - 15  # 10 % held out to stop by
    assert auto.alpha_precision_ in (2.0, 0.5) and auto.alpha_ == auto.alpha_precision_ / n_train
    fixed = MixtureOfExpertsClassifier(n_experts=2, max_epochs=10, alpha=0.01,
                                       random_state=0).fit(X, y)
    assert fixed.alpha_precision_ is None and fixed.alpha_ == 0.01


def test_a_stream_records_the_first_candidate_as_its_precision():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2))
    reg = MixtureOfExpertsRegressor(n_experts=2, alpha_candidates=(3.0, 1.0))
    reg.partial_fit(X, X[:, 0])
    assert reg.alpha_precision_ == 3.0 and reg.alpha_ == 3.0 / 30


def test_search_n_experts_stops_after_two_sizes_that_do_not_help_and_prefers_fewer():
    from moekit.estimators._selection import search_n_experts

    base = 0.5 + np.random.default_rng(0).normal(0, 0.1, 200)
    wobble = np.tile([0.05, -0.05], 100)  # paired differences with SE 0.0035
    loss = {1: base + 1.5, 2: base + 0.5, 3: base, 4: base - 0.001 + wobble, 6: base - wobble,
            8: base - 0.4}
    fitted = []
    chosen, curve, fit = search_n_experts([1, 2, 3, 4, 6, 8], lambda n: fitted.append(n) or n,
                                          lambda n: loss[n])
    # 4 is lower by far less than one SE of the paired difference: no better; 4 and 6 did not help,
    # so 8 (which would have) is never fitted: the rule is a search, and it says so
    assert fitted == [1, 2, 3, 4, 6] and curve["not_fitted"] == [8]
    assert chosen == fit == 3 and curve["n_experts"] == [1, 2, 3, 4, 6]
    assert np.allclose(curve["val_loss"], [loss[n].mean() for n in fitted])


def test_search_n_experts_never_picks_a_diverged_fit():
    from moekit.estimators._selection import search_n_experts

    loss = {1: np.full(10, 1.0), 2: np.full(10, np.nan), 3: np.full(10, 0.5)}
    chosen, _, _ = search_n_experts([1, 2, 3], lambda n: n, lambda n: loss[n])
    assert chosen == 3

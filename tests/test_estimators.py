"""The scikit-learn estimators: what they learn, their attributes, and their use in sklearn tools."""

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import load_iris, make_regression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.experts import LinearExperts, MLPExperts


@pytest.fixture(scope="module")
def iris():
    return load_iris(return_X_y=True)


def piecewise(n=300, seed=0):
    """y = 2x on x < 0 and -3x on x >= 0: two linear experts fit it exactly."""
    x = np.random.default_rng(seed).uniform(-1, 1, n)
    return x.reshape(-1, 1), np.where(x < 0, 2 * x, -3 * x)


def test_classifier_learns_iris_and_exposes_the_mixture(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts=3, max_epochs=200, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.95
    assert clf.classes_.tolist() == [0, 1, 2] and clf.n_features_in_ == 4
    proba_NC = clf.predict_proba(X)
    gate_NE = clf.gate_proba(X)
    experts_NEC = clf.predict_experts(X)
    assert experts_NEC.shape == (150, 3, 3)
    np.testing.assert_allclose(gate_NE.sum(1), 1.0)
    np.testing.assert_allclose(proba_NC.sum(1), 1.0)
    # the output is the gate-weighted mixture of the experts' distributions
    np.testing.assert_allclose(proba_NC, np.einsum("ne,nec->nc", gate_NE, experts_NEC))
    assert clf.n_iter_ == len(clf.history_) and "train_loss" in clf.history_[-1]


def test_string_labels_and_feature_names_come_back(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    frame = pd.DataFrame(X, columns=["sl", "sw", "pl", "pw"])
    clf = MixtureOfExpertsClassifier(n_experts=2, max_epochs=50, random_state=0).fit(frame, names)
    assert clf.feature_names_in_.tolist() == ["sl", "sw", "pl", "pw"]
    assert set(clf.predict(frame)) <= set(names)
    assert clf.predict_proba(frame).shape == (150, 3)


def test_regressor_splits_a_two_piece_line():
    X, y = piecewise()
    reg = MixtureOfExpertsRegressor(n_experts=2, expert="linear", lr=0.05, max_epochs=600,
                                    alpha=0.0, random_state=0).fit(X, y)
    assert reg.score(X, y) > 0.99
    # each side of the break is taken by one expert
    gate_NE = reg.gate_proba(X)
    left, right = gate_NE[X[:, 0] < -0.2].mean(0), gate_NE[X[:, 0] > 0.2].mean(0)
    assert left.argmax() != right.argmax() and left.max() > 0.9 and right.max() > 0.9
    assert reg.predict_experts(X).shape == (300, 2)


def test_regressor_multi_output_shapes():
    X, y = make_regression(80, 3, n_targets=2, random_state=0)
    reg = MixtureOfExpertsRegressor(n_experts=2, max_epochs=30, random_state=0).fit(X, y)
    assert reg.predict(X).shape == (80, 2) and reg.predict_experts(X).shape == (80, 2, 2)


def test_same_random_state_same_model_and_clone_is_unfitted(iris):
    X, y = iris
    a = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, random_state=3).fit(X, y)
    b = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, random_state=3).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    c = clone(a)
    assert c.get_params() == a.get_params() and not hasattr(c, "model_")


def test_pipeline_grid_search_and_cross_validation(iris):
    X, y = iris
    pipe = make_pipeline(StandardScaler(), MixtureOfExpertsClassifier(max_epochs=40, random_state=0))
    search = GridSearchCV(pipe, {"mixtureofexpertsclassifier__n_experts": [1, 2]}, cv=3).fit(X, y)
    assert search.best_params_["mixtureofexpertsclassifier__n_experts"] in (1, 2)
    scores = cross_val_score(MixtureOfExpertsClassifier(n_experts=2, max_epochs=40, random_state=0),
                             X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.6


def test_partial_fit_continues_and_needs_classes_first(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts=2, random_state=0)
    with pytest.raises(ValueError, match="first call to partial_fit needs classes"):
        clf.partial_fit(X, y)
    with pytest.raises(ValueError, match=r"classes \[2\] that are not in classes=\[0, 1\]"):
        MixtureOfExpertsClassifier(n_experts=2).partial_fit(X, y, classes=[0, 1])
    clf = MixtureOfExpertsClassifier(n_experts=2, random_state=0)
    losses = []
    for _ in range(20):
        clf.partial_fit(X, y, classes=[0, 1, 2])
        losses.append(clf.history_[-1]["train_loss"])
    assert clf.n_iter_ == 20 and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="X has 3 features"):
        clf.partial_fit(X[:, :3], y)


def test_partial_fit_rejects_auto(iris):
    X, y = iris
    with pytest.raises(ValueError, match="n_experts='auto'"):
        MixtureOfExpertsClassifier(n_experts="auto").partial_fit(X, y, classes=[0, 1, 2])


def test_auto_picks_by_bic_and_keeps_the_curve():
    X, y = piecewise(200)
    # linear experts: one MLP expert could bend to both pieces
    reg = MixtureOfExpertsRegressor(n_experts="auto", expert="linear", lr=0.05,
                                    auto_candidates=(1, 2, 4), max_epochs=300,
                                    random_state=0).fit(X, y)
    curve = reg.n_experts_curve_
    assert curve["n_experts"] == [1, 2, 4] and len(curve["bic"]) == 3
    assert reg.n_experts_ == curve["n_experts"][int(np.argmin(curve["bic"]))]
    assert reg.n_experts_ >= 2  # one line cannot fit a two-piece line
    assert reg.gate_proba(X).shape == (200, reg.n_experts_)


def test_auto_by_validation_loss(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts="auto", auto_candidates=(1, 2), auto_criterion="validation",
                                     max_epochs=30, random_state=0).fit(X, y)
    assert set(clf.n_experts_curve_) == {"n_experts", "validation"}


def test_early_stopping_keeps_the_best_validation_epoch(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts=2, early_stopping=True, max_epochs=60,
                                     random_state=0).fit(X, y)
    val = clf.history_[:, "val_loss"]
    assert "val_loss" in clf.history_[-1] and len(val) == clf.n_iter_
    assert min(val) <= val[-1]


@pytest.mark.parametrize("params, match", [
    ({"n_experts": 0}, "n_experts"),
    ({"expert": "tree"}, "expert"),
    ({"loss": "mse"}, "loss"),
    ({"solver": "sgd"}, "solver"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_parameters_raise_in_fit_naming_the_parameter(iris, params, match):
    X, y = iris
    est = MixtureOfExpertsClassifier(**params)  # __init__ only stores
    with pytest.raises(InvalidParameterError, match=match):
        est.fit(X, y)


def test_one_class_and_too_few_rows_are_refused(iris):
    X, y = iris
    with pytest.raises(ValueError, match="one class only"):
        MixtureOfExpertsClassifier().fit(X[:10], y[:10])
    with pytest.raises(ValueError, match="n_experts=8 needs at least 8 rows; got n_samples=5"):
        MixtureOfExpertsRegressor(n_experts=8).fit(X[:5], X[:5, 0])


@pytest.mark.parametrize("solver", ["gd", "lbfgs"])
@pytest.mark.parametrize("loss", ["competitive", "cooperative"])
def test_every_solver_and_paper_loss_trains(iris, solver, loss):
    X, y = iris
    lr = 1.0 if solver == "lbfgs" else 0.5
    clf = MixtureOfExpertsClassifier(n_experts=2, solver=solver, loss=loss, lr=lr, max_epochs=60,
                                     random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.8


def test_import_moekit_does_not_import_sklearn_until_an_estimator_is_asked_for():
    import subprocess
    import sys

    code = ("import sys, moekit; assert 'sklearn' not in sys.modules; "
            "assert moekit.MixtureOfExpertsRegressor.__name__ == 'MixtureOfExpertsRegressor'; "
            "assert 'sklearn' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("gate", ["softmax", "gaussian"])
def test_em_solver_fits_in_few_iterations_with_a_monotone_likelihood(iris, gate):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts=3, solver="em", gate=gate, max_epochs=60,
                                     random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.95 and clf.n_iter_ <= 60
    log_lik = clf.history_[:, "log_likelihood"]
    assert all(b >= a - 1e-12 for a, b in zip(log_lik, log_lik[1:]))
    Xr, yr = piecewise()
    reg = MixtureOfExpertsRegressor(n_experts=2, solver="em", gate=gate, random_state=0).fit(Xr, yr)
    assert reg.score(Xr, yr) > 0.99 and reg.expert_variance_.shape == (2,)


def test_em_round_trips_through_a_model_folder(tmp_path):
    from moekit.estimator_io import load_estimator, save_estimator

    X, y = piecewise()
    reg = MixtureOfExpertsRegressor(n_experts=2, solver="em", gate="gaussian", random_state=0).fit(X, y)
    again = load_estimator(save_estimator(reg, tmp_path / "m"))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    np.testing.assert_array_equal(again.expert_variance_, reg.expert_variance_)


@pytest.mark.parametrize("params, match", [
    ({"gate": "gaussian"}, "gate='gaussian' .* is fitted by EM; got solver='adam'. Pass solver='em'"),
    ({"solver": "em", "expert": "mlp"}, "solver='em' needs expert='linear'; got expert='mlp'"),
    ({"solver": "em", "loss": "competitive"}, "solver='em' needs loss='nll'; got loss='competitive'"),
    ({"solver": "em", "early_stopping": True}, "solver='em' needs early_stopping=False"),
])
def test_em_refuses_what_it_cannot_honour(iris, params, match):
    X, y = iris
    with pytest.raises(ValueError, match=match):
        MixtureOfExpertsClassifier(**params).fit(X, y)


def test_em_partial_fit_takes_one_em_iteration_per_call(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts=2, solver="em", random_state=0)
    for _ in range(4):
        clf.partial_fit(X, y, classes=[0, 1, 2])
    log_lik = clf.history_[:, "log_likelihood"]
    assert clf.n_iter_ == 4 and log_lik[-1] > log_lik[0]


def test_auto_reuses_the_chosen_candidate_instead_of_fitting_it_again(monkeypatch):
    X, y = piecewise(100)
    reg = MixtureOfExpertsRegressor(n_experts="auto", auto_candidates=(1, 2), max_epochs=20,
                                    random_state=0)
    calls = []
    original = type(reg)._train
    monkeypatch.setattr(type(reg), "_train",
                        lambda self, *a, **k: calls.append(a[2]) or original(self, *a, **k))
    reg.fit(X, y)
    assert calls == [1, 2]  # one fit per candidate, none repeated


def test_empty_auto_candidates_get_the_friendly_message(iris):
    X, y = iris
    with pytest.raises(ValueError, match="auto_candidates must be positive integers"):
        MixtureOfExpertsClassifier(n_experts="auto", auto_candidates=()).fit(X, y)


def test_refit_by_gradient_drops_the_em_variances():
    X, y = piecewise(100)
    reg = MixtureOfExpertsRegressor(n_experts=2, solver="em", random_state=0).fit(X, y)
    assert hasattr(reg, "expert_variance_")
    reg.set_params(solver="adam", max_epochs=5).fit(X, y)
    assert not hasattr(reg, "expert_variance_")


def test_auto_alpha_is_two_over_the_training_rows_and_auto_expert_follows_the_solver(iris):
    X, y = iris
    auto = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, random_state=0).fit(X, y)
    fixed = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, alpha=2 / len(y),
                                       random_state=0).fit(X, y)
    np.testing.assert_array_equal(auto.predict_proba(X), fixed.predict_proba(X))
    other = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, alpha=0.5,
                                       random_state=0).fit(X, y)
    assert not np.allclose(auto.predict_proba(X), other.predict_proba(X))
    assert isinstance(auto.model_.experts, MLPExperts)
    em = MixtureOfExpertsClassifier(n_experts=2, solver="em", max_epochs=5, random_state=0)
    assert isinstance(em.fit(X, y).model_.experts, LinearExperts)

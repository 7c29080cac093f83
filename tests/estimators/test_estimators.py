"""The scikit-learn estimators: what they learn, their attributes, and their use in sklearn
tools."""

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_iris, make_regression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor
from moekit.nn.experts import LinearExperts, MLPExperts


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
    pipe = make_pipeline(StandardScaler(),
                         MixtureOfExpertsClassifier(max_epochs=40, random_state=0))
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
                                    auto_candidates=(1, 2, 4), auto_criterion="bic",
                                    max_epochs=300, random_state=0).fit(X, y)
    curve = reg.n_experts_curve_
    assert curve["n_experts"] == [1, 2, 4] and len(curve["bic"]) == 3
    assert reg.n_experts_ == curve["n_experts"][int(np.argmin(curve["bic"]))]
    assert reg.n_experts_ >= 2  # one line cannot fit a two-piece line
    assert reg.gate_proba(X).shape == (200, reg.n_experts_)


def test_auto_by_validation_loss(iris):
    X, y = iris
    clf = MixtureOfExpertsClassifier(n_experts="auto", auto_candidates=(1, 2),
                                     auto_criterion="validation", max_epochs=30,
                                     random_state=0).fit(X, y)
    assert set(clf.n_experts_curve_) == {"n_experts", "val_loss", "val_loss_se", "not_fitted"}


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
    ({"expert_activation": "softplus"}, "expert_activation"),
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
    assert all(b >= a - 1e-12 for a, b in pairwise(log_lik))
    Xr, yr = piecewise()
    reg = MixtureOfExpertsRegressor(n_experts=2, solver="em", gate=gate, random_state=0).fit(Xr, yr)
    assert reg.score(Xr, yr) > 0.99 and reg.expert_variance_.shape == (2,)


def test_em_round_trips_through_a_model_folder(tmp_path):
    from moekit.estimators.persistence import load_estimator, save_estimator

    X, y = piecewise()
    reg = MixtureOfExpertsRegressor(n_experts=2, solver="em", gate="gaussian",
                                    random_state=0).fit(X, y)
    again = load_estimator(save_estimator(reg, tmp_path / "m"))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    np.testing.assert_array_equal(again.expert_variance_, reg.expert_variance_)


@pytest.mark.parametrize("params, match", [
    ({"gate": "gaussian"},
     "gate='gaussian' .* is fitted by EM; got solver='adam'. Pass solver='em'"),
    ({"solver": "em", "expert": "mlp"}, "solver='em' needs expert='linear'; got expert='mlp'"),
    ({"solver": "em", "loss": "competitive"},
     "solver='em' needs loss='nll'; got loss='competitive'"),
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
                                    alpha_candidates=(2.0,), random_state=0)
    from moekit.estimators._stages import StageFitter

    calls = []
    original = StageFitter.fit
    monkeypatch.setattr(StageFitter, "fit",
                        lambda self, n, *a, **k: calls.append(n) or original(self, n, *a, **k))
    reg.fit(X, y)
    assert calls == [1, 2]  # one fit per candidate, none repeated
    calls.clear()
    reg.set_params(alpha_candidates=(2.0, 0.5)).fit(X, y)
    # sizes by the first precision, then the second precision warm-started at the chosen size;
    # held-out rows stop every stage, so the chosen one is kept: no refit
    assert calls == [1, 2, reg.n_experts_]
    calls.clear()
    reg.set_params(early_stopping=False, auto_criterion="bic").fit(X, y)
    # without held-out rows: sizes on every row, both precisions on a hold-out, and the refit
    # on every row only when the other precision won
    n, kept = reg.n_experts_, reg.alpha_ == 2.0 / len(y)
    assert calls == [1, 2, n, n] + ([] if kept else [n])


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


def test_auto_alpha_with_one_candidate_is_c_over_the_rows_and_auto_expert_follows_the_solver(
        iris):
    X, y = iris
    auto = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, alpha_candidates=(2.0,),
                                      random_state=0).fit(X, y)
    held_out = 15  # validation_fraction=0.1 of 150 rows stop the fit early: c / training rows
    assert auto.alpha_ == 2 / (len(y) - held_out) and auto.alpha_curve_ is None
    fixed = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, alpha=auto.alpha_,
                                       random_state=0).fit(X, y)
    np.testing.assert_array_equal(auto.predict_proba(X), fixed.predict_proba(X))
    other = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, alpha=0.5,
                                       random_state=0).fit(X, y)
    assert not np.allclose(auto.predict_proba(X), other.predict_proba(X))
    assert isinstance(auto.model_.experts, MLPExperts)
    em = MixtureOfExpertsClassifier(n_experts=2, solver="em", max_epochs=5, random_state=0)
    assert isinstance(em.fit(X, y).model_.experts, LinearExperts)


def test_expert_activation_reaches_the_experts_and_survives_a_reload(iris, tmp_path):
    from moekit.estimators.persistence import load_estimator, save_estimator

    X, y = iris
    tanh = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, random_state=0).fit(X, y)
    relu = clone(tanh).set_params(expert_activation="relu").fit(X, y)
    assert (tanh.model_.experts.activation, relu.model_.experts.activation) == ("tanh", "relu")
    assert not np.allclose(tanh.predict_proba(X), relu.predict_proba(X))
    save_estimator(relu, tmp_path / "relu")
    again = load_estimator(tmp_path / "relu")
    assert again.get_params()["expert_activation"] == "relu"
    np.testing.assert_array_equal(again.predict_proba(X), relu.predict_proba(X))


def test_auto_alpha_keeps_the_precision_with_the_lowest_held_out_loss_and_refits_on_all_rows(
        iris):
    X, y = iris
    params = {"n_experts": 2, "max_epochs": 40, "random_state": 0, "early_stopping": False}
    auto = MixtureOfExpertsClassifier(alpha_candidates=(50.0, 0.5), **params).fit(X, y)
    curve = auto.alpha_curve_
    assert curve["alpha_candidates"] == [50.0, 0.5] and len(curve["val_loss"]) == 2
    chosen = curve["alpha_candidates"][int(np.argmin(curve["val_loss"]))]
    assert auto.alpha_ == chosen / len(y)
    fixed = MixtureOfExpertsClassifier(alpha=chosen / len(y), **params).fit(X, y)
    np.testing.assert_array_equal(auto.predict_proba(X), fixed.predict_proba(X))


def test_auto_alpha_scores_each_candidate_on_the_same_held_out_rows(iris, monkeypatch):
    """Each candidate is fitted on the same 90 % of the rows, stopped by the other 10 % and
    scored by its held-out log-loss there; the weaker prior starts from the stronger's weights."""
    import copy

    import moekit.estimators._stages as stages
    from moekit.estimators._selection import one_standard_error_choice

    X, y = iris
    fitted, scored = [], []
    original_fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda model, x, t, config, **k: fitted.append(
        (x.clone(), config.weight_decay, copy.deepcopy(model))) or original_fit(
            model, x, t, config, **k))
    original_score = MixtureOfExpertsClassifier._row_losses
    monkeypatch.setattr(MixtureOfExpertsClassifier, "_row_losses",
                        lambda self, model, x, t: scored.append(
                            (copy.deepcopy(model), x.clone(), t))
                        or original_score(self, model, x, t))
    auto = MixtureOfExpertsClassifier(n_experts=2, max_epochs=10, random_state=0).fit(X, y)
    x_ND = torch.tensor(auto.scaler_.transform(X), dtype=torch.float32)
    (train_a, decay_a, _), (train_b, decay_b, start_b) = fitted[:2]
    (model_a, val_a, t_a), (model_b, val_b, _) = scored
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b) and len(val_a) == 15
    together = torch.cat([train_a, val_a]).numpy()  # disjoint, and together every row
    assert sorted(map(tuple, together)) == sorted(map(tuple, x_ND.numpy()))
    assert (decay_a, decay_b) == (2.0 / len(train_a), 0.5 / len(train_a))
    for name, value in start_b.state_dict().items():  # the warm start: where the first ended
        assert torch.equal(value, model_a.state_dict()[name])
    with torch.no_grad():  # the curve holds each candidate's held-out log-loss
        proba = [m(val_a).output[torch.arange(15), torch.as_tensor(t_a)]
                 for m in (model_a, model_b)]
    expected = [float(-p.log().mean()) for p in proba]
    np.testing.assert_allclose(auto.alpha_curve_["val_loss"], expected, rtol=1e-12)
    rows_losses = np.stack([-p.log().numpy() for p in proba])  # the choice follows the 1-SE rule
    assert auto.alpha_ == [2.0, 0.5][one_standard_error_choice(rows_losses, [2.0, 0.5])[0]] / 135


def test_a_regressor_chooses_alpha_by_the_held_out_error_of_its_prediction(monkeypatch):
    """Not by the mixture density, which rewards any expert near the target: the curve is the
    held-out mean squared error of the mixture's mean prediction."""
    import copy

    X, y = piecewise(200)
    scored = []
    original = MixtureOfExpertsRegressor._row_losses
    monkeypatch.setattr(MixtureOfExpertsRegressor, "_row_losses",
                        lambda self, model, x, t: scored.append((copy.deepcopy(model), x, t))
                        or original(self, model, x, t))
    reg = MixtureOfExpertsRegressor(n_experts=2, max_epochs=20, random_state=0).fit(X, y)
    expected = []
    for model, x, t in scored:
        with torch.no_grad():
            out = model(x).output.double()
            expected.append(float((out - torch.as_tensor(t)).square().mean()))
    np.testing.assert_allclose(reg.alpha_curve_["val_loss"], expected, rtol=1e-12)


def test_auto_alpha_uses_the_first_candidate_below_twenty_rows_and_in_partial_fit(iris):
    X, y = iris
    rows = np.r_[0:6, 50:56, 100:106]  # 18 rows
    few = MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, random_state=0).fit(X[rows],
                                                                                    y[rows])
    assert few.alpha_ == 2.0 / 18 and few.alpha_curve_ is None
    stream = MixtureOfExpertsClassifier(n_experts=2, random_state=0)
    stream.partial_fit(X, y, classes=[0, 1, 2])
    assert stream.alpha_ == 2.0 / len(y) and stream.alpha_curve_ is None


@pytest.mark.parametrize("candidates", [(), (2.0, -1.0), (0.0,), ("strong",), (float("nan"),)])
def test_bad_alpha_candidates_are_refused_before_any_fit(iris, candidates, monkeypatch):
    import moekit.estimators._stages as stages

    def no_fit(*args, **kwargs):
        raise AssertionError("a fit ran before alpha_candidates was checked")

    monkeypatch.setattr(stages, "fit", no_fit)
    X, y = iris
    with pytest.raises(ValueError, match=r"alpha_candidates must be positive numbers.*got "
                                         r"alpha_candidates="):
        MixtureOfExpertsClassifier(alpha_candidates=candidates).fit(X, y)


@pytest.mark.parametrize("losses, chosen", [
    ([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], 1),  # the weak prior is surely better
    ([[1.0, 0.0, 1.0, 0.0], [0.9, 0.1, 0.8, 0.0]], 0),  # 0.05 lower, SE 0.065: keep the strong one
    ([[0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.6]], 0),  # the strong prior is the lowest
    ([[np.nan, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]], 1),  # a diverged fit never wins
    ([[np.nan] * 4, [np.inf] * 4], 0),  # all diverged: the first
])
def test_one_standard_error_rule_keeps_the_strongest_prior_within_noise(losses, chosen):
    from moekit.estimators._selection import one_standard_error_choice

    index, mean, se = one_standard_error_choice(np.array(losses), [2.0, 0.5])
    assert index == chosen and mean.shape == se.shape == (2,)


def test_a_reloaded_estimator_keeps_the_chosen_alpha_for_partial_fit(iris, tmp_path,
                                                                     monkeypatch):
    import moekit.estimators._plan as plan
    from moekit.estimators.persistence import load_estimator, save_estimator

    X, y = iris
    rule = plan.one_standard_error_choice  # force the choice the lowest loss would not make
    monkeypatch.setattr(plan, "one_standard_error_choice",
                        lambda losses, strengths: (0, *rule(losses, strengths)[1:]))
    fitted = MixtureOfExpertsClassifier(n_experts=2, max_epochs=40, alpha_candidates=(50.0, 0.5),
                                        random_state=0).fit(X, y)
    curve = fitted.alpha_curve_
    n_train = len(y) - 15  # 10 % held out to stop by
    assert curve["val_loss"][1] < curve["val_loss"][0] and fitted.alpha_ == 50.0 / n_train
    save_estimator(fitted, tmp_path / "model")
    again = load_estimator(tmp_path / "model")
    assert (again.alpha_, again.alpha_curve_) == (fitted.alpha_, fitted.alpha_curve_)
    assert again.alpha_precision_ == fitted.alpha_precision_ == 50.0
    assert again._alpha(n_train, again._fitted_precision()) == fitted.alpha_  # partial_fit uses it

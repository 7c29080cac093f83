"""The estimators' fast default path: float32 training whose predictions agree with float64,
minibatches that reach the full-batch optimum, 'auto' settings that say why, n_experts='auto' that
finds the pieces of a task, and Ctrl-C that keeps the best model so far."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine

import moekit.fitting.gradient as gradient
from moekit.estimators._settings import BATCH_INDEPENDENCE_TOL, BATCH_ROWS, resolve
from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor

BUNDLED = {"iris": load_iris, "wine": load_wine, "breast_cancer": load_breast_cancer,
           "digits": load_digits, "diabetes": load_diabetes}


def _quiet_fit(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(X, y)


@pytest.mark.parametrize("name", list(BUNDLED))
def test_float32_training_predicts_as_float64_on_the_bundled_sets(name):
    """The weights a float32 fit found predict in float32 as in float64 to
    BATCH_INDEPENDENCE_TOL (1e-5) in every probability (or standardised prediction); the fitted
    model itself is kept in float64."""
    X, y = BUNDLED[name](return_X_y=True)
    cls = MixtureOfExpertsRegressor if name == "diabetes" else MixtureOfExpertsClassifier
    est = _quiet_fit(cls(max_epochs=30, random_state=0), X, y)
    assert {c["setting"]: c["value"] for c in est.choices_}["dtype"] == "float32"
    assert next(est.model_.parameters()).dtype == torch.float64
    x_ND = est._to_tensor(X)
    with torch.no_grad():
        out64 = est.model_(x_ND).output
        out32 = est.model_.float()(x_ND.float()).output.double()
    est.model_.double()
    assert (out32 - out64).abs().max().item() < BATCH_INDEPENDENCE_TOL


def test_a_rows_prediction_does_not_depend_on_its_batch():
    X, y = load_wine(return_X_y=True)
    clf = _quiet_fit(MixtureOfExpertsClassifier(max_epochs=20, random_state=0), X, y)
    together = clf.predict_proba(X)
    alone = np.concatenate([clf.predict_proba(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-12)


def test_float32_and_float64_fits_reach_the_same_held_out_score():
    X, y = load_breast_cancer(return_X_y=True)
    scores = {}
    for dtype in ("float32", "float64"):
        est = _quiet_fit(MixtureOfExpertsClassifier(dtype=dtype, random_state=0), X[:400],
                         y[:400])
        scores[dtype] = est.score(X[400:], y[400:])
    assert abs(scores["float32"] - scores["float64"]) <= 0.02, scores


def test_minibatches_and_full_batch_reach_the_same_optimum_on_a_convex_problem():
    """One linear expert with a fixed ridge is least squares: convex, one optimum. Minibatch
    Adam and full-batch L-BFGS find the same predictions."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(0, 0.3, 3000)
    common = {"n_experts": 1, "expert": "linear", "alpha": 1e-3, "early_stopping": False,
              "alpha_candidates": (2.0,), "random_state": 0, "dtype": "float64"}
    full = _quiet_fit(MixtureOfExpertsRegressor(**common, solver="lbfgs", lr=1.0,
                                                max_epochs=200, tol=1e-12), X, y)
    mini = _quiet_fit(MixtureOfExpertsRegressor(**common, solver="gd", lr=0.01,
                                                batch_size=64, max_epochs=60, tol=0.0,
                                                n_iter_no_change=1000), X, y)
    assert mini.choices_[1]["value"] == 64 and full.choices_[1]["value"] == "all rows"
    scale = y.std()
    np.testing.assert_allclose(mini.predict(X), full.predict(X), atol=0.01 * scale)


def test_auto_finds_the_number_of_pieces():
    """Three linear pieces of a line (jumps between them), linear experts: 'auto' picks 3."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, 1500)
    y = np.select([x < -0.5, x < 0.5], [2 * x + 3, -x], 3 * x - 3) + rng.normal(0, 0.1, 1500)
    reg = _quiet_fit(MixtureOfExpertsRegressor(n_experts="auto", expert="linear",
                                               random_state=0), x.reshape(-1, 1), y)
    assert reg.n_experts_ == 3, reg.n_experts_curve_
    choice = next(c for c in reg.choices_ if c["setting"] == "n_experts")
    assert choice["value"] == 3 and "one standard error" in choice["why"]


def test_auto_settings_follow_the_data_size_and_the_solver():
    params = MixtureOfExpertsClassifier().get_params()
    small = resolve(params, BATCH_ROWS)
    big = resolve(params, BATCH_ROWS + 1)
    assert (small.batch_size, big.batch_size) == (None, 256)
    assert small.dtype == torch.float32 and small.early_stopping and small.criterion == "validation"
    em = resolve({**params, "solver": "em"}, 10_000)
    assert (em.dtype, em.batch_size, em.early_stopping, em.criterion) == (
        torch.float64, None, False, "bic")
    assert not resolve(params, 30).early_stopping  # too few rows to hold some out


def test_ctrl_c_keeps_the_best_model_so_far_and_runs_no_further_stage(interrupt_at):
    X, y = load_iris(return_X_y=True)
    epochs = interrupt_at(12)
    clf = MixtureOfExpertsClassifier(n_experts="auto", random_state=0)
    with pytest.warns(UserWarning, match="interrupted"):
        clf.fit(X, y)
    assert clf.interrupted_ and clf.stop_reason_ == "interrupted"
    assert len(epochs) == 12  # the interrupted stage was the last
    assert clf.n_iter_ == 11 and clf.score(X, y) > 0.5
    kept = int(np.argmin(clf.history_[:, "val_loss"]))  # KeepBest restored the best epoch
    proba = clf.predict_proba(X)
    assert np.isfinite(proba).all() and kept < 11


def test_ctrl_c_before_the_first_epoch_ends_stops_the_fit(monkeypatch):
    X, y = load_iris(return_X_y=True)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradient, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MixtureOfExpertsClassifier(n_experts=2, random_state=0).fit(X, y)


def test_the_fit_leaves_the_callers_thread_count_alone():
    X, y = load_iris(return_X_y=True)
    before = torch.get_num_threads()
    clf = _quiet_fit(MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, random_state=0), X, y)
    assert torch.get_num_threads() == before and clf.threads_ == 1  # a small step: one thread
    clf = _quiet_fit(MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, threads=2,
                                                random_state=0), X, y)
    assert clf.threads_ == 2 and torch.get_num_threads() == before
    why = next(c for c in clf.choices_ if c["setting"] == "threads")["why"]
    assert "caller" in why


def test_choices_survive_a_reload(tmp_path):
    from moekit.estimators.persistence import load_estimator, save_estimator

    X, y = load_iris(return_X_y=True)
    clf = _quiet_fit(MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, random_state=0), X, y)
    save_estimator(clf, tmp_path / "m")
    again = load_estimator(tmp_path / "m")
    assert again.choices_ == clf.choices_ and again.interrupted_ is False


def test_auto_on_a_large_table_fits_candidates_on_a_sample_then_the_choice_on_every_row(
        monkeypatch):
    import moekit.estimators._stages as stages

    monkeypatch.setattr(stages, "SELECTION_ROWS", 400)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, 1500)
    y = np.select([x < -0.5, x < 0.5], [2 * x + 3, -x], 3 * x - 3) + rng.normal(0, 0.1, 1500)
    rows_seen = []
    original = stages.fit
    monkeypatch.setattr(stages, "fit", lambda model, x_ND, *a, **k: rows_seen.append(
        len(x_ND)) or original(model, x_ND, *a, **k))
    reg = _quiet_fit(MixtureOfExpertsRegressor(n_experts="auto", expert="linear",
                                               alpha_candidates=(2.0,), random_state=0),
                     x.reshape(-1, 1), y)
    n_train = 1500 - 150
    assert rows_seen[:-1] == [400] * (len(rows_seen) - 1) and rows_seen[-1] == n_train
    assert reg.n_experts_ >= 3  # the three pieces, at least, from 400 rows
    why = next(c for c in reg.choices_ if c["setting"] == "n_experts")["why"]
    assert f"candidates fitted on 400 of the {n_train:,} training rows" in why

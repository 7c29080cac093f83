"""The estimators' ``checkpoint`` folder: a parameter like any other, one file per stage, a fit
interrupted in any stage ends as an uninterrupted one, a finished stage is read back, not run.
(Kills with SIGKILL and the refusals of another fit's folder are in tests/hostile/test_resume.py.)

Interruptions here are in-process: the epoch (or EM fit) after ``after`` raises, as a kill would
stop the fit there; what was saved before it is what a killed process leaves.
"""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone

import moekit.estimators._resume as resume_module
import moekit.fitting.gradient as gradient
from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor


class Interrupted(Exception):
    pass


def _interrupt(monkeypatch, module, name, after):
    """Make ``module.name`` raise on its call number ``after + 1``."""
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def _refuse(monkeypatch, module, name):
    _interrupt(monkeypatch, module, name, after=0)


def _data(n=150, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)


def _fit(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(X, y)


def _assert_same_fit(a, b, X):
    assert a.model_.state_dict().keys() == b.model_.state_dict().keys()
    for name, tensor in a.model_.state_dict().items():
        assert torch.equal(tensor, b.model_.state_dict()[name]), name
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.history_.to_list() == b.history_.to_list()
    assert (a.n_experts_, a.alpha_, a.n_iter_) == (b.n_experts_, b.alpha_, b.n_iter_)


AUTO = {"n_experts": "auto", "auto_candidates": (1, 2), "max_epochs": 30, "random_state": 0}


def test_checkpoint_is_a_parameter_that_clone_keeps(tmp_path):
    est = MixtureOfExpertsClassifier(checkpoint=tmp_path)
    assert est.get_params()["checkpoint"] == tmp_path and clone(est).checkpoint == tmp_path
    assert MixtureOfExpertsRegressor().checkpoint is None


def test_every_stage_has_its_file_and_the_record_names_the_fit(tmp_path):
    X, y = _data()
    _fit(MixtureOfExpertsClassifier(**AUTO, checkpoint=tmp_path / "new" / "ck"), X, y)
    folder = tmp_path / "new" / "ck"  # created, parents included
    names = sorted(p.name for p in folder.iterdir())
    # held-out rows stop every stage: the sizes, then the weaker prior warm-started from the
    # chosen size (named by the digest of the weights it starts from), and no refit
    assert names[1:] == ["fit.json", "n_experts_1.pt", "n_experts_2.pt"]
    assert re.fullmatch(r"alpha_0\.5_from_[0-9a-f]{12}\.pt", names[0])
    record = json.loads((folder / "fit.json").read_text())
    assert record["estimator"] == "MixtureOfExpertsClassifier"
    assert record["params"]["auto_candidates"] == [1, 2] and "checkpoint" not in record["params"]


# Up to 30 epochs a stage: sizes 1 and 2, then prior 0.5 warm-started; saved every 10 epochs, so
# some resume from a save and some start their stage again. Interrupted at a share of the epochs.
@pytest.mark.parametrize("share", [0.05, 0.3, 0.55, 0.8, 0.97])
def test_fit_interrupted_in_any_stage_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, share):
    X, y = _data()
    epochs = []
    with monkeypatch.context() as patch:
        original = gradient.train_epoch
        patch.setattr(gradient, "train_epoch", lambda *a: epochs.append(1) or original(*a))
        straight = _fit(MixtureOfExpertsClassifier(**AUTO, early_stopping=True), X, y)
    est = MixtureOfExpertsClassifier(**AUTO, early_stopping=True, checkpoint=tmp_path)
    with monkeypatch.context() as patch:
        _interrupt(patch, gradient, "train_epoch", int(share * len(epochs)))
        with pytest.raises(Interrupted):
            _fit(est, X, y)
    _assert_same_fit(straight, _fit(clone(est), X, y), X)


@pytest.mark.parametrize("solver", ["gd", "lbfgs"])
def test_every_gradient_solver_resumes_bit_identical(tmp_path, monkeypatch, solver):
    X, y = _data()
    params = {"n_experts": 2, "solver": solver, "lr": 0.5 if solver == "gd" else 1.0,
              "max_epochs": 40, "batch_size": 50, "n_iter_no_change": 1000, "random_state": 0}
    straight = _fit(MixtureOfExpertsClassifier(**params), X, y)
    with monkeypatch.context() as patch:
        _interrupt(patch, gradient, "train_epoch", 25)
        with pytest.raises(Interrupted):
            _fit(MixtureOfExpertsClassifier(**params, checkpoint=tmp_path), X, y)
    _assert_same_fit(straight, _fit(MixtureOfExpertsClassifier(**params, checkpoint=tmp_path),
                                    X, y), X)


def test_a_finished_fit_is_read_back_not_run(tmp_path, monkeypatch):
    X, y = _data()
    first = _fit(MixtureOfExpertsClassifier(**AUTO, checkpoint=tmp_path), X, y)
    _refuse(monkeypatch, gradient, "train_epoch")
    again = _fit(MixtureOfExpertsClassifier(**AUTO, checkpoint=tmp_path, verbose=0), X, y)
    _assert_same_fit(first, again, X)


def test_random_state_none_resumes_with_the_seed_it_drew(tmp_path, monkeypatch):
    X, y = _data()
    params = {**AUTO, "random_state": None, "checkpoint": tmp_path}
    first = _fit(MixtureOfExpertsClassifier(**params), X, y)
    _refuse(monkeypatch, gradient, "train_epoch")  # another seed would train again
    _assert_same_fit(first, _fit(MixtureOfExpertsClassifier(**params), X, y), X)


def test_raising_max_epochs_goes_on_from_each_stage(tmp_path):
    X, y = _data()
    params = {**AUTO, "n_iter_no_change": 1000}  # every stage runs to max_epochs
    longer = _fit(MixtureOfExpertsClassifier(**{**params, "max_epochs": 50}), X, y)
    _fit(MixtureOfExpertsClassifier(**params, checkpoint=tmp_path), X, y)
    resumed = _fit(MixtureOfExpertsClassifier(**{**params, "max_epochs": 50},
                                              checkpoint=tmp_path), X, y)
    _assert_same_fit(longer, resumed, X)


EM = {"solver": "em", "n_experts": "auto", "auto_candidates": (1, 2, 3), "max_epochs": 50,
      "random_state": 0}


def test_em_stages_are_read_back_when_finished(tmp_path, monkeypatch):
    X, y = _data()
    first = _fit(MixtureOfExpertsRegressor(**EM, checkpoint=tmp_path), X, y.astype(float))
    _refuse(monkeypatch, resume_module, "fit_em")
    again = _fit(MixtureOfExpertsRegressor(**EM, checkpoint=tmp_path), X, y.astype(float))
    _assert_same_fit_regressor(first, again, X)
    np.testing.assert_array_equal(first.expert_variance_, again.expert_variance_)


def _assert_same_fit_regressor(a, b, X):
    for name, tensor in a.model_.state_dict().items():
        assert torch.equal(tensor, b.model_.state_dict()[name]), name
    assert np.array_equal(a.predict(X), b.predict(X))
    assert a.history_.to_list() == b.history_.to_list()


@pytest.mark.parametrize("after", [1, 3])
def test_em_fit_interrupted_reruns_the_unfinished_stage(tmp_path, monkeypatch, after):
    X, y = _data()
    y = y.astype(float) + X[:, 1]
    straight = _fit(MixtureOfExpertsRegressor(**EM), X, y)
    with monkeypatch.context() as patch:
        _interrupt(patch, resume_module, "fit_em", after)
        with pytest.raises(Interrupted):
            _fit(MixtureOfExpertsRegressor(**EM, checkpoint=tmp_path), X, y)
    assert len(list(tmp_path.glob("n_experts_*.pt"))) == after  # the finished stages only
    resumed = _fit(MixtureOfExpertsRegressor(**EM, checkpoint=tmp_path), X, y)
    _assert_same_fit_regressor(straight, resumed, X)


def test_without_a_checkpoint_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y = _data()
    _fit(MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, random_state=0), X, y)
    assert not list(tmp_path.iterdir())

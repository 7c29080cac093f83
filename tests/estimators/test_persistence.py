"""Fitted estimators saved as moekit model folders and reloaded with identical predictions."""

import json
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris, make_regression

from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.persistence import load_estimator, save_estimator
from moekit.estimators.regressor import MixtureOfExpertsRegressor
from moekit.io.models import save_model
from moekit.nn.dense import MixtureOfExperts


def test_classifier_round_trip(tmp_path):
    X, y = load_iris(return_X_y=True)
    labels = np.array(["a", "b", "c"])[y]
    clf = MixtureOfExpertsClassifier(n_experts=2, max_epochs=20, random_state=0).fit(X, labels)
    again = load_estimator(save_estimator(clf, tmp_path / "m", metadata={"note": "x"}))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(again.predict(X), clf.predict(X))
    assert again.n_iter_ == clf.n_iter_ and again.metadata_ == {"note": "x"}
    again.partial_fit(X, labels)  # a reloaded estimator can keep learning
    assert again.n_iter_ == clf.n_iter_ + 1


def test_regressor_round_trip_multi_output(tmp_path):
    X, y = make_regression(60, 3, n_targets=2, random_state=0)
    reg = MixtureOfExpertsRegressor(n_experts=2, max_epochs=20, random_state=0).fit(X, y)
    again = load_estimator(save_estimator(reg, tmp_path / "m"))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    np.testing.assert_array_equal(again.predict_experts(X), reg.predict_experts(X))


def test_unfitted_or_plain_model_folders_are_refused(tmp_path):
    with pytest.raises(TypeError, match="expected a fitted moekit estimator"):
        save_estimator(MixtureOfExpertsRegressor(), tmp_path / "m")
    save_model(MixtureOfExperts(2, 1, 2), tmp_path / "plain")
    with pytest.raises(ValueError, match="no fitted estimator"):
        load_estimator(tmp_path / "plain")


def _fitted_classifier():
    X, y = load_iris(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return X, MixtureOfExpertsClassifier(n_experts=2, max_epochs=3, alpha=0.0,
                                             random_state=0).fit(X, y)


def test_a_path_parameter_is_saved_as_its_string(tmp_path):
    _, clf = _fitted_classifier()
    clf.set_params(checkpoint=tmp_path / "checkpoints")
    folder = save_estimator(clf, tmp_path / "m")
    record = json.loads((folder / "config.json").read_text())["metadata"]["sklearn"]
    assert record["params"]["checkpoint"] == str(tmp_path / "checkpoints")
    assert load_estimator(folder).checkpoint == str(tmp_path / "checkpoints")


def test_parameters_a_folder_lacks_take_their_defaults(tmp_path):
    X, clf = _fitted_classifier()
    clf.set_params(verbose=1)
    folder = save_estimator(clf, tmp_path / "m")
    header = json.loads((folder / "config.json").read_text())
    params = header["metadata"]["sklearn"]["params"]
    del params["verbose"], params["checkpoint"]  # a folder saved before these parameters existed
    (folder / "config.json").write_text(json.dumps(header))
    again = load_estimator(folder)
    assert again.verbose == 0 and again.checkpoint is None
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))


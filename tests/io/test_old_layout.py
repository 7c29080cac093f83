"""Folders saved by the flat layout (before the package map) load with the current code and give the
outputs they gave then (tests/assets/old_layout/README.md says how they were made)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moekit import load_estimator, load_model

OLD = Path(__file__).parents[1] / "assets" / "old_layout"
MODELS = ["dense_mlp_softmax", "sparse_topk_shared", "sparse_sigmoid_mlp_capacity",
          "sparse_switch_noisy", "sparse_expert_choice", "hierarchical", "localized_full",
          "localized_diag"]


def test_every_saved_model_is_covered():
    saved = {p.name for p in OLD.iterdir() if (p / "model.safetensors").is_file()}
    assert saved == set(MODELS) | {"estimator_classifier", "estimator_regressor"}


@pytest.mark.parametrize("name", MODELS)
def test_an_old_model_folder_loads_with_equal_outputs(name):
    model = load_model(OLD / name)
    expected = load_file(str(OLD / f"{name}.expected.safetensors"))
    assert model.metadata == {"fixture": name}
    with torch.no_grad():
        out = model(expected["x"])
    torch.testing.assert_close(out.output, expected["output"], rtol=0, atol=0)
    torch.testing.assert_close(out.routing.probs_NE, expected["probs_NE"], rtol=0, atol=0)
    torch.testing.assert_close(out.aux_loss.reshape(1), expected["aux_loss"], rtol=0, atol=0)


def test_old_routed_configs_read_back_into_the_new_fields():
    switch = load_model(OLD / "sparse_switch_noisy")
    assert switch.config.router.kind == "switch" and switch.config.router.top_k == 1
    assert switch.config.experts_implementation == "auto"  # a field the old layout did not have
    sigmoid = load_model(OLD / "sparse_sigmoid_mlp_capacity")
    assert sigmoid.router.bias_E.abs().sum() > 0  # the load bias is read back, not reset


@pytest.fixture(scope="module")
def expected():
    return json.loads((OLD / "estimators.expected.json").read_text())


def test_an_old_classifier_folder_loads_with_equal_predictions(expected):
    clf = load_estimator(OLD / "estimator_classifier")
    want = expected["classifier"]
    X = np.asarray(want["X"])
    np.testing.assert_array_equal(clf.predict_proba(X), np.asarray(want["predict_proba"]))
    np.testing.assert_array_equal(clf.predict(X), np.asarray(want["predict"]))
    np.testing.assert_array_equal(clf.gate_proba(X), np.asarray(want["gate_proba"]))
    # the precision alpha='auto' chose was saved under the flat layout's key
    assert clf.alpha_ == want["alpha"] and clf.alpha_precision_ == want["alpha_precision"]
    assert clf.metadata_ == {"fixture": "classifier"}


def test_an_old_regressor_folder_loads_with_equal_predictions(expected):
    reg = load_estimator(OLD / "estimator_regressor")
    want = expected["regressor"]
    X = np.asarray(want["X"])
    np.testing.assert_array_equal(reg.predict(X), np.asarray(want["predict"]))
    np.testing.assert_array_equal(reg.predict_experts(X), np.asarray(want["predict_experts"]))
    np.testing.assert_array_equal(reg.expert_variance_, np.asarray(want["expert_variance"]))


def test_an_old_classifier_goes_on_learning_with_partial_fit(expected):
    clf = load_estimator(OLD / "estimator_classifier")
    X = np.asarray(expected["classifier"]["X"])
    y = clf.predict(X)
    before = clf.predict_proba(X)
    clf.partial_fit(X, y)
    assert clf.n_iter_ == 16 and not np.array_equal(clf.predict_proba(X), before)

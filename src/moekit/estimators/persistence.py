"""Saving and reloading fitted scikit-learn estimators as moekit model folders.

The folder is the one :func:`moekit.io.models.save_model` writes (safetensors weights +
config.json); the estimator's parameters, class labels, feature names and scalers go in the config's
metadata, so the folder holds no pickle and loads in any moekit of the same format version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.preprocessing import StandardScaler

from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor
from moekit.fitting.history import History
from moekit.io.models import load_model, save_model

ESTIMATORS = {cls.__name__: cls for cls in (MixtureOfExpertsClassifier, MixtureOfExpertsRegressor)}


def _scaler_to_dict(scaler: StandardScaler) -> dict[str, list[float]]:
    return {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}


def _scaler_from_dict(data: dict[str, list[float]]) -> StandardScaler:
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(data["mean"], dtype=np.float64)
    scaler.scale_ = np.asarray(data["scale"], dtype=np.float64)
    scaler.var_ = scaler.scale_ ** 2
    scaler.n_features_in_ = len(scaler.mean_)
    scaler.n_samples_seen_ = 0
    return scaler


def _json_params(estimator: Any) -> dict[str, Any]:
    params = estimator.get_params()
    if not isinstance(params.get("random_state"), (int, type(None))):
        params["random_state"] = None  # a RandomState object is not data; the weights are saved
    params["auto_candidates"] = [int(c) for c in params["auto_candidates"]]
    params["alpha_candidates"] = [float(c) for c in params["alpha_candidates"]]
    return params


def save_estimator(estimator: Any, directory: Path | str, *,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Save a fitted moekit estimator into ``directory``; ``metadata`` is stored beside it."""
    name = type(estimator).__name__
    if name not in ESTIMATORS or not hasattr(estimator, "model_"):
        raise TypeError(f"save_estimator: expected a fitted moekit estimator; got {name}.")
    state = {
        "estimator": name,
        "params": _json_params(estimator),
        "n_features_in": int(estimator.n_features_in_),
        "feature_names": [str(f) for f in getattr(estimator, "feature_names_in_", [])],
        "scaler": _scaler_to_dict(estimator.scaler_),
        "n_experts": int(estimator.n_experts_),
        "n_experts_curve": estimator.n_experts_curve_,
        "alpha": float(estimator.alpha_),
        "alpha_curve": estimator.alpha_curve_,
        "alpha_precision": getattr(estimator, "alpha_precision_", None),  # the c alpha='auto' chose
        "n_iter": int(estimator.n_iter_),
        "stop_reason": estimator.stop_reason_,
        "history": estimator.history_.to_list(),
    }
    if name == "MixtureOfExpertsClassifier":
        state["classes"] = estimator.classes_.tolist()
    else:
        state.update(y_scaler=_scaler_to_dict(estimator.y_scaler_), y_1d=bool(estimator._y_1d),
                     n_outputs=int(estimator.n_outputs_))
        if hasattr(estimator, "expert_variance_"):
            state["expert_variance"] = estimator.expert_variance_.tolist()
    return save_model(estimator.model_, directory, metadata={**(metadata or {}), "sklearn": state})


def load_estimator(directory: Path | str) -> Any:
    """Rebuild the estimator saved by :func:`save_estimator`; its predictions equal the saved one's.

    The rest of the folder's metadata is available as ``estimator.metadata_``.
    """
    model = load_model(directory)
    metadata = dict(model.metadata)
    state = metadata.pop("sklearn", None)
    if not isinstance(state, dict) or state.get("estimator") not in ESTIMATORS:
        raise ValueError(f"load_estimator: {str(directory)!r} holds a moekit model but no fitted "
                         "estimator (it was not saved by save_estimator or `moekit fit`).")
    try:
        estimator = ESTIMATORS[state["estimator"]](**state["params"])
        estimator.model_ = model
        estimator.n_features_in_ = state["n_features_in"]
        if state["feature_names"]:
            estimator.feature_names_in_ = np.asarray(state["feature_names"], dtype=object)
        estimator.scaler_ = _scaler_from_dict(state["scaler"])
        estimator.n_experts_, estimator.n_experts_curve_ = (state["n_experts"],
                                                            state["n_experts_curve"])
        estimator.n_iter_, estimator.stop_reason_ = state["n_iter"], state["stop_reason"]
        # folders saved before alpha was chosen by the fit record neither (None)
        estimator.alpha_, estimator.alpha_curve_ = state.get("alpha"), state.get("alpha_curve")
        estimator.history_ = History(state["history"])
        if "classes" in state:
            estimator.classes_ = np.asarray(state["classes"])
        else:
            estimator.y_scaler_ = _scaler_from_dict(state["y_scaler"])
            estimator._y_1d, estimator.n_outputs_ = state["y_1d"], state["n_outputs"]
            if "expert_variance" in state:
                estimator.expert_variance_ = np.asarray(state["expert_variance"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"load_estimator: the estimator record in {str(directory)!r} is "
                         f"incomplete or corrupted ({err!r}).") from err
    estimator._optimizer, estimator._generator = None, None
    # partial_fit goes on with the precision the fit chose (None: a fixed alpha, or an old folder)
    precision = state.get("alpha_precision")
    estimator.alpha_precision_ = None if precision is None else float(precision)
    estimator.metadata_ = metadata
    return estimator

"""Saving and reloading fitted scikit-learn estimators as moekit model folders.

The folder is the one :func:`moekit.io.models.save_model` writes (safetensors weights +
config.json); the estimator's parameters, class labels, feature names and scalers go in the config's
metadata, so the folder holds no pickle and loads in any moekit of the same format version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import make_constraint

from moekit.estimators._base import DTYPE
from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor
from moekit.exceptions import DataError
from moekit.fitting.history import History
from moekit.io.models import CONFIG_FILE, load_model, save_model
from moekit.io.records import SavedRecord, is_finite_number
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.localized import LocalizedMixtureOfExperts

ESTIMATORS = {cls.__name__: cls for cls in (MixtureOfExpertsClassifier, MixtureOfExpertsRegressor)}
_MODELS = {cls.__name__: cls for cls in (MixtureOfExperts, LocalizedMixtureOfExperts)}
# Parameter constraints spelled for a JSON file (scikit-learn names Python types).
_JSON_TYPES = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}
_JSON_CONSTRAINTS = {"boolean": "true or false", "array-like": "a list of numbers",
                     "random_state": "an integer in [0, 4294967295] or null",
                     "verbose": "an integer >= 0 or true or false"}


def _scaler_to_dict(scaler: StandardScaler) -> dict[str, list[float]]:
    return {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}


def _scaler_from_dict(mean: list[float], scale: list[float]) -> StandardScaler:
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(mean, dtype=np.float64)
    scaler.scale_ = np.asarray(scale, dtype=np.float64)
    with np.errstate(over="ignore"):  # informational only (transforms use scale_): a 1e300
        scaler.var_ = scaler.scale_ ** 2  # column's variance is inf
    scaler.n_features_in_ = len(scaler.mean_)
    scaler.n_samples_seen_ = 0
    return scaler


def _json_params(estimator: Any) -> dict[str, Any]:
    params = estimator.get_params()
    if not isinstance(params.get("random_state"), (int, type(None))):
        params["random_state"] = None  # a RandomState object is not data; the weights are saved
    params["auto_candidates"] = [int(c) for c in params["auto_candidates"]]
    params["alpha_candidates"] = [float(c) for c in params["alpha_candidates"]]
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in params.items()}


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
        "choices": getattr(estimator, "choices_", []),
        "interrupted": bool(getattr(estimator, "interrupted_", False)),
    }
    if name == "MixtureOfExpertsClassifier":
        state["classes"] = estimator.classes_.tolist()
    else:
        state.update(y_scaler=_scaler_to_dict(estimator.y_scaler_), y_1d=bool(estimator._y_1d),
                     n_outputs=int(estimator.n_outputs_))
        if hasattr(estimator, "expert_variance_"):
            state["expert_variance"] = estimator.expert_variance_.tolist()
    return save_model(estimator.model_, directory, metadata={**(metadata or {}), "sklearn": state})


def _spell(spec: Any) -> str | None:
    """A parameter constraint in the words of a JSON file (None: no JSON value can meet it)."""
    if spec is None:
        return "null"
    if isinstance(spec, type):
        return _JSON_TYPES.get(spec)
    if isinstance(spec, str):
        return _JSON_CONSTRAINTS.get(spec, spec)
    return str(make_constraint(spec))  # an Interval or StrOptions, in its own words


def _meets(value: Any, specs: list[Any]) -> bool:
    if isinstance(value, bool) and not {"boolean", "verbose", bool} & {
            s for s in specs if isinstance(s, (str, type))}:
        return False  # scikit-learn's intervals take True for 1; a saved integer is never a bool
    if "array-like" in specs:
        return isinstance(value, list) and all(is_finite_number(v) for v in value)
    try:
        return any(make_constraint(s).is_satisfied_by(value) for s in specs)
    except TypeError:
        return False


def _params(record: SavedRecord, cls: type) -> dict[str, Any]:
    """The saved constructor parameters, each accepted by the estimator's own constraints; a
    parameter the saved record lacks takes its default (folders saved before it existed)."""
    params = record.data
    unknown = sorted(set(params) - set(cls().get_params()))
    if unknown:
        raise record.error(f"{record.field} holds {unknown}, which {cls.__name__} does not take.")
    for name, value in params.items():
        specs = cls._parameter_constraints.get(name)
        if specs is not None and not _meets(value, specs):
            need = " or ".join(w for w in map(_spell, specs) if w)
            raise record.refuse(name, need, value)
    return params


def _classes(record: SavedRecord, n_outputs: int) -> np.ndarray:
    """The class labels: one per model output, of one JSON kind, distinct and sorted (fit saves
    them so, and partial_fit finds a label's column by binary search)."""
    classes = record.array("classes")
    assert classes is not None
    if len(classes) != n_outputs:
        raise record.error(f"{record.name('classes')} lists {len(classes)} classes but the model "
                           f"has {n_outputs} outputs (config.out_features={n_outputs}; a "
                           "classifier has one per class): the labels do not belong to these "
                           "weights.")
    if n_outputs < 2:
        raise record.error(f"{record.name('classes')} lists {n_outputs} class; a classifier has "
                           "at least 2.")
    kinds = {_label_kind(c) for c in classes}
    if len(kinds) != 1 or None in kinds:
        raise record.refuse("classes", "labels of one kind (strings, numbers or booleans)",
                            classes)
    if len(set(classes)) != len(classes) or classes != sorted(classes):
        raise record.refuse("classes", "distinct labels in sorted order", classes)
    return np.asarray(classes)


def _label_kind(label: Any) -> type | None:
    if isinstance(label, (str, bool)):
        return type(label)
    return float if is_finite_number(label) else None


def _model_fits(record: SavedRecord, model: Any, cls: type) -> None:
    """The estimator's record and the model it sits beside describe the same mixture."""
    head = getattr(model.config, "expert", None)
    if type(model).__name__ not in _MODELS or head is None or head.head != cls._head:
        raise record.error(f"the model beside it is a {type(model).__name__} with expert head "
                           f"{getattr(head, 'head', None)!r}; a {cls.__name__} needs a "
                           f"{' or '.join(_MODELS)} with head {cls._head!r}.")
    for key, field in (("n_features_in", "in_features"), ("n_experts", "n_experts")):
        size = getattr(model.config, field)
        if record.integer(key, minimum=1) != size:
            raise record.error(f"{record.name(key)}={record.data[key]} but the model has "
                               f"config.{field}={size}: the record does not belong to these "
                               "weights.")


def _record(model: Any, path: Path) -> tuple[type, dict[str, Any], SavedRecord]:
    state = model.metadata.get("sklearn")
    if not isinstance(state, dict) or state.get("estimator") not in ESTIMATORS:
        raise DataError(f"load_estimator: {str(path.parent)!r} holds a moekit model but no fitted "
                        "estimator (it was not saved by save_estimator or `moekit fit`).")
    record = SavedRecord("load_estimator", path, "metadata.sklearn", state)
    cls = ESTIMATORS[state["estimator"]]
    return cls, _params(record.child("params"), cls), record


def load_estimator(directory: Path | str) -> Any:
    """Rebuild the estimator saved by :func:`save_estimator`; its predictions equal the saved one's.

    Every field of the saved record is checked against the model beside it before it is used
    (sizes, classes, scalers, parameters); a mismatch is a :class:`~moekit.exceptions.DataError`
    naming the file and the field. The model is cast to the estimators' float64 (exact from any
    saved floating dtype). The rest of the folder's metadata is ``estimator.metadata_``.
    """
    path = Path(directory) / CONFIG_FILE
    model = load_model(directory).to(DTYPE)
    cls, params, record = _record(model, path)
    _model_fits(record, model, cls)
    n_features = model.config.in_features
    estimator = cls(**params)
    estimator.model_ = model
    estimator.n_features_in_ = n_features
    names = record.array("feature_names")
    assert names is not None
    if names and (len(names) != n_features or not all(isinstance(n, str) for n in names)):
        raise record.refuse("feature_names", f"[] or {n_features} strings", names)
    if names:
        estimator.feature_names_in_ = np.asarray(names, dtype=object)
    scaler = record.child("scaler")
    estimator.scaler_ = _scaler_from_dict(scaler.numbers("mean", length=n_features),
                                          scaler.numbers("scale", length=n_features, positive=True))
    estimator.n_experts_ = model.config.n_experts
    estimator.n_experts_curve_ = _curve(record, "n_experts_curve")
    estimator.n_iter_ = record.integer("n_iter", minimum=0)
    estimator.stop_reason_ = record.text("stop_reason", optional=True)
    # folders saved before alpha was chosen by the fit record neither (None)
    estimator.alpha_ = record.number("alpha", optional=True) if record.has("alpha") else None
    estimator.alpha_curve_ = _curve(record, "alpha_curve") if record.has("alpha_curve") else None
    history = record.array("history")
    if not all(isinstance(r, dict) for r in history or []):
        raise record.refuse("history", "a list of objects (one per epoch)", history)
    estimator.history_ = History(history)
    choices = (record.get("choices") if record.has("choices") else None) or []  # older folders
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise record.refuse("choices", "a list of objects (setting, value, why)", choices)
    estimator.choices_ = choices
    estimator.interrupted_ = record.boolean("interrupted") if record.has("interrupted") else False
    if cls is MixtureOfExpertsClassifier:
        estimator.classes_ = _classes(record, model.config.out_features)
    else:
        _regression_state(estimator, record, model.config)
    estimator._optimizer, estimator._generator = None, None
    # partial_fit goes on with the precision the fit chose (None: a fixed alpha, or an old folder)
    precision = (record.number("alpha_precision", optional=True)
                 if record.has("alpha_precision") else None)
    if precision is not None and precision <= 0:
        raise record.refuse("alpha_precision", "a number > 0 or null", precision)
    estimator.alpha_precision_ = precision
    estimator.metadata_ = {k: v for k, v in model.metadata.items() if k != "sklearn"}
    return estimator


def _curve(record: SavedRecord, key: str) -> Any:
    """A selection curve, kept for display: a list, an object, or null."""
    value = record.get(key)
    if value is not None and not isinstance(value, (list, dict)):
        raise record.refuse(key, "a list, an object or null", value)
    return value


def _regression_state(estimator: Any, record: SavedRecord, config: Any) -> None:
    n_outputs = record.integer("n_outputs", minimum=1)
    if n_outputs != config.out_features:
        raise record.error(f"{record.name('n_outputs')}={n_outputs} but the model has "
                           f"{config.out_features} outputs (config.out_features).")
    y_scaler = record.child("y_scaler")
    estimator.y_scaler_ = _scaler_from_dict(
        y_scaler.numbers("mean", length=n_outputs),
        y_scaler.numbers("scale", length=n_outputs, positive=True))
    y_1d = record.boolean("y_1d")
    if y_1d and n_outputs != 1:
        raise record.error(f"{record.name('y_1d')} is true but n_outputs={n_outputs}.")
    estimator._y_1d, estimator.n_outputs_ = y_1d, n_outputs
    if record.has("expert_variance"):
        variance = record.numbers("expert_variance", length=config.n_experts, positive=True)
        estimator.expert_variance_ = np.asarray(variance)

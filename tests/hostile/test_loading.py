"""Hostile model and estimator folders: each is refused with a DataError naming the folder, the file
and the field, before anything is allocated; none gives a traceback or a model answering NaN.

"Before anything is allocated" is checked, not timed: every model the loader builds is built on
the meta device (shapes without memory), and no tensor is read from a folder that is refused."""

import json
import math
import shutil
import stat
import struct
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_iris

from moekit import (
    ExpertConfig,
    HierarchicalMixtureOfExperts,
    LocalizedMixtureOfExperts,
    MixtureOfExperts,
    SparseMoE,
    load_estimator,
    load_model,
    save_estimator,
    save_model,
)
from moekit.exceptions import DataError, MoekitError
from moekit.io.models import CONFIG_FILE, WEIGHTS_FILE

MODELS = {
    "dense": lambda: MixtureOfExperts(2, 1, 3),
    "dense_mlp": lambda: MixtureOfExperts(2, 3, 3, expert=ExpertConfig(kind="mlp", hidden=4)),
    "sparse": lambda: SparseMoE(8, 4, 2, hidden=6),
    "hierarchical": lambda: HierarchicalMixtureOfExperts(2, 1, depth=2),
    "localized": lambda: LocalizedMixtureOfExperts(2, 1, 3),
}


@pytest.fixture
def guard(monkeypatch):
    """Record the device every model is built on, and fail if any tensor is read from disk."""
    devices = []
    # through load_model's own globals: the modules it runs, however pytest imported them
    for cls in load_model.__globals__["MODEL_CLASSES"].values():
        def spy(config, *, generator=None, _original=cls.from_config):
            devices.append(torch.get_default_device().type)
            return _original(config, generator=generator)
        monkeypatch.setattr(cls, "from_config", spy)

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read from a refused folder")

    monkeypatch.setitem(load_model.__globals__["load_weights"].__globals__, "load_file", no_read)
    return devices


def saved(tmp_path, kind="dense"):
    return save_model(MODELS[kind](), tmp_path / kind, metadata={"note": "x"})


def edit(folder, change):
    header = json.loads((folder / CONFIG_FILE).read_text())
    change(header)
    (folder / CONFIG_FILE).write_text(json.dumps(header))


def rewrite_weights(folder, change):
    state = load_file(str(folder / WEIGHTS_FILE))
    save_file(change(state), str(folder / WEIGHTS_FILE))


def refused(folder, match, devices=None):
    with pytest.raises(DataError, match=match) as info:
        load_model(folder)
    assert str(folder) in str(info.value)
    if devices is not None:
        assert set(devices) <= {"meta"}  # never built with memory
    return str(info.value)


# --- configs edited to ask for huge models --------------------------------------------------
@pytest.mark.parametrize("kind, path, value", [
    ("dense", ["n_experts"], 500_000_000),  # ~12 GB in float32
    ("dense", ["n_experts"], 21_000_000_000_000),  # ~500 TB
    ("dense", ["in_features"], 2**40),
    ("dense", ["out_features"], 2**40),
    ("dense_mlp", ["expert", "hidden"], 2**40),
    ("sparse", ["hidden"], 2**40),
    ("sparse", ["d_model"], 2**30),
    ("sparse", ["n_experts"], 2**40),
    ("hierarchical", ["depth"], 16),  # 65536 leaves: allowed by the layer, not by these weights
    ("hierarchical", ["in_features"], 2**40),
    ("localized", ["in_features"], 2**22),  # a full covariance grows as D**2
])
def test_a_config_edited_to_a_huge_size_is_refused_without_allocating(tmp_path, guard, kind,
                                                                      path, value):
    folder = saved(tmp_path, kind)

    def change(header):
        node = header["config"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    edit(folder, change)
    message = refused(folder, rf"do not fit the saved config .*{'.'.join(path)}={value:,}",
                      guard)
    assert "Restore the config.json saved with these weights" in message


def test_sizes_past_int64_are_refused_cleanly(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].update(n_experts=10**30))
    refused(folder, r"config\.n_experts must be an integer below 2\*\*63 \(a tensor size\); got "
                    r"1000000000000000000000000000000 \(a whole number\)", guard)
    assert guard == []


def test_sizes_whose_product_overflows_are_refused_cleanly(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].update(n_experts=2**40, in_features=2**40,
                                               out_features=2**40))
    refused(folder, r"the config \(in_features=1,099,511,627,776, .*\) describes no model that "
                    "can exist", guard)


def test_a_tree_deeper_than_the_layer_allows_is_refused(tmp_path, guard):
    folder = saved(tmp_path, "hierarchical")
    edit(folder, lambda h: h["config"].update(depth=40))
    refused(folder, r"branching\*\*depth .* must be at most 65536", guard)
    assert guard == []


def test_extra_shared_experts_are_refused(tmp_path, guard):
    folder = saved(tmp_path, "sparse")
    edit(folder, lambda h: h["config"].update(n_shared=1_000_000))
    refused(folder, r"n_shared=1,000,000.* lacks tensors \['shared.w13_EFD'", guard)


# --- config values of the wrong type -------------------------------------------------------
@pytest.mark.parametrize("value, said", [
    ("4", r'"4" \(a string\)'), (True, r"true \(a boolean\)"), (4.0, r"4.0 \(a fraction\)"),
    (None, "null"), ([4], r"\[4\] \(a list\)"),
])
def test_n_experts_of_the_wrong_type_is_refused(tmp_path, guard, value, said):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].update(n_experts=value))
    refused(folder, rf"config\.n_experts must be an integer; got {said}", guard)
    assert guard == []


def test_a_negative_n_experts_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].update(n_experts=-1))
    refused(folder, r"n_experts must be an integer >= 1; got n_experts=-1", guard)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.01"])
def test_a_float_field_that_is_not_a_finite_number_is_refused(tmp_path, guard, value):
    folder = saved(tmp_path, "sparse")
    edit(folder, lambda h: h["config"]["router"].update(jitter_eps=value))
    refused(folder, r"config\.router\.jitter_eps must be a finite number", guard)


def test_a_bool_field_holding_an_integer_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"]["gate"].update(bias=1))
    refused(folder, r"config\.gate\.bias must be true or false; got 1", guard)


def test_a_nested_config_that_is_not_an_object_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].update(expert="mlp"))
    refused(folder, r"config\.expert \(ExpertConfig\) must be a JSON object", guard)


def test_an_unknown_enum_value_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"]["expert"].update(kind="transformer"))
    refused(folder, r"kind must be one of 'linear', 'mlp', 'glu'; got kind='transformer'", guard)


def test_a_missing_required_field_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h["config"].pop("in_features"))
    refused(folder, r"config\.in_features is missing", guard)


def test_an_unknown_class_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h.update({"class": "os.system"}))
    refused(folder, r"unknown model class 'os.system'", guard)


def test_format_version_true_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    edit(folder, lambda h: h.update(format_version=True))
    refused(folder, r"format_version=true \(a boolean\) is not supported", guard)


@pytest.mark.parametrize("value", [None, [1, 2], "notes"])
def test_metadata_that_is_not_an_object_is_refused(tmp_path, guard, value):
    folder = saved(tmp_path)
    edit(folder, lambda h: h.update(metadata=value))
    refused(folder, r"metadata must be a JSON object; got", guard)


# --- config.json itself hostile ------------------------------------------------------------
def test_deeply_nested_json_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    (folder / CONFIG_FILE).write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    refused(folder, r"config\.json' is nested too deeply", guard)


def test_a_50_mb_config_is_refused_before_it_is_read(tmp_path, guard, monkeypatch):
    folder = saved(tmp_path)
    with (folder / CONFIG_FILE).open("w") as file:
        file.write('{"format": "moekit-model", "pad": "' + "x" * (50 * 2**20) + '"}')
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("a 50 MB config was parsed"))
    refused(folder, r"config\.json' is 52,428,8\d\d bytes; moekit reads JSON files of at most",
            guard)


# --- weights files that do not fit ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_non_float_weights_are_refused(tmp_path, guard, dtype):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda s: {k: v.to(dtype) for k, v in s.items()})
    refused(folder, r"tensor '.*' has dtype (I64|BOOL|I8); moekit weights are floating point",
            guard)


def test_mixed_dtypes_are_refused(tmp_path, guard):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda s: {**s, "gate.b_E": s["gate.b_E"].double()})
    refused(folder, r"mixes dtypes \(.*'gate.b_E' is F64.*\); a saved model has one dtype", guard)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(tmp_path, bad):
    folder = saved(tmp_path)

    def poison(state):
        state["experts.w_EDO"][1, 0, 0] = bad
        return state

    rewrite_weights(folder, poison)
    refused(folder, r"tensor 'experts.w_EDO' holds 1 non-finite values \(NaN or inf; the first "
                    r"at \[1, 0, 0\]")


def test_a_tensor_of_another_shape_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda s: {**s, "gate.w_DE": s["gate.w_DE"].T.contiguous()})
    refused(folder, r"'gate.w_DE' is \[3, 2\] in model.safetensors, the config needs \[2, 3\]",
            guard)


def test_a_missing_tensor_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda s: {k: v for k, v in s.items() if k != "gate.b_E"})
    refused(folder, r"lacks tensors \['gate.b_E'\] and has unexpected tensors \[\]", guard)


def test_an_extra_tensor_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda s: {**s, "backdoor": torch.zeros(2)})
    refused(folder, r"lacks tensors \[\] and has unexpected tensors \['backdoor'\]", guard)


def test_a_truncated_weights_file_is_refused(tmp_path, guard):
    folder = saved(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[:-5])
    refused(folder, r"cannot read model.safetensors in .*: it is truncated: tensor", guard)


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, 10**6])
def test_a_header_length_past_the_file_is_refused(tmp_path, guard, length):
    folder = saved(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", length) + data[8:])
    refused(folder, rf"its first 8 bytes give a header of {length:,} bytes", guard)


@pytest.mark.parametrize("header, said", [(b"[1, 2]  ", "is \\[1, 2\\]"), (b"\xff\xfe{]    ",
                                                                            "is not JSON")])
def test_a_garbage_weights_header_is_refused(tmp_path, guard, header, said):
    folder = saved(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header)
    refused(folder, rf"cannot read model.safetensors .*its header {said}", guard)


def test_offsets_that_disagree_with_the_shape_are_refused(tmp_path, guard):
    folder = saved(tmp_path)
    header = json.dumps({"gate.w_DE": {"dtype": "F32", "shape": [2, 3],
                                       "data_offsets": [0, 4]}}).encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    refused(folder, r"data_offsets \[0, 4\], which do not hold its 6 values", guard)


# --- dtypes moekit accepts -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_saved(tmp_path, dtype):
    model = SparseMoE(8, 4, 2, hidden=6).to(dtype).eval()
    loaded = load_model(save_model(model, tmp_path / "half"))
    x = torch.randn(5, 8).to(dtype)
    assert loaded.router.w_DE.dtype == dtype
    assert torch.equal(loaded(x).output, model(x).output)


# --- estimator records ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def estimator_folders(tmp_path_factory):
    from moekit.estimators.classifier import MixtureOfExpertsClassifier
    from moekit.estimators.regressor import MixtureOfExpertsRegressor

    X, y = load_iris(return_X_y=True)
    root = tmp_path_factory.mktemp("estimators")
    options = {"n_experts": 2, "max_epochs": 3, "alpha": 0.0, "expert": "linear",
               "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MixtureOfExpertsClassifier(**options).fit(X, np.array(["a", "b", "c"])[y])
        reg = MixtureOfExpertsRegressor(**options).fit(X[:, :2], X[:, 2:])
    return {"classifier": save_estimator(clf, root / "clf"), "regressor":
            save_estimator(reg, root / "reg"), "X": X}


def estimator_copy(estimator_folders, tmp_path, kind="classifier"):
    return shutil.copytree(estimator_folders[kind], tmp_path / kind)


def refused_estimator(folder, match):
    with pytest.raises(DataError, match=match) as info:
        load_estimator(folder)
    assert str(folder / CONFIG_FILE) in str(info.value)


def sklearn_record(change):
    return lambda header: change(header["metadata"]["sklearn"])


@pytest.mark.parametrize("classes", [["a", "b"], ["a", "b", "c", "d"]])
def test_classes_that_disagree_with_the_outputs_are_refused(estimator_folders, tmp_path,
                                                            classes):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s.update(classes=classes)))
    refused_estimator(folder, rf"metadata\.sklearn\.classes lists {len(classes)} classes but the "
                              r"model has 3 outputs")


@pytest.mark.parametrize("classes", [["c", "b", "a"], ["a", "a", "b"], ["a", 1, "b"],
                                     ["a", None, "b"]])
def test_classes_unsorted_repeated_or_mixed_are_refused(estimator_folders, tmp_path, classes):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s.update(classes=classes)))
    refused_estimator(folder, r"metadata\.sklearn\.classes must be")


@pytest.mark.parametrize("scale, said", [
    ([1.0, 1.0], r"must hold 4 finite numbers > 0; it holds 2"),
    ([1.0, 0.0, 1.0, 1.0], r"scale\[1\]=0.0"),
    ([1.0, math.nan, 1.0, 1.0], r"scale\[1\]=NaN \(not a finite number\)"),
    ([1.0, -2.0, 1.0, 1.0], r"scale\[1\]=-2.0"),
    (None, r"must be a list; got null"),
])
def test_a_broken_scaler_is_refused(estimator_folders, tmp_path, scale, said):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s["scaler"].update(scale=scale)))
    refused_estimator(folder, rf"metadata\.sklearn\.scaler\.scale.*{said}")


def test_a_scaler_mean_of_the_wrong_length_is_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s["scaler"].update(mean=[0.0] * 5)))
    refused_estimator(folder, r"metadata\.sklearn\.scaler\.mean must hold 4 finite numbers")


def test_feature_names_of_the_wrong_length_are_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s.update(feature_names=["a", "b"])))
    refused_estimator(folder, r"metadata\.sklearn\.feature_names must be \[\] or 4 strings")


def test_n_features_that_disagree_with_the_model_are_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s.update(n_features_in=5)))
    refused_estimator(folder, r"n_features_in=5 but the model has config\.in_features=4")


@pytest.mark.parametrize("name, value, said", [
    ("n_experts", "four", r"an int in the range \[1, inf\) or a str among \{'auto'\}"),
    ("lr", True, r"a float in the range \(0.0, inf\); got true"),
    ("early_stopping", 1, r"true or false or a str among \{'auto'\}; got 1"),
    ("auto_candidates", "123", r"a list of numbers"),
])
def test_params_the_estimator_refuses_are_refused(estimator_folders, tmp_path, name, value, said):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s["params"].update({name: value})))
    refused_estimator(folder, rf"metadata\.sklearn\.params\.{name} must be .*{said}")


def test_an_unknown_param_is_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, sklearn_record(lambda s: s["params"].update(dropout=0.5)))
    refused_estimator(folder, r"metadata\.sklearn\.params holds \['dropout'\], which "
                              "MixtureOfExpertsClassifier does not take")


def test_a_classifier_on_a_model_without_a_softmax_head_is_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    edit(folder, lambda h: h["config"]["expert"].update(head="identity"))
    refused_estimator(folder, r"with expert head 'identity'; a MixtureOfExpertsClassifier needs")


def test_a_regressor_scaler_of_the_wrong_width_is_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path, "regressor")
    edit(folder, sklearn_record(lambda s: s["y_scaler"].update(mean=[0.0])))
    refused_estimator(folder, r"metadata\.sklearn\.y_scaler\.mean must hold 2 finite numbers")


def test_a_regressor_whose_outputs_disagree_is_refused(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path, "regressor")
    edit(folder, sklearn_record(lambda s: s.update(n_outputs=3)))
    refused_estimator(folder, r"n_outputs=3 but the model has 2 outputs")


def test_a_float16_estimator_folder_is_cast_to_float64_and_predicts(estimator_folders, tmp_path):
    folder = estimator_copy(estimator_folders, tmp_path)
    rewrite_weights(folder, lambda s: {k: v.half() for k, v in s.items()})
    clf = load_estimator(folder)
    proba = clf.predict_proba(estimator_folders["X"])
    assert clf.model_.gate.w_DE.dtype == torch.float64
    assert np.isfinite(proba).all() and np.allclose(proba.sum(1), 1.0)


# --- what is written ----------------------------------------------------------------------
def test_weights_and_config_are_written_with_one_mode_and_nothing_else(tmp_path):
    folder = saved(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {CONFIG_FILE: 0o644, WEIGHTS_FILE: 0o644}


def test_loading_leaves_the_global_random_state_alone(tmp_path):
    folder = saved(tmp_path, "sparse")
    before = torch.random.get_rng_state()
    load_model(folder)
    assert torch.equal(before, torch.random.get_rng_state())


def test_every_refusal_is_a_moekit_data_error(tmp_path):
    folder = saved(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(MoekitError):
        load_model(folder)


def test_an_unreadable_config_is_a_data_error(tmp_path, monkeypatch):
    folder = saved(tmp_path)
    real_open = type(folder).open

    def refuse_config(self, *args, **kwargs):
        if self.name == CONFIG_FILE:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(folder), "open", refuse_config)
    refused(folder, r"load_model: cannot read '.*config\.json': Permission denied")

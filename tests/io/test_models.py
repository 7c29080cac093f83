"""Save/load: identical outputs after a round trip, atomic writes, clear errors on bad folders."""

import dataclasses
import json

import pytest
import torch

from moekit import ExpertConfig, MixtureOfExperts, load_model, save_model
from moekit.io.files import atomic_path, write_text_atomic
from moekit.io.models import CONFIG_FILE, WEIGHTS_FILE

F64 = torch.float64


@pytest.mark.parametrize("expert, dtype", [
    (ExpertConfig(), torch.float32),
    (ExpertConfig(kind="mlp", hidden=5, activation="relu", head="softmax"), F64),
])
def test_round_trip_gives_identical_outputs(tmp_path, gen, expert, dtype):
    moe = MixtureOfExperts(3, 4, 5, expert=expert, generator=gen).to(dtype)
    x = torch.randn(8, 3, generator=gen, dtype=dtype)
    folder = save_model(moe, tmp_path / "model", metadata={"features": ["a", "b", "c"]})
    loaded = load_model(folder)
    assert loaded.config == moe.config
    assert loaded.metadata == {"features": ["a", "b", "c"]}
    before, after = moe(x), loaded(x)
    assert torch.equal(before.output, after.output)
    assert torch.equal(before.routing.probs_NE, after.routing.probs_NE)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_config_file_is_readable_json(tmp_path):
    moe = MixtureOfExperts(2, 1, 3)
    save_model(moe, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert header["class"] == "MixtureOfExperts"
    assert header["config"] == dataclasses.asdict(moe.config)
    assert {k: header["config"][k] for k in ("in_features", "out_features", "n_experts")} == {
        "in_features": 2, "out_features": 1, "n_experts": 3}
    assert header["config"]["expert"] == {"kind": "linear", "hidden": 16, "activation": "tanh",
                                          "head": "identity"}


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")

    def crash_while_writing():
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        crash_while_writing()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_unsavable_metadata_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_model(MixtureOfExperts(2, 1, 3), tmp_path / "m", metadata={"bad": object()})
    assert not (tmp_path / "m").exists()


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model(tmp_path / "nope")


def test_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"is not a moekit model folder: it needs config\.json"):
        load_model(tmp_path)


def test_corrupted_config(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"is not valid JSON .*The file was edited or damaged"):
        load_model(tmp_path)


def test_foreign_json(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="is not a moekit model config"):
        load_model(tmp_path)


def test_corrupted_weights(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read model\.safetensors"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    header["config"]["n_experts"] = 4
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="do not fit the saved config"):
        load_model(tmp_path)


def test_unknown_config_key(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    header["config"]["expert"]["dropout"] = 0.1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"ExpertConfig: unknown config keys \['dropout'\]"):
        load_model(tmp_path)


def test_sparse_layer_round_trip(tmp_path, gen):
    from moekit import RouterConfig, SparseMoE

    layer = SparseMoE(8, 4, 2, hidden=12, router=RouterConfig(kind="sigmoid", top_k=2),
                      n_shared=1, capacity_factor=1.5, generator=gen).train()
    x = torch.randn(10, 8, generator=gen)
    layer(x)
    layer.router.step_bias()  # moves the load-balancing bias: a buffer that must be saved too
    layer.eval()
    loaded = load_model(save_model(layer, tmp_path / "sparse"))
    assert loaded.config == layer.config
    assert torch.equal(loaded.router.bias_E, layer.router.bias_E)
    assert torch.equal(loaded(x).output, layer(x).output)


def test_metadata_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match="metadata must be a dict; got list"):
        save_model(MixtureOfExperts(2, 1, 3), tmp_path / "m", metadata=["a"])
    assert not (tmp_path / "m").exists()


def test_a_crash_while_writing_weights_leaves_no_file(tmp_path, monkeypatch):
    def crash(state, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setitem(save_model.__globals__, "write_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(MixtureOfExperts(2, 1, 3), tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []  # no temporary file of any writer left


def test_a_config_saved_without_its_defaulted_fields_loads(tmp_path, gen):
    moe = MixtureOfExperts(2, 1, 3, generator=gen)
    save_model(moe, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    header["config"] = {k: header["config"][k] for k in ("in_features", "out_features",
                                                          "n_experts")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    loaded = load_model(tmp_path)
    assert loaded.config == moe.config
    x = torch.randn(4, 2, generator=gen)
    assert torch.equal(loaded(x).output, moe(x).output)


def test_a_model_is_only_ever_built_on_the_meta_device(tmp_path, monkeypatch):
    devices = []
    cls = load_model.__globals__["MODEL_CLASSES"]["MixtureOfExperts"]
    original = cls.from_config

    def spy(config, *, generator=None):
        devices.append(torch.get_default_device().type)
        return original(config, generator=generator)

    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    monkeypatch.setattr(cls, "from_config", spy)
    loaded = load_model(tmp_path)
    assert devices == ["meta"]  # the loaded tensors replace the meta ones: no second copy
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())

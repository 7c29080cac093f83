"""Topology-free checkpoints (moekit.parallel.checkpoint): saved at one expert-parallel size and
loaded at another (1 -> 2, 2 -> 4, 4 -> 2 over a real gloo group; 2 -> 1 and 4 -> 1 in this
process without one), optimizer state included, bit for bit; model folder -> checkpoint ->
model folder; clear errors for a checkpoint of another model.

One spawned group of 4 runs the chain of ``checkpoint_cases`` (its docstring); the tests compare.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.exceptions import DataError
from moekit.io import load_model, save_model
from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.parallel.checkpoint import (
    INFO_FILE,
    checkpoint_model,
    checkpoint_to_model_folder,
    load_checkpoint,
    model_folder_to_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_cases as cases  # the workers import it by this name in the spawned processes
from spawned import result, spawn_and_collect

WORLD, DEADLINE_S = 4, 180
PHASES = {"A": [0, 1], "B": [0, 1, 2, 3], "C": [0, 1]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The reference, the first checkpoint (from a model folder), then the chain in 4 workers."""
    folder = tmp_path_factory.mktemp("checkpoints")
    reference = cases.reference_states()
    save_model(cases.build_model(0), folder / "start_folder")
    model_folder_to_checkpoint(folder / "start_folder", folder / "C1")
    wanted = {(r, phase) for phase, ranks in PHASES.items() for r in ranks}
    results = spawn_and_collect(cases.worker, WORLD, (WORLD, str(folder / "store"), str(folder)),
                                wanted, DEADLINE_S)
    return folder, reference, results


def _get(results: dict, rank: int, phase: str) -> dict:
    return result(results, rank, phase, "phase: ")


@pytest.mark.parametrize("phase, loaded, saved_by", [
    ("A", "C1", 1), ("B", "C2", 2), ("C", "C4", 4)], ids=["1to2", "2to4", "4to2"])
def test_each_rank_loads_its_rows_of_a_checkpoint_saved_at_another_size(run, phase, loaded,
                                                                         saved_by):
    _, reference, results = run
    want = reference[loaded]
    ranks = PHASES[phase]
    for rank in ranks:
        got = _get(results, rank, phase)
        assert got["info_world"] == saved_by
        assert got["info_metadata"] == ({} if loaded == "C1" else
                                         {"phase": {"C2": "A", "C4": "B"}[loaded]})
        assert got["loaded"].keys() == want.keys() - {"model"}
        cases.check_rows(got["loaded"], want, rank, len(ranks))
        if loaded != "C1":  # hyperparameters travel too: the loader's optimizer had lr 0.5
            lrs = {v for k, v in got["loaded"].items() if k.endswith(".lr")}
            assert lrs == {cases.LR}
            steps = {float(v) for k, v in got["loaded"].items() if k.endswith(".step")}
            assert steps == {float(cases.STEPS[loaded])}


@pytest.mark.parametrize("name", ["C2", "C4", "C2b"])
def test_one_process_loads_any_world_size_without_a_process_group(run, name):
    folder, reference, _ = run
    want = reference[name]
    model = cases.build_model(seed=99)
    optimizer = cases.build_optimizer(model, cases.OTHER_LR)
    load_checkpoint(folder / name, model, optimizer)
    cases.check_rows(cases.local_state(model, optimizer), want, rank=0, world=1)
    assert read_checkpoint_info(folder / name).world_size == {"C2": 2, "C4": 4, "C2b": 2}[name]


def test_checkpoint_to_model_folder_and_back(run, tmp_path):
    folder, reference, _ = run
    checkpoint_to_model_folder(folder / "C2b", tmp_path / "model")
    model = load_model(tmp_path / "model")
    assert type(model) is MoETransformerLM and model.metadata == {"phase": "C"}
    want = reference["C2b"]["model"]
    assert model.state_dict().keys() == want.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    model_folder_to_checkpoint(tmp_path / "model", tmp_path / "again")
    again = checkpoint_model(tmp_path / "again")
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_a_sharded_model_cannot_be_saved_from_one_rank(run):
    message = _get(run[2], 0, "B")["local_error"]
    assert "save_checkpoint: the model's experts are sharded over ranks" in message


# --- errors, in this process ---------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> Path:
    model = cases.build_model(0)
    return save_checkpoint(tmp_path / "ckpt", model)


def test_a_checkpoint_of_another_expert_count_is_refused_naming_the_field(saved):
    other = MoETransformerLM(LMConfig(**{**cases.CONFIG.__dict__, "n_experts": 8})).double()
    with pytest.raises(DataError, match=r"holds another MoETransformerLM \(n_experts=4 there, "
                                        r"n_experts=8 here\)\. Build the model from the "
                                        r"checkpoint's config"):
        load_checkpoint(saved, other)


def test_a_checkpoint_of_another_class_or_dtype_is_refused(saved):
    from moekit.nn.sparse import SparseMoE

    with pytest.raises(DataError, match="holds a MoETransformerLM; the model is a SparseMoE"):
        load_checkpoint(saved, SparseMoE(8, 4, hidden=6))
    with pytest.raises(DataError, match=r"holds float64 weights; the model is float32\. Call "
                                        r"model.to\(torch.float64\)"):
        load_checkpoint(saved, MoETransformerLM(cases.CONFIG))


def test_an_optimizer_the_checkpoint_does_not_hold_is_refused(saved, tmp_path):
    model = cases.build_model(1)
    with pytest.raises(DataError, match=r"holds no optimizer state .*pass optimizer=None"):
        load_checkpoint(saved, model, cases.build_optimizer(model, cases.LR))
    optimizer = cases.build_optimizer(model, cases.LR)
    cases.synthetic_step(model, optimizer)
    save_checkpoint(tmp_path / "adamw", model, optimizer)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(DataError, match=r"has no 'optimizer\.param_groups\..*\.momentum' "
                                        r"\(another optimizer than the one saved\?\)"):
        load_checkpoint(tmp_path / "adamw", model, sgd)
    assert not sgd.state


def test_an_optimizer_saved_before_its_first_step_keeps_only_its_hyperparameters(tmp_path):
    """torch's get_state_dict steps a fresh optimizer (Adam's count becomes 1); the checkpoint
    must not keep that step, nor leave it in the optimizer saved."""
    model, twin = cases.build_model(0), cases.build_model(0)
    optimizer = cases.build_optimizer(model, cases.LR)
    save_checkpoint(tmp_path / "fresh", model, optimizer)
    assert not optimizer.state and not read_checkpoint_info(tmp_path / "fresh").optimizer_stepped
    loaded = cases.build_optimizer(twin, cases.OTHER_LR)
    load_checkpoint(tmp_path / "fresh", twin, loaded)
    assert not loaded.state and {g["lr"] for g in loaded.param_groups} == {cases.LR}
    cases.synthetic_step(model, optimizer)
    cases.synthetic_step(twin, loaded)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_saving_over_a_checkpoint_needs_overwrite_and_replaces_it_whole(saved):
    model = cases.build_model(5)
    with pytest.raises(DataError, match=r"exists; pass overwrite=True to replace it"):
        save_checkpoint(saved, model)
    save_checkpoint(saved, model, metadata={"second": True}, overwrite=True)
    assert read_checkpoint_info(saved).metadata == {"second": True}
    np.testing.assert_array_equal(checkpoint_model(saved).tok_emb_VD.detach().numpy(),
                                  model.tok_emb_VD.detach().numpy())
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no partial left


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"is not a moekit checkpoint \(no {INFO_FILE}"):
        read_checkpoint_info(tmp_path / "empty")

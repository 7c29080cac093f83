"""Snapshots of a `moekit lm train` run: when one is due, the folders listed (leftovers of killed
writes ignored), one replaced whole and recorded, the unrecorded ones pruned."""

import torch

from moekit.io.models import load_model
from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.runs.lm_snapshots import (
    list_snapshots,
    prune_snapshots,
    save_snapshot,
    snapshot_due,
    snapshot_interval,
)


def tiny_lm(seed: int) -> MoETransformerLM:
    config = LMConfig(d_model=8, n_layers=1, n_heads=2, n_experts=2, expert_hidden=8,
                      max_seq_len=8)
    return MoETransformerLM(config, generator=torch.Generator().manual_seed(seed))


def test_a_snapshot_is_due_at_each_multiple_below_the_last_step_once():
    assert snapshot_interval(None, 1000) == 125 and snapshot_interval(None, 3) == 1
    assert snapshot_interval(7, 1000) == 7 and snapshot_interval(0, 1000) == 0
    history = {"snapshots": [{"step": 10}]}
    due = [s for s in range(31) if snapshot_due(s, 10, 30, history)]
    assert due == [0, 20]  # 10 is recorded already; 30 is the final model itself
    assert not any(snapshot_due(s, 0, 30, {}) for s in range(31))


def test_a_snapshot_replaces_a_leftover_whole_and_is_recorded(tmp_path):
    history = {}
    save_snapshot(tiny_lm(0), tmp_path, 4, history)
    folder = save_snapshot(tiny_lm(1), tmp_path, 4, {})  # a rerun of the same step
    assert folder == tmp_path / "snapshots" / "step_000004"
    saved, expected = load_model(folder).state_dict(), tiny_lm(1).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    assert history == {"snapshots": [{"step": 4, "path": "snapshots/step_000004"}]}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["step_000004"]


def test_snapshots_are_listed_by_step_and_the_unrecorded_ones_pruned(tmp_path):
    history = {}
    for step in (12, 0, 6):
        save_snapshot(tiny_lm(step), tmp_path, step, history)
    (tmp_path / "snapshots" / ".step_000018.abcd1234.tmp").mkdir()  # a killed write
    (tmp_path / "snapshots" / "notes").mkdir()
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 6, 12]
    assert list_snapshots(tmp_path / "nowhere") == []
    history["snapshots"] = history["snapshots"][1:]  # the checkpoint recorded 0 and 6 only
    assert prune_snapshots(tmp_path, history) == [tmp_path / "snapshots" / "step_000012"]
    assert [s.step for s in list_snapshots(tmp_path)] == [0, 6]

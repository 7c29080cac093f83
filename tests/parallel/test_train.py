"""The expert-parallel training entry (`moekit lm train-ep`): at world size 2 over a real gloo
group, the per-step losses and gradient norms equal one process's on the same global batches
(float64, 1e-10), for every token- and expert-choice router; a run saved by one process resumes
at world size 2 on the same course; the command line.

One spawned group of 2 runs every case (``train_cases.worker``); the tests compare here.
"""

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moekit.cli import main
from moekit.cli.lm_ep import OPTIONS
from moekit.exceptions import DataError
from moekit.parallel.train import HISTORY_FILE, EPTrainConfig, check_options, train

sys.path.insert(0, str(Path(__file__).parent))
import train_cases as cases  # the workers import it by this name in the spawned processes
from spawned import result, spawn_and_collect

WORLD, DEADLINE_S = 2, 120
NAMES = [*cases.ROUTERS, "resumed"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One process's runs (the reference; the half run to resume), then the group of 2."""
    folder = tmp_path_factory.mktemp("train")
    reference = {router: train(cases.config(folder / f"single_{router}", router))
                 for router in cases.ROUTERS}
    train(cases.config(folder / "single_half", steps=cases.RESUMED_AT))
    wanted = {(r, name) for r in range(WORLD) for name in NAMES}
    results = spawn_and_collect(cases.worker, WORLD, (WORLD, str(folder / "store"), str(folder)),
                                wanted, DEADLINE_S)
    return folder, reference, results


def _history(results: dict, rank: int, name: str) -> dict:
    return result(results, rank, name, "run: ")


def _close(got: list[dict], want: list[dict]) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for key in ("loss", "cross_entropy", "aux_loss", "grad_norm"):
        np.testing.assert_allclose([s[key] for s in got], [s[key] for s in want], rtol=0,
                                   atol=1e-10, err_msg=key)


@pytest.mark.parametrize("router", cases.ROUTERS)
def test_world_size_2_gives_one_process_losses_step_by_step(run, router):
    folder, reference, results = run
    want = reference[router]["steps"]
    assert len(want) == cases.STEPS and want[0]["loss"] > want[-1]["loss"]  # it learns
    for rank in range(WORLD):
        got = _history(results, rank, router)
        assert got["mode"] == "expert-parallel" and got["world_size"] == WORLD
        _close(got["steps"], want)
    written = json.loads((folder / f"ep_{router}" / HISTORY_FILE).read_text())
    _close(written["steps"], want)
    assert written["corpus_sha256"] == reference[router]["corpus_sha256"]


def test_a_single_process_run_resumes_at_world_size_2_on_the_same_course(run):
    _, reference, results = run
    for rank in range(WORLD):
        _close(_history(results, rank, "resumed")["steps"], reference["topk"]["steps"])


def test_a_resume_with_other_options_is_refused_naming_them(run, tmp_path):
    folder = run[0]
    resumed = cases.config(tmp_path / "other", seed=1, lr=0.5,
                           resume=str(folder / "single_half" / "checkpoint"))
    with pytest.raises(DataError, match=r"it ran with lr=0\.01 not lr=0\.5, seed=0 not seed=1; "
                                        r"pass its options"):
        train(resumed)


def test_the_command_line_trains_one_process_and_refuses_unknown_options(tmp_path, capsys):
    args = ["lm", "train-ep", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
            "--d-model", "8", "--n-heads", "2", "--n-experts", "2", "--expert-hidden", "8",
            "--max-bytes", "30000", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    assert "single-process at world size 1: step 2 loss" in capsys.readouterr().out
    history = json.loads((tmp_path / "cli" / HISTORY_FILE).read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2]
    assert main(args) == 1
    assert "holds a run; pass --overwrite to replace it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--no-such-option", "1"])


def test_the_command_line_has_a_flag_for_every_option():
    assert set(OPTIONS) | {"overwrite"} == {f.name for f in dataclasses.fields(EPTrainConfig)}


def test_options_that_cannot_run_at_the_world_size_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"batch_size=4 windows cannot be split evenly over 3 "
                                        r"ranks; pass a multiple of 3, e.g. batch_size=3"):
        check_options(cases.config(tmp_path), 3)
    with pytest.raises(ValueError, match=r"n_experts=4 cannot be split evenly over an "
                                         r"expert-parallel group of 8 ranks"):
        check_options(cases.config(tmp_path, batch_size=8), 8)


@pytest.mark.slow
def test_torchrun_runs_the_entry(tmp_path):
    """The real launcher: ``torchrun --nproc-per-node 2`` on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = ["--steps", "2", "--batch-size", "2", "--seq-len", "8", "--d-model", "8",
               "--n-heads", "2", "--n-experts", "2", "--expert-hidden", "8",
               "--max-bytes", "30000", "--dtype", "float64"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
                    "moekit", "lm", "train-ep", *options, "--out", str(tmp_path / "ep")],
                   check=True, timeout=120, capture_output=True)
    train(cases.config(tmp_path / "one", steps=2, batch_size=2, seq_len=8, d_model=8,
                       n_experts=2, expert_hidden=8, max_bytes=30_000, lr=3e-3))
    got = json.loads((tmp_path / "ep" / HISTORY_FILE).read_text())
    want = json.loads((tmp_path / "one" / HISTORY_FILE).read_text())
    assert got["world_size"] == 2
    _close(got["steps"], want["steps"])

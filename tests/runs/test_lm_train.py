"""`moekit lm train` from Python: the MoE model and its dense twin trained side by side, the run
folder and its snapshots, the golden losses of a seeded quick run, resume after a crash, Ctrl-C or
SIGKILL to the same bits (snapshots included), and the bad inputs it refuses.

Regenerate the golden file (after a deliberate change to the training) with
``.venv/bin/python tests/runs/test_lm_train.py``."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.data import CATEGORIES
from moekit.exceptions import DataError
from moekit.io import load_model
from moekit.io.run_folder import MANIFEST_FILE, is_resumable, partial_folder
from moekit.nn.lm import MoETransformerLM
from moekit.runs import lm_train
from moekit.runs.lm_checkpoint import CHECKPOINT_FILE, lr_factor
from moekit.runs.lm_snapshots import list_snapshots
from moekit.runs.lm_train import LMTrainConfig, train_lm

GOLDEN = Path(__file__).parents[1] / "assets" / "lm_quick_golden.json"
ROOT = Path(__file__).parents[2]


def quick(out: Path, **overrides) -> LMTrainConfig:
    """The quick run on one thread (the thread count can change float32 sums' order)."""
    return LMTrainConfig.quick(out=str(out), progress=False, threads=1, **overrides)


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Both models' weights and every snapshot's, by their folder's path in the run."""
    folders = ["moe", "dense", *(f"snapshots/{s.path.name}" for s in list_snapshots(run))]
    return {m: load_file(run / m / "model.safetensors") for m in folders}


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit the same weights (the snapshots' too), and the same history."""
    wa, wb = weights(a), weights(b)
    for m in wa:
        assert m in wb and wa[m].keys() == wb[m].keys(), m
        assert all(torch.equal(wa[m][k], wb[m][k]) for k in wa[m]), m
    assert wa.keys() == wb.keys()
    assert json.loads((a / "history.json").read_text()) == \
        json.loads((b / "history.json").read_text())


def write_code_corpus(folder: Path) -> Path:
    """40 small Python files of fixed text: the same bytes and labels on every Python version
    (the standard library is not)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        lines = [f"def f{i}_{j}(x, y={j}):\n    return x * {j} + y - {i}  # term {j}\n"
                 for j in range(50)]
        (folder / f"m{i:02d}.py").write_text(f'"""Module {i}."""\n' + "".join(lines))
    return folder


def flat(values: list) -> list[float]:
    return [v for row in values for v in (row if isinstance(row, list) else [row])]


def golden_record(outcome) -> dict:
    h = outcome.history
    return {"steps": [[s["moe_loss"], s["dense_loss"], s["moe_aux_loss"]] for s in h["steps"]],
            "evals": [[e["step"], e["moe_val_bpb"], e["dense_val_bpb"]] for e in h["evals"]],
            "final": [h["final"]["moe"]["bpb"], h["final"]["dense"]["bpb"]]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted quick run on the standard library (checkpoints every 5 steps)."""
    out = tmp_path_factory.mktemp("lm") / "reference"
    return out, train_lm(quick(out, checkpoint_every=5))


def test_lr_factor_warms_up_then_follows_a_cosine_to_a_tenth():
    # warm-up of 2: 1/2, 2/2; then p = 0, 1/3, 2/3, 1 over the 4 remaining updates:
    # 0.1 + 0.9 * (1 + cos(pi p)) / 2 = 1, 0.775, 0.325, 0.1
    assert [round(lr_factor(s, 2, 6), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
    assert lr_factor(0, 0, 1) == pytest.approx(1.0)  # one step, no warm-up: the peak


def test_the_run_folder_holds_both_models_history_summary_and_log(reference):
    out, _outcome = reference
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, "dense", "history.json", "log.md", "moe", "snapshots", "summary.json"])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["command"] == "lm train" and "moe/model.safetensors" in manifest["files"]
    history = json.loads((out / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == list(range(1, 31))
    assert [e["step"] for e in history["evals"]] == [0, 10, 20, 30]
    # untrained, both models guess near uniformly over 256 bytes: about 8 bits per byte
    assert all(7 < history["evals"][0][f"{m}_val_bpb"] < 8.5 for m in ("moe", "dense"))
    assert history["evals"][-1]["moe_val_bpb"] < history["evals"][0]["moe_val_bpb"] - 1
    summary = json.loads((out / "summary.json").read_text())
    costs = {m: summary["models"][m]["costs"] for m in ("moe", "dense")}
    # equal active feed-forward FLOPs; the MoE pays only its routers (2 * D * E per layer)
    assert costs["moe"]["ffn_flops"] == costs["dense"]["ffn_flops"]
    assert costs["moe"]["matmul_flops"] - costs["dense"]["matmul_flops"] == 2 * 2 * 32 * 4
    assert summary["corpus"]["splits"]["train"]["sha256"]
    final = summary["final"]["moe"]
    assert set(final["categories"]) == set(CATEGORIES)
    scored = sum(c["bytes"] for c in final["categories"].values())
    assert scored == final["bytes"] == summary["corpus"]["splits"]["validation"]["bytes"] - 1
    moe, dense = load_model(out / "moe"), load_model(out / "dense")
    assert moe.config.ffn == "moe" and dense.config.ffn == "dense"
    assert dense.config.dense_hidden == 2 * moe.config.expert_hidden
    assert moe.metadata["lm_train"]["final"]["bpb"] == pytest.approx(final["bpb"])
    assert moe.metadata["lm_train"]["corpus"]["splits"]["validation"]["bytes"] > 0
    log = (out / "log.md").read_text().splitlines()
    assert len(log) == 2 + 4 + 1 and log[-1].startswith("| final: all")


def test_snapshots_of_the_moe_are_kept_at_every_interval_below_the_last_step(reference):
    out, outcome = reference
    # quick: every 10 of 30 steps; step 30 is moe/ itself
    assert [(s.step, s.path.name) for s in list_snapshots(out)] == [
        (0, "step_000000"), (10, "step_000010"), (20, "step_000020")]
    assert outcome.summary["snapshots"] == [0, 10, 20]
    assert outcome.history["snapshots"] == [{"step": s, "path": f"snapshots/step_{s:06d}"}
                                            for s in (0, 10, 20)]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert "snapshots/step_000010/model.safetensors" in manifest["files"]
    final = load_model(out / "moe")
    snapshots = {s.step: load_model(s.path) for s in list_snapshots(out)}
    assert all(m.config == final.config and m.metadata == {"lm_snapshot": {"step": step}}
               for step, m in snapshots.items())
    # step 0 holds the initial weights, drawn from the seed; later ones have moved away
    initial = MoETransformerLM(final.config, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, initial.state_dict()[k])
               for k, v in snapshots[0].state_dict().items())
    moved = [k for k, v in snapshots[10].state_dict().items()
             if not torch.equal(v, snapshots[0].state_dict()[k])]
    assert moved and any(not torch.equal(v, final.state_dict()[k])
                         for k, v in snapshots[20].state_dict().items())


def test_a_seeded_quick_run_matches_its_golden_losses(tmp_path):
    """Exact on one machine; 1e-6 relative across machines, whose float32 matmul kernels (AVX2,
    AVX-512, another BLAS) sum in other orders and so differ in the last bits."""
    data = write_code_corpus(tmp_path / "code")
    outcome = train_lm(quick(tmp_path / "run", data=(str(data),)))
    golden = json.loads(GOLDEN.read_text())
    got = golden_record(outcome)
    for part in ("steps", "evals", "final"):
        assert flat(got[part]) == pytest.approx(flat(golden[part]), rel=1e-6), part


def _raise_at(step: int, error: BaseException):
    def on_step(done: int) -> None:
        if done == step:
            raise error
    return on_step


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash") as info:  # after the checkpoint of step 15
        train_lm(quick(out, checkpoint_every=5), on_step=_raise_at(17, RuntimeError("crash")))
    assert "rerun with --resume" in info.value.__notes__[-1]
    assert not out.exists() and is_resumable(partial_folder(out))
    outcome = train_lm(quick(out, checkpoint_every=5, resume=True))
    assert outcome.summary["resumed_from"] == 15
    assert_same_run(reference[0], out)


def test_ctrl_c_saves_the_step_it_came_in_and_resume_continues(reference, tmp_path, monkeypatch):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has another handler here")
    out, real_step = tmp_path / "run", lm_train.train_step

    def step_with_ctrl_c(state, x_BT, y_BT):  # Ctrl-C arrives in the middle of step 12
        if state.step == 11:
            signal.raise_signal(signal.SIGINT)
        real_step(state, x_BT, y_BT)

    monkeypatch.setattr(lm_train, "train_step", step_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_lm(quick(out, checkpoint_every=5))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(lm_train, "train_step", real_step)
    outcome = train_lm(quick(out, checkpoint_every=5, resume=True))
    assert outcome.summary["resumed_from"] == 12  # the step finished, then saved
    assert_same_run(reference[0], out)


def test_a_resume_with_other_options_is_refused_naming_each(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_lm(quick(out), on_step=_raise_at(12, KeyboardInterrupt()))
    with pytest.raises(DataError, match=r"it ran with d_model=32, not d_model=16, lr=0\.003, not "
                                        r"lr=0\.01, seed=0, not seed=3; rerun with its options, "
                                        r"or pass overwrite=True to start again\."):
        train_lm(quick(out, resume=True, d_model=16, lr=0.01, seed=3))
    with pytest.raises(DataError, match=r"has already run 12 steps; this call has steps=5; pass "
                                        r"steps=12 or more to resume it\."):
        train_lm(quick(out, resume=True, steps=5))
    with pytest.raises(DataError, match=r"an interrupted run left its work.*resume=True"):
        train_lm(quick(out))
    # steps may be raised: the run goes on to the new count
    outcome = train_lm(quick(out, resume=True, steps=40))
    assert outcome.summary["resumed_from"] == 12 and outcome.summary["steps"] == 40
    assert outcome.history["evals"][-1]["step"] == 40


def test_a_snapshot_written_after_the_last_checkpoint_is_redone_on_resume(reference, tmp_path):
    out = tmp_path / "run"
    # checkpoints at 15 and 30; the snapshot of step 20 is written, then the crash at step 22
    with pytest.raises(RuntimeError, match="crash"):
        train_lm(quick(out, checkpoint_every=15), on_step=_raise_at(22, RuntimeError("crash")))
    assert [s.step for s in list_snapshots(partial_folder(out))] == [0, 10, 20]
    train_lm(quick(out, checkpoint_every=15, resume=True))
    assert_same_run(reference[0], out)
    # resumed to fewer steps than the stale snapshot's: it is gone, not kept unrecorded
    short = tmp_path / "short"
    with pytest.raises(RuntimeError, match="crash"):
        train_lm(quick(short, checkpoint_every=15), on_step=_raise_at(22, RuntimeError("crash")))
    outcome = train_lm(quick(short, checkpoint_every=15, resume=True, steps=18))
    assert [s.step for s in list_snapshots(short)] == outcome.summary["snapshots"] == [0, 10]


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, r"steps must be an integer >= 1; got steps=0; pass e\.g\. steps=1000\."),
    ({"snapshot_every": -1}, (r"snapshot_every must be an integer >= 0 \(0: no snapshots; "
                              r"unset: about steps / 8\); got snapshot_every=-1; pass e\.g\. "
                              r"snapshot_every=100\.")),
    ({"data": ("/no/such/code",)},
     (r"data='/no/such/code' does not exist; pass existing text files or folders, or "
     r"data='stdlib'")),
    ({"seq_len": 128}, (r"seq_len=128 is longer than the model's longest input, max_seq_len=64; "
                       r"pass seq_len=64 or less, or max_seq_len=128\.")),
    ({"lr": -1.0}, r"lr must be a number > 0; got lr=-1\.0; pass e\.g\. lr=0\.003\."),
    ({"validation_fraction": 0}, r"validation_fraction must be a number in \(0, 1\)"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        train_lm(quick(tmp_path / "run", **overrides))
    assert not any(tmp_path.iterdir())


def test_a_split_shorter_than_a_window_is_refused(tmp_path):
    data = tmp_path / "code"
    data.mkdir()
    for i in range(20):  # 40 bytes in all: neither split holds a window of 64
        (data / f"m{i}.py").write_text("x\n")
    with pytest.raises(DataError, match=r"split holds \d+ bytes, too few for one window of "
                                        r"seq_len=64"):
        train_lm(quick(tmp_path / "run", data=(str(data),), validation_fraction=0.5))


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(tmp_path):
    options = ["--quick", "--steps", "300", "--checkpoint-every", "20", "--threads", "1",
               "--no-progress"]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "moekit", "lm", "train", *options, "--out", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = partial_folder(killed) / "checkpoint" / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps on, maybe inside a checkpoint write
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not killed.exists()
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stdout
    whole = tmp_path / "whole"
    train_lm(quick(whole, steps=300, checkpoint_every=20))
    assert_same_run(whole, killed)


if __name__ == "__main__":  # write the golden file
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        run = train_lm(quick(Path(folder) / "run",
                             data=(str(write_code_corpus(Path(folder) / "code")),)))
    record = {"what": "losses of LMTrainConfig.quick(threads=1) on write_code_corpus(); "
                      "tests/runs/test_lm_train.py", "torch": torch.__version__,
              **golden_record(run)}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    assert all(math.isfinite(v) for v in record["final"])
    print(f"wrote {GOLDEN}: final bpb {record['final']}")

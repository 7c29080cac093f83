"""`moekit lm train` end to end with --quick: the printed log and categories, the run folder,
Ctrl-C and --resume, and bad input named by its flag."""

import json

import pytest

from moekit.cli import main
from moekit.data import CATEGORIES
from moekit.io.run_folder import is_resumable, partial_folder
from moekit.runs import lm_train

QUICK = ["lm", "train", "--quick", "--threads", "1", "--no-progress"]


def test_quick_run_prints_both_curves_and_the_categories(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main([*QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Trained 30 steps on 7,680 bytes" in printed  # 30 steps x 4 windows x 64 bytes
    assert "| step | bytes seen | train bpb MoE | train bpb dense | val bpb MoE | val bpb dense |" \
        in printed
    assert "| final: all" in printed and f"Wrote {out}/moe" in printed
    assert f"3 snapshots of the MoE in {out}/snapshots (steps 0, 10, 20)" in printed
    for category in ("keyword", "name", "operator", "string", "comment", "whitespace"):
        assert category in CATEGORIES and f"\n{category} " in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["d_model"] == 32 and summary["steps"] == 30
    assert (out / "moe" / "model.safetensors").is_file()
    # a second run into the same folder needs --overwrite
    assert main([*QUICK, "--out", str(out)]) == 1
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert main([*QUICK, "--out", str(out), "--overwrite", "--steps", "12"]) == 0


def test_options_override_the_quick_sizes(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main([*QUICK, "--out", str(out), "--steps", "5", "--experts", "2", "--top-k", "1",
                 "--hidden", "16", "--router", "switch", "--eval-every", "5",
                 "--snapshot-every", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    options = summary["options"]
    assert (options["steps"], options["n_experts"], options["top_k"], options["expert_hidden"],
            options["router"], options["snapshot_every"]) == (5, 2, 1, 16, "switch", 0)
    assert summary["snapshots"] == [] and not (out / "snapshots").exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be an integer >= 1; got --steps 0; pass e.g. --steps 1000."),
    (["--snapshot-every", "-2"], ("--snapshot-every must be an integer >= 0 (0: no snapshots; "
                                  "unset: about steps / 8); got --snapshot-every -2")),
    (["--data", "/no/such/code"], ("--data /no/such/code does not exist; pass existing text files "
                                  "or folders, or --data stdlib")),
    (["--seq-len", "128"], ("--seq-len 128 is longer than the model's longest input, "
                           "--max-seq-len 64; pass --seq-len 64 or less, or --max-seq-len 128.")),
])
def test_bad_input_is_named_by_its_flag(tmp_path, capsys, flags, message):
    assert main([*QUICK, "--out", str(tmp_path / "lm"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moekit lm train: error: ") and message in err


def test_a_usage_error_and_a_missing_subcommand_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([*QUICK, "--experts", "0"])
    assert info.value.code == 2
    assert "--experts must be > 0; got 0. Example: moekit lm train --experts 4" in \
        capsys.readouterr().err
    assert main(["lm"]) == 2
    assert "give a subcommand, e.g. `moekit lm train --quick`" in capsys.readouterr().err


def test_ctrl_c_exits_130_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    out, real_step = tmp_path / "lm", lm_train.train_step

    def interrupted(state, x_BT, y_BT):  # Ctrl-C inside step 16: the checkpoint of step 10 stands
        if state.step == 15:
            raise KeyboardInterrupt
        real_step(state, x_BT, y_BT)

    monkeypatch.setattr(lm_train, "train_step", interrupted)
    assert main([*QUICK, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the run so far is kept in" in err and "rerun with --resume" in err
    assert is_resumable(partial_folder(out)) and not out.exists()
    monkeypatch.setattr(lm_train, "train_step", real_step)
    assert main([*QUICK, "--out", str(out), "--lr", "0.01", "--resume"]) == 1
    assert "it ran with --lr 0.003, not --lr 0.01; rerun with its options, or pass --overwrite" \
        in capsys.readouterr().err
    assert main([*QUICK, "--out", str(out), "--resume"]) == 0
    assert "resumed at step 10" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 30

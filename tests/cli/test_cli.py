"""The `moekit` command: --help, --version, the demo, and usage errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import __version__, load_model
from moekit.cli import describe, main


def test_version_from_the_installed_command():
    done = subprocess.run([sys.executable, "-m", "moekit", "--version"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"moekit {__version__}"


def test_the_commands_entry_and_help_import_no_torch():
    """`from moekit.cli import main` (the console script's entry) and `moekit --help` load no torch,
    numpy aside: the command answers at once, and catches a Ctrl-C that comes while torch loads."""
    child = ("import sys; from moekit.cli import main; import moekit\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'scipy', 'sklearn', 'matplotlib', 'pandas')"
             " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "give a command, e.g. `moekit demo`" in capsys.readouterr().err


def test_bad_option_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--experts", "0"])
    assert exit_info.value.code == 2
    assert "--experts must be > 0; got 0" in capsys.readouterr().err


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--expert", "3"])
    assert exit_info.value.code == 2


def test_demo_gives_each_piece_its_own_expert(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "inactive" in printed and f"Wrote {out}/results.json" in printed
    results = json.loads((out / "results.json").read_text())
    active = [e for e in results["experts"] if e["active"]]
    # Three pieces (slopes 3, -3, 1.5 on thirds of [0, 1]): three experts, one third of rows each.
    assert len(active) == 3
    assert sorted(round(e["slope"]) for e in active) == [-3, 1, 3]
    assert all(abs(e["share"] - 1 / 3) < 0.05 for e in active)
    model = load_model(out / "model")
    assert model.config.n_experts == 4
    # the run was built beside its folder; what it records names the folder it ended in
    assert results["out"] == str(out) and model.metadata["demo"]["out"] == str(out)


def test_compare_solvers_quick_writes_the_table(tmp_path, capsys):
    out = tmp_path / "solvers"
    assert main(["compare-solvers", "--quick", "--tasks", "vowels", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient descent (paper)" in printed and "EM, Gaussian gate" in printed
    record = json.loads((out / "solvers.json").read_text())
    assert {r["solver"] for r in record["rows"]} == {"gd", "adam", "lbfgs", "em", "em_gaussian"}
    assert record["vowels_em_pass_ratio"] >= 10  # the target, on one quick run
    assert (out / "solvers.md").read_text().startswith("| task | solver |")


def test_fit_with_em_and_the_gaussian_gate(tmp_path, capsys):
    out = tmp_path / "run"
    data = Path(__file__).parents[1] / "assets" / "classes.csv"
    assert main(["fit", str(data), "--target", "label", "--experts", "3", "--solver", "em",
                 "--gate", "gaussian", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_score"] > 0.95 and summary["options"]["gate"] == "gaussian"
    curve = summary["alpha_curve"]  # alpha='auto': EM's ridge chosen like the gradient's penalty
    assert curve["alpha_candidates"] == [2.0, 0.5] and len(curve["val_loss_se"]) == 2
    assert summary["alpha"] * 72 in (2.0, 0.5)
    printed = capsys.readouterr().out  # every setting moekit chose, and why
    assert f"alpha = {summary['alpha'] * 72:g} / rows: the strongest prior within one" in printed
    assert "dtype = float64: chosen by moekit ('auto')" in printed  # EM solves in float64
    assert "early_stopping = False" in printed


def test_ctrl_c_while_a_c_extension_initialises_is_an_interrupt_not_an_internal_error():
    # pybind11 modules (parselmouth) turn a KeyboardInterrupt during their import into this
    assert describe(ImportError("KeyboardInterrupt: "), "vowels") == (
        "interrupted; nothing was written", 130)
    assert describe(ImportError("No module named 'x'"), "vowels")[0].startswith("internal error")

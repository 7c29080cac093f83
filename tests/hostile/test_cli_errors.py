"""One error boundary in the command line (issue 19, item 7): every failure is one
`moekit COMMAND: error: ...` line on stderr, exit 1 (2 for usage, 130 interrupted), no traceback
unless --debug; messages name moekit's flags and print plain values."""

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moekit.cli import main
from moekit.estimators import BaseMixtureEstimator
from moekit.io.run_folder import CHECKPOINT_DIR, MANIFEST_FILE, RESUME_FILE, partial_folder

ASSETS = Path(__file__).parents[1] / "assets"
CLASSES = ASSETS / "classes.csv"
QUICK = ["--no-progress", "--max-epochs", "30", "--experts", "2"]


@pytest.fixture
def run(run_copy):  # a copy of the package's complete fit run (conftest.py)
    return run_copy


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def the_error(capsys, command: str) -> str:
    """The one line on stderr; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moekit {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def fit(tmp_path, data, *more):
    return ["fit", str(data), "--target", "label", "--out", str(tmp_path / "out"), *QUICK, *more]


# case -> (argv from tmp_path and a copy of a complete fit run, what the line says)
CASES = {
    "a folder as the CSV": (lambda t, r: fit(t, t), "no data file at"),
    "a missing CSV": (lambda t, r: fit(t, t / "nope.csv"), "no data file at"),
    "a binary file as the CSV": (lambda t, r: fit(t, write(t / "b.csv", bytes(range(256)) * 8)),
                                 "b.csv"),
    "an empty CSV": (lambda t, r: fit(t, write(t / "e.csv", "")), "is empty"),
    "a CSV with a header only": (lambda t, r: fit(t, write(t / "h.csv", "x1,label\n")),
                                 "has a header but no data rows"),
    "a CSV that is not UTF-8": (lambda t, r: fit(t, write(t / "l.csv", b"x1,label\n1,\xe9t\xe9\n")),
                                "l.csv"),
    "no such target column": (lambda t, r: ["fit", str(CLASSES), "--target", "species", "--out",
                                            str(t / "o"), *QUICK], "no target column 'species'"),
    "--out is a file": (lambda t, r: ["fit", str(CLASSES), "--target", "label", "--out",
                                      str(write(t / "f", "x")), *QUICK],
                        "is a file; give a folder"),
    "--out under a file": (lambda t, r: ["fit", str(CLASSES), "--target", "label", "--out",
                                         str(write(t / "f", "x") / "run"), *QUICK],
                           "it is a file, not a folder"),
    "--out in /proc": (lambda t, r: ["fit", str(CLASSES), "--target", "label", "--out", "/proc/x",
                                     *QUICK], "--out /proc/x cannot be written"),
    "--out holds a run": (lambda t, r: ["fit", str(CLASSES), "--target", "label", "--out", str(r),
                                        *QUICK], "pass --overwrite"),
    "demo --out is a file": (lambda t, r: ["demo", "--out", str(write(t / "f", "x"))],
                             "--out"),
    "predict: no run folder": (lambda t, r: ["predict", str(t / "nowhere"), str(CLASSES)],
                               "no run folder at"),
    "predict: a file as the run": (lambda t, r: ["predict", str(CLASSES), str(CLASSES)],
                                   "no run folder at"),
    "predict: garbage config.json": (
        lambda t, r: ["predict", str(write(r / "model" / "config.json", "{not json").parents[1]),
                      str(CLASSES)], "config.json"),
    "predict: config.json not UTF-8": (
        lambda t, r: ["predict", str(write(r / "model" / "config.json", b"\xff\xfe{").parents[1]),
                      str(CLASSES)], "config.json"),
    "predict: config.json nested deeply": (
        lambda t, r: ["predict", str(write(r / "model" / "config.json",
                                           "[" * 50_000 + "]" * 50_000).parents[1]),
                      str(CLASSES)], "config.json"),
    "predict: config.json is null": (
        lambda t, r: ["predict", str(write(r / "model" / "config.json", "null").parents[1]),
                      str(CLASSES)], "config.json"),
    "predict: garbage weights": (
        lambda t, r: ["predict", str(write(r / "model" / "model.safetensors", b"garbage")
                                     .parents[1]), str(CLASSES)], "model.safetensors"),
    "predict: no model folder": (
        lambda t, r: (shutil.rmtree(r / "model"), ["predict", str(r), str(CLASSES)])[1], "model"),
    "predict: garbage summary.json": (
        lambda t, r: ["predict", str(write(r / "summary.json", "{oops").parent), str(CLASSES)],
        "summary.json' is not valid JSON"),
    "predict: garbage manifest": (
        lambda t, r: ["predict", str(write(r / MANIFEST_FILE, "[1,").parent), str(CLASSES)],
        ".moekit-run.json' is not valid JSON"),
    "predict: a vowels run": (
        lambda t, r: ["predict", str(write(r / MANIFEST_FILE, json.dumps(
            {**json.loads((r / MANIFEST_FILE).read_text()), "command": "vowels"})).parent),
            str(CLASSES)], "is a run of `moekit vowels`; this needs a run of `moekit fit`"),
    "predict: a folder as the CSV": (lambda t, r: ["predict", str(r), str(t)], "no data file at"),
    "predict: --out is a folder": (lambda t, r: ["predict", str(r), str(CLASSES), "--out", str(t)],
                                   "--out " + "{t}" + " is a folder; give the path of a file"),
    "report: its CSV is gone": (
        lambda t, r: ["report", str(r), "--data", str(t / "gone.csv")], "no data file at"),
    "analyze: not a folder": (lambda t, r: ["analyze", str(CLASSES)], "no run folder at"),
    "analyze: an empty folder": (lambda t, r: ["analyze", str((t / "e").mkdir() or t / "e")],
                                 "is not a moekit run folder: it is empty"),
    "analyze: a vowels run without results": (
        lambda t, r: ["analyze", str(write(r / MANIFEST_FILE, json.dumps(
            {"format": "moekit-run", "command": "vowels"})).parent)], "no results.json"),
    "fit --resume with other options": (
        lambda t, r: (write(partial_folder(t / "out") / CHECKPOINT_DIR / "final.pt", b"state"),
                      write(partial_folder(t / "out") / RESUME_FILE, json.dumps({"lr": 0.5})),
                      fit(t, CLASSES, "--resume"))[2],
        "cannot resume the interrupted fit"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_failure_is_one_line_with_exit_1_and_no_traceback(case, tmp_path, run, capsys):
    make_argv, says = CASES[case]
    argv = make_argv(tmp_path, run)
    assert main(argv) == 1
    assert says.format(t=tmp_path) in the_error(capsys, argv[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,says", [
    (["fit", str(CLASSES)], "the following arguments are required: --target"),
    (["fit", str(CLASSES), "--target", "label", "--experts", "many"], "--experts"),
    (["fit", str(CLASSES), "--target", "label", "--bogus"], "unrecognized arguments: --bogus"),
    (["predict", "run"], "the following arguments are required: DATA.csv"),
    (["demo", "--epochs", "0"], "--epochs must be > 0; got 0"),
])
def test_usage_errors_exit_2_with_one_error_line(argv, says, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [errors[0]] and errors[0].startswith(f"moekit {argv[0]}: error: ")
    assert says in errors[0] and "Traceback" not in err


def failing_fit(monkeypatch, error: BaseException) -> None:
    """Make every estimator fit raise ``error``, as a failure deep in the library would."""
    def fit(self, X, y):
        raise error
    monkeypatch.setattr(BaseMixtureEstimator, "fit", fit)


@pytest.mark.parametrize("error,says", [
    (RuntimeError("boom"), "internal error (RuntimeError: boom); rerun with --debug"),
    (MemoryError(), "out of memory; use fewer rows or a smaller model"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors"),
     "No space left on device: '/data/run/model.safetensors'; the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.csv"),
     "Permission denied: '/data/x.csv'; check its permissions"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
     "Is a directory: '/data'; give a file, not a folder"),
    (ValueError(f"step {np.float64(3.0)!r} and {np.int64(2)!r} with {np.True_!r}"),
     "error: step 3.0 and 2 with True"),
    (ValueError("n_experts=8 needs 8 rows; expert_hidden=3, random_state=4; "
                "the 'max_epochs' parameter must be > 0"),
     "--experts 8 needs 8 rows; --hidden 3, --seed 4; the --max-epochs option must be > 0"),
    (json.JSONDecodeError("Expecting value", "x", 0), "a file is not valid JSON"),
    (RecursionError(), "an input is nested too deeply"),
])
def test_any_error_in_the_library_is_one_line_and_writes_nothing(error, says, monkeypatch,
                                                                 tmp_path, capsys):
    failing_fit(monkeypatch, error)
    assert main(fit(tmp_path, CLASSES)) == 1
    line = the_error(capsys, "fit")
    assert says in line and "np." not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_and_says_nothing_was_written(monkeypatch, tmp_path, capsys):
    failing_fit(monkeypatch, KeyboardInterrupt())
    assert main(fit(tmp_path, CLASSES)) == 130
    assert the_error(capsys, "fit").endswith("error: interrupted; nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_a_checkpoint_keeps_the_fit_for_resume(monkeypatch, tmp_path, capsys):
    def fit_then_interrupt(self, X, y):
        write(Path(self.checkpoint) / "final.pt", b"state at epoch 10")
        raise KeyboardInterrupt
    monkeypatch.setattr(BaseMixtureEstimator, "fit", fit_then_interrupt)
    assert main(fit(tmp_path, CLASSES)) == 130
    line = the_error(capsys, "fit")
    assert "interrupted; the run so far is kept in" in line and "--resume" in line
    assert (partial_folder(tmp_path / "out") / CHECKPOINT_DIR / "final.pt").is_file()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, monkeypatch, tmp_path, capsys):
    failing_fit(monkeypatch, RuntimeError("boom"))
    argv = fit(tmp_path, CLASSES)
    assert main(["--debug", *argv] if where == "before" else [*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("moekit fit: error: internal error")

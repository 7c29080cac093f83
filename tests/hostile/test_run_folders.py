"""Hostile run folders: names and paths that lead out of the run, interrupted and half-written runs,
stale files of a replaced run, leftovers of killed writes, an output folder that cannot be written,
and a fit killed with SIGKILL then resumed (issue 19, items 1 and 5)."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.io.models import save_model
from moekit.io.run_folder import MANIFEST_FILE, partial_folder, write_manifest
from moekit.nn.dense import MixtureOfExperts

ASSETS = Path(__file__).parents[1] / "assets"
CLASSES, WITH_TEXT = ASSETS / "classes.csv", ASSETS / "classes_with_text.csv"
QUICK = ["--no-progress", "--max-epochs", "60", "--experts", "2"]


def files_under(folder: Path, *, skip: Path | None = None) -> set[str]:
    """Every file and link below ``folder`` (hidden ones included), except under ``skip``."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if (p.is_file() or p.is_symlink()) and not (skip and p.is_relative_to(skip))}


def one_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]



# --- a `moekit vowels` run folder whose results.json names hostile paths ------------------------

def vowels_run(folder: Path, **entry) -> Path:
    """A complete vowels run holding one small saved mixture; ``entry`` overrides its record."""
    model = MixtureOfExperts(2, 4, 2, generator=torch.Generator().manual_seed(0))
    save_model(model, folder / "models" / "2_experts")
    record = {"name": "2_experts", "system": "2 Experts", "run": 0, "lr": 4.0,
              "path": "models/2_experts", "reference": None, "history": None, **entry}
    analysis = {"split": "train", "include_speaker_76": False, "models": [record]}
    (folder / "results.json").write_text(json.dumps({"analysis": analysis}))
    write_manifest(folder, "vowels")
    return folder


@pytest.fixture
def nest(tmp_path):
    """tmp/a/b/run: a run two levels down, so that '../../x' lands inside tmp (and is seen)."""
    run = tmp_path / "a" / "b" / "run"
    run.mkdir(parents=True)
    return run


def analyze_refused(capsys, run: Path, root: Path, *needles: str) -> None:
    before = files_under(root, skip=run / "analysis")
    assert main(["analyze", str(run)]) == 1
    one_error(capsys, *needles)
    assert files_under(root, skip=run / "analysis") == before, "nothing written outside"
    assert not (run / "analysis").exists()


def test_a_clean_vowels_run_analyses(nest, capsys):
    vowels_run(nest)
    assert main(["analyze", str(nest)]) == 0
    assert (nest / "analysis" / "2_experts" / "analysis.json").is_file()


def test_a_model_name_with_dot_dot_is_refused(nest, tmp_path, capsys):
    vowels_run(nest, name="../../x")
    analyze_refused(capsys, nest, tmp_path, "analysis.models[0].name in",
                    "results.json' must be a plain name", "'../../x'")
    assert not (tmp_path / "a" / "b" / "x").exists()  # where analysis/../../x leads


def test_a_model_path_with_dot_dot_is_refused(nest, tmp_path, capsys):
    save_model(MixtureOfExperts(2, 4, 2), tmp_path / "x")
    vowels_run(nest, path="../../../x")
    analyze_refused(capsys, nest, tmp_path, "analysis.models[0].path in",
                    "is '../../../x': it must be a relative path without '..'")


def test_an_absolute_model_path_is_refused(nest, tmp_path, capsys):
    save_model(MixtureOfExperts(2, 4, 2), tmp_path / "x")
    vowels_run(nest, path=str(tmp_path / "x"))
    analyze_refused(capsys, nest, tmp_path, "analysis.models[0].path in",
                    "it must be a relative path")


def test_a_model_path_through_a_link_out_is_refused(nest, tmp_path, capsys):
    save_model(MixtureOfExperts(2, 4, 2), tmp_path / "elsewhere" / "m")
    vowels_run(nest)
    (nest / "models" / "linked").symlink_to(tmp_path / "elsewhere")
    record = json.loads((nest / "results.json").read_text())
    record["analysis"]["models"][0]["path"] = "models/linked/m"
    (nest / "results.json").write_text(json.dumps(record))
    analyze_refused(capsys, nest, tmp_path, "a link leading outside the run folder")


@pytest.mark.parametrize("field,value", [("reference", "../../../etc"), ("history", "/etc/passwd")])
def test_a_reference_or_history_leading_out_is_refused(nest, tmp_path, capsys, field, value):
    vowels_run(nest, **{field: value})
    analyze_refused(capsys, nest, tmp_path, f"analysis.models[0].{field} in")


@pytest.mark.parametrize("field,value,want", [("lr", "fast", "must be a number"),
                                              ("run", 0.5, "must be a whole number"),
                                              ("system", None, "must be text")])
def test_a_malformed_model_record_names_the_file_and_field(nest, tmp_path, capsys, field, value,
                                                           want):
    vowels_run(nest, **{field: value})
    analyze_refused(capsys, nest, tmp_path, f"analysis.models[0].{field} in", want)


def test_an_analysis_folder_linked_out_of_the_run_is_refused(nest, tmp_path, capsys):
    vowels_run(nest)
    (tmp_path / "elsewhere").mkdir()
    (nest / "analysis").symlink_to(tmp_path / "elsewhere")
    assert main(["analyze", str(nest)]) == 1
    one_error(capsys, "the analysis folder", "a link leading outside the run folder")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_model_folder_linked_out_of_a_fit_run_is_refused(run_copy, tmp_path, capsys):
    shutil.move(run_copy / "model", tmp_path / "model_elsewhere")
    (run_copy / "model").symlink_to(tmp_path / "model_elsewhere")
    assert main(["predict", str(run_copy), str(CLASSES)]) == 1
    one_error(capsys, "the model folder", "a link leading outside the run folder")


def test_a_summary_whose_data_is_not_a_path_is_refused(run_copy, capsys):
    summary = json.loads((run_copy / "summary.json").read_text())
    (run_copy / "summary.json").write_text(json.dumps({**summary, "data": ["../../x"]}))
    assert main(["report", str(run_copy)]) == 1
    one_error(capsys, "summary.json' is not a `moekit fit` summary")


# --- complete runs only -----------------------------------------------------------------------

def test_the_data_path_is_recorded_absolute_so_report_works_from_any_folder(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(ASSETS)
    assert main(["fit", "classes.csv", "--target", "label", "--out", str(tmp_path / "run"),
                 *QUICK]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"] == str(CLASSES)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run"]) == 0


def test_a_run_without_its_manifest_is_not_used(run_copy, capsys):
    (run_copy / MANIFEST_FILE).unlink()  # as a run killed before its end would be
    for argv in (["predict", str(run_copy), str(CLASSES)], ["report", str(run_copy)],
                 ["analyze", str(run_copy)]):
        assert main(argv) == 1
        one_error(capsys, "is not a complete moekit run: it has no manifest", "--overwrite")


def test_a_half_written_run_is_not_used(run_copy, capsys):
    (run_copy / MANIFEST_FILE).unlink()
    (run_copy / "summary.json").unlink()
    shutil.rmtree(run_copy / "analysis")
    assert main(["predict", str(run_copy), str(CLASSES)]) == 1
    one_error(capsys, "is not a complete moekit run")


def test_a_killed_fit_leaves_no_run_and_points_at_resume(tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = partial_folder(out) / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "final.pt").write_bytes(b"state at epoch 40")
    for argv in (["predict", str(out), str(CLASSES)], ["report", str(out)],
                 ["analyze", str(out)]):
        assert main(argv) == 1
        one_error(capsys, "no run folder at", "an interrupted run left its work in", "--resume")
    assert main(["predict", str(partial_folder(out)), str(CLASSES)]) == 1
    one_error(capsys, "is not a complete moekit run")
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(out), *QUICK]) == 1
    one_error(capsys, "pass --resume to continue it, or --overwrite to start again")
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(out), "--overwrite",
                 *QUICK]) == 0
    assert sorted(os.listdir(tmp_path)) == ["run"]  # the partial run was discarded


def test_overwrite_killed_between_its_renames_leaves_a_whole_run(fit_run, tmp_path, capsys):
    """Without renameat2 the swap is two renames; killed between them, the old run waits whole in
    .run.old and the new one in .run.partial (manifest written): neither is mixed with the other,
    and the next run clears both."""
    out = tmp_path / "run"
    shutil.copytree(fit_run, tmp_path / ".run.old")
    shutil.copytree(fit_run, partial_folder(out))
    assert main(["predict", str(out), str(CLASSES)]) == 1
    one_error(capsys, "no run folder at")
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(out), *QUICK]) == 0
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_overwrite_leaves_no_stale_file_of_the_old_run(fit_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(fit_run, out)
    assert (out / "figures" / "gate_partition.png").is_file()  # 2 inputs: the partition figure
    (out / "figures" / "from_an_old_version.png").write_bytes(b"png")
    assert main(["fit", str(WITH_TEXT), "--target", "label", "--one-hot", "--out", str(out),
                 "--overwrite", *QUICK]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert files_under(out) == {*manifest["files"], MANIFEST_FILE}
    assert not (out / "figures" / "gate_partition.png").exists()  # 4 inputs: none
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_overwrite_refuses_a_folder_that_is_not_a_moekit_run(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(mine), "--overwrite",
                 *QUICK]) == 1
    one_error(capsys, "holds files that are not a moekit run", "choose another --out")
    assert os.listdir(mine) == ["chapter1.tex"]


def test_leftovers_of_killed_writes_are_ignored_then_cleaned(run_copy, capsys):
    leftovers = [run_copy / ".summary.json.x1y2z3w4.tmp", run_copy / ".report.html.abcdefgh.tmp",
                 run_copy / "analysis" / ".model.partial" / "analysis.json"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half")
    assert main(["predict", str(run_copy), str(CLASSES), "--out",
                 str(run_copy.parent / "p.csv")]) == 0
    assert main(["report", str(run_copy)]) == 0
    assert not any(p.exists() for p in leftovers)
    assert not (run_copy / "analysis" / ".model.partial").exists()


@pytest.mark.parametrize("kind", ["a file", "under a file", "/proc", "read-only"])
def test_an_unwritable_out_fails_before_any_training(tmp_path, capsys, monkeypatch, kind):
    from moekit.estimators import BaseMixtureEstimator

    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes in read-only folders")
    monkeypatch.setattr(BaseMixtureEstimator, "fit", lambda *a: pytest.fail("it trained"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run",
           "/proc": Path("/proc/x"), "read-only": tmp_path / "ro" / "run"}[kind]
    started = time.perf_counter()
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(out), *QUICK]) == 1
    assert time.perf_counter() - started < 1.0
    one_error(capsys, f"--out {out}")


# --- kill -9, then --resume -------------------------------------------------------------------

def moekit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "moekit", "--verbose", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return err


def kill_after_a_checkpoint(process: subprocess.Popen, checkpoint: Path, rng: random.Random,
                            after: float = 0.0) -> float:
    """SIGKILL ``process`` at a random moment after a checkpoint newer than ``after`` appears;
    returns that checkpoint's time."""
    while True:
        saved = [p.stat().st_mtime for p in checkpoint.glob("*.pt")] if checkpoint.is_dir() else []
        if saved and max(saved) > after:
            break
        assert process.poll() is None, "the fit ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.0))
    assert process.poll() is None, "the fit ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return max(saved)


@pytest.mark.slow
def test_fit_killed_twice_with_sigkill_resumes_to_bit_identical_weights(tmp_path, capsys):
    from moekit.runs.fit import ESTIMATOR_DEFAULTS

    if "checkpoint" not in ESTIMATOR_DEFAULTS:
        pytest.skip("the estimators have no checkpoint parameter yet")
    gen = np.random.default_rng(0)
    x_ND = gen.normal(size=(600, 4))
    frame = pd.DataFrame(x_ND, columns=["x1", "x2", "x3", "x4"])
    frame["label"] = np.array(["a", "b", "c"])[(x_ND[:, 0] > 0) * 1 + (x_ND[:, 1] > 0.5)]
    data = tmp_path / "d.csv"
    frame.to_csv(data, index=False)
    options = [str(data), "--target", "label", "--experts", "3", "--alpha", "0.001",
               "--max-epochs", "300", "--no-progress", "--seed", "3"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    finish(moekit("fit", *options, "--out", str(reference)))

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    checkpoint = partial_folder(out) / "checkpoint"
    first = kill_after_a_checkpoint(moekit("fit", *options, "--out", str(out)), checkpoint, rng)
    assert not out.exists(), f"seed {seed}: a killed fit must not look like a run"
    assert main(["predict", str(out), str(data)]) == 1
    one_error(capsys, "no run folder at", "--resume")
    kill_after_a_checkpoint(moekit("fit", *options, "--out", str(out), "--resume"), checkpoint,
                            rng, after=first)
    log = finish(moekit("fit", *options, "--out", str(out), "--resume"))
    # it went on from the checkpoint (an uninterrupted rerun would give the same weights too)
    assert re.search(r"continuing from epoch [1-9]", log), log

    want = load_file(str(reference / "model" / "model.safetensors"))
    got = load_file(str(out / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"seed {seed}: {name} differs"
    assert sorted(os.listdir(tmp_path)) == ["d.csv", "killed", "reference"]
    assert not (out / "checkpoint").exists()

"""Run folders swapped in with one rename and marked complete by a manifest written last,
leftovers of killed writes cleaned (`moekit.io.run_folder`)."""

import json
import os

import pytest

from moekit.exceptions import DataError
from moekit.io import run_folder as run_folders
from moekit.io.run_folder import (
    CHECKPOINT_DIR,
    MANIFEST_FILE,
    RESUME_FILE,
    check_run_destination,
    clean_leftovers,
    folder_built_whole,
    partial_folder,
    require_manifest,
    run_folder,
    swap_in,
    write_manifest,
)

# --- folders built whole -------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_swap_in_replaces_the_whole_folder(tmp_path, monkeypatch, exchange, tree):
    if not exchange:
        monkeypatch.setattr(run_folders, "_renameat2", lambda: None)
    out, built = tmp_path / "run", tmp_path / ".run.partial"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "old.txt").write_text("old")
    built.mkdir()
    (built / "new.txt").write_text("new")
    swap_in(built, out)
    assert tree(tmp_path) == {"run/new.txt": "new"}


def test_folder_built_whole_leaves_the_old_folder_on_error(tmp_path, tree, fail_while_writing):
    out = tmp_path / "analysis" / "model"
    out.mkdir(parents=True)
    (out / "analysis.json").write_text("old")
    with pytest.raises(RuntimeError):
        fail_while_writing(folder_built_whole(out), {"analysis.json": "half"},
                           RuntimeError("killed"))
    assert tree(tmp_path) == {"analysis/model/analysis.json": "old"}
    with folder_built_whole(out) as build:
        (build / "figure.png").write_text("new")
    assert tree(tmp_path) == {"analysis/model/figure.png": "new"}


def test_run_folder_writes_the_manifest_last_and_swaps_the_run_in(tmp_path, siblings):
    out = tmp_path / "a" / "run"
    with run_folder(out, "demo") as build:
        assert build == partial_folder(out.resolve()) and not out.exists()
        (build / "results.json").write_text("{}")
        (build / CHECKPOINT_DIR).mkdir()
        (build / CHECKPOINT_DIR / "final.pt").write_text("state")
        (build / RESUME_FILE).write_text("{}")
    assert siblings(out) == ["run"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["command"] == "demo" and manifest["files"] == ["results.json"]
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, "results.json"]  # no scratch left
    assert require_manifest(out, ("demo",), "moekit demo")["format"] == "moekit-run"


def test_run_folder_removes_what_it_made_when_the_run_fails(tmp_path, fail_while_writing):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="bad data"):
        fail_while_writing(run_folder(out, "fit"), {"summary.json": "{}"}, ValueError("bad data"))
    assert os.listdir(tmp_path) == []


def test_overwrite_leaves_no_file_of_the_old_run(tmp_path, tree, siblings):
    out = tmp_path / "run"
    with run_folder(out, "fit") as build:
        (build / "figures").mkdir()
        (build / "figures" / "gate_partition.png").write_text("old")
        (build / "summary.json").write_text("old")
    with pytest.raises(DataError, match=r"already holds files; pass overwrite=True"):
        check_run_destination(out)
    with run_folder(out, "fit", overwrite=True) as build:
        (build / "summary.json").write_text("new")
    assert set(tree(out)) == {MANIFEST_FILE, "summary.json"}
    assert (out / "summary.json").read_text() == "new" and siblings(out) == ["run"]


def test_overwrite_replaces_only_a_moekit_run(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    with pytest.raises(DataError, match=r"holds files that are not a moekit run \(e\.g\. "
                                        r"'chapter1\.tex'\)"):
        check_run_destination(mine, overwrite=True)
    assert (mine / "chapter1.tex").read_text() == "precious"
    older = tmp_path / "older"
    older.mkdir()
    (older / "summary.json").write_text("{}")  # an older moekit's run, without a manifest
    check_run_destination(older, overwrite=True, older=("summary.json", "model"))


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(tmp_path, siblings):
    out = tmp_path / "run"
    (tmp_path / ".run.partial").mkdir()  # killed before any checkpoint: nothing to resume
    (tmp_path / ".run.partial" / "summary.json").write_text("half")
    (tmp_path / ".run.old").mkdir()  # killed while a replaced run was being deleted
    with run_folder(out, "fit") as build:
        (build / "summary.json").write_text("new")
    assert siblings(out) == ["run"]


def test_a_checkpoint_left_by_a_killed_run_is_resumed_or_refused(tmp_path, tree):
    out, build = tmp_path / "run", tmp_path / ".run.partial"
    (build / CHECKPOINT_DIR).mkdir(parents=True)
    (build / CHECKPOINT_DIR / "final.pt").write_text("epoch 40")
    (build / ".summary.json.abcd1234.tmp").write_text("half")  # a killed atomic write
    with pytest.raises(DataError, match=r"pass resume=True to continue it, or overwrite=True"):
        check_run_destination(out)
    with run_folder(out, "fit", resume=True) as kept:
        assert tree(kept) == {"checkpoint/final.pt": "epoch 40"}
        (kept / "summary.json").write_text("done")
    assert set(tree(out)) == {MANIFEST_FILE, "summary.json"}


def test_overwrite_discards_a_checkpoint_left_by_a_killed_run(tmp_path, tree):
    out, build = tmp_path / "run", tmp_path / ".run.partial"
    (build / CHECKPOINT_DIR).mkdir(parents=True)
    (build / CHECKPOINT_DIR / "final.pt").write_text("epoch 40")
    with run_folder(out, "fit", overwrite=True) as fresh:
        assert tree(fresh) == {}


def test_an_interrupted_run_with_a_checkpoint_is_kept_for_resume(tmp_path, fail_while_writing):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as info:
        fail_while_writing(run_folder(out, "fit"), {"checkpoint/final.pt": "epoch 40"},
                           KeyboardInterrupt())
    assert "rerun with --resume (resume=True in Python)" in info.value.__notes__[0]
    assert not out.exists() and (partial_folder(out) / CHECKPOINT_DIR / "final.pt").is_file()


def test_clean_leftovers_removes_only_what_killed_writes_left(tmp_path, tree):
    keep = {"report.html": "r", "analysis/model/analysis.json": "a", ".moekit-run.json": "m",
            "model/config.json": "c"}
    for name, text in keep.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for name in (".report.html.k3j_9xq2.tmp", "analysis/.model.partial/x.png",
                 "analysis/.model.old/y.png", "model/.config.json.abcdefgh.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("half")
    assert len(clean_leftovers(tmp_path)) == 4
    assert tree(tmp_path) == keep


def test_require_manifest_refuses_incomplete_foreign_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="is not a moekit run folder: it is empty"):
        require_manifest(tmp_path, ("fit",), "moekit fit")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(DataError, match=r"is not a complete moekit run: it has no manifest "
                                        r"\(\.moekit-run\.json\), so it was interrupted"):
        require_manifest(tmp_path, ("fit",), "moekit fit")
    (tmp_path / MANIFEST_FILE).write_text('{"format": "other"}')
    with pytest.raises(DataError, match="is not a moekit run manifest"):
        require_manifest(tmp_path, ("fit",), "moekit fit")
    write_manifest(tmp_path, "vowels")
    with pytest.raises(DataError, match=r"is a run of `moekit vowels`; this needs a run of "
                                        r"`moekit fit`"):
        require_manifest(tmp_path, ("fit",), "moekit fit")

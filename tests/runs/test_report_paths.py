"""A `moekit fit` run read back from any folder: report and analyze find the CSV by its absolute
path, and a CSV that is gone is an error that says to pass data= (--data)."""

import json
import shutil
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.exceptions import DataError
from moekit.runs import analyze_run, load_run_data, report_run
from moekit.runs.fit import FitRunConfig, run_fit

CLASSES = Path(__file__).parents[1] / "assets" / "classes.csv"
pytestmark = pytest.mark.filterwarnings("ignore::moekit.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run fitted from the data's own folder, on the CSV named by a relative path."""
    home = tmp_path_factory.mktemp("home")
    shutil.copy(CLASSES, home / "classes.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        run_fit(FitRunConfig(data="classes.csv", target="label", out="run", n_experts=2,
                             expert="linear", alpha=0.01, max_epochs=20, progress=False))
    return home / "run"


def test_report_and_analyze_from_another_folder(run, tmp_path, monkeypatch):
    recorded = json.loads((run / "summary.json").read_text())["data"]
    assert Path(recorded) == (run.parent / "classes.csv").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run / "report.html").unlink()
    assert report_run(run) == run / "report.html" and (run / "report.html").is_file()
    assert [m.name for m in analyze_run(run)] == ["model"]
    assert load_run_data(run).source == recorded
    assert list(elsewhere.iterdir()) == []  # nothing written where the commands ran


def test_a_gone_csv_says_to_pass_data(run, tmp_path, monkeypatch, capsys):
    moved = shutil.copytree(run, tmp_path / "run")
    summary = json.loads((moved / "summary.json").read_text())
    summary["data"] = str(tmp_path / "gone" / "classes.csv")
    (moved / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no data file at '.*gone/classes\.csv', the CSV file "
                                        r"the run in .* was fitted on: it was moved or deleted\. "
                                        r"Pass data='DATA\.csv' with its new place"):
        report_run(moved)
    with pytest.raises(DataError, match=r"Pass data='DATA\.csv'"):
        analyze_run(moved)
    assert main(["report", str(moved)]) != 0
    assert "--data" in capsys.readouterr().err
    # given its new place, the report is written
    assert report_run(moved, data=str(CLASSES)).is_file()


def test_an_older_runs_relative_path_is_read_from_the_current_folder(run, tmp_path, monkeypatch):
    moved = shutil.copytree(run, tmp_path / "run")
    summary = json.loads((moved / "summary.json").read_text())
    summary["data"] = "classes.csv"  # as an older moekit recorded it
    (moved / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="recorded relative to the folder `moekit fit` ran in"):
        load_run_data(moved)
    shutil.copy(CLASSES, tmp_path / "classes.csv")
    assert load_run_data(moved).source == str((tmp_path / "classes.csv").resolve())

"""One complete `moekit fit` run shared by the hostile tests of run folders and CLI errors; each
test damages a copy of it."""

import shutil
from pathlib import Path

import pytest

from moekit.cli import main

CLASSES = Path(__file__).parents[1] / "assets" / "classes.csv"


@pytest.fixture(scope="package")
def fit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    argv = ["fit", str(CLASSES), "--target", "label", "--out", str(out), "--no-progress",
            "--max-epochs", "60", "--experts", "2"]
    assert main(argv) == 0
    return out


@pytest.fixture
def run_copy(fit_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(fit_run, copy, symlinks=True)
    return copy

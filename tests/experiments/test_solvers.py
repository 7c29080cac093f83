"""The solver comparison: every solver runs on the same starts, passes are counted as documented,
the table reads right, and on the vowels EM beats the paper's descent by 10x in passes."""

import dataclasses
import json

import pytest

from moekit.data.vowels import vowel_task
from moekit.experiments.solver_config import SOLVERS, SolverRow, SolversConfig, quick_config
from moekit.experiments.solvers import (
    compare_solvers,
    comparison_record,
    format_table,
    pass_ratio,
    write_comparison,
)


@pytest.fixture(scope="module")
def piecewise_rows():
    return compare_solvers(quick_config(tasks=("piecewise",)))


def test_quick_regression_comparison(piecewise_rows):
    assert [row.solver for row in piecewise_rows] == list(SOLVERS)
    for row in piecewise_rows:
        assert row.task == "piecewise" and row.runs == 1 and row.score == "mse"
        assert len(row.passes_R) == len(row.iterations_R) == 1
        assert row.seconds > 0 and row.train_score > 0 and row.test_score > 0
        assert (row.passes is None) == (row.reached == 0)
        if row.reached:  # a run that reached the criterion has training mse at most 0.01
            assert row.train_score <= 0.01
            assert row.passes == row.passes_R[0]
        assert row.sweeps_R[0] >= row.passes_R[0]
    by = {row.solver: row for row in piecewise_rows}
    # Gradient solvers make one pass per epoch, L-BFGS at least one; EM a pass per E-step and one
    # per Newton trial of the gate, so at least two per iteration; the Gaussian gate's EM one.
    assert by["gd"].passes_R == by["gd"].iterations_R
    assert by["adam"].passes_R == by["adam"].iterations_R
    assert by["lbfgs"].passes_R[0] >= by["lbfgs"].iterations_R[0]
    assert by["em"].passes_R[0] >= 2 * by["em"].iterations_R[0] + 1
    assert by["em_gaussian"].passes_R[0] == by["em_gaussian"].iterations_R[0] + 1
    assert by["em"].reached == by["em_gaussian"].reached == 1


def test_table(piecewise_rows):
    table = format_table(piecewise_rows)
    lines = table.splitlines()
    assert lines[0].startswith("| task | solver | setting | reached | passes to criterion")
    assert len([line for line in lines if line.startswith("| piecewise")]) == len(SOLVERS)
    assert "| EM, Gaussian gate | analytic M-steps |" in table
    assert "gradient descent (paper)" in table


def test_vowels_em_needs_ten_times_fewer_passes_than_the_paper():
    # One run from the vowels module's first start: gradient descent at its chosen step (4.0) takes
    # a few hundred epochs to the 0.08 criterion; EM takes three iterations.
    rows = compare_solvers(quick_config(tasks=("vowels",), solvers=("gd", "em", "em_gaussian")),
                           task=vowel_task())
    by = {row.solver: row for row in rows}
    assert all(row.reached == 1 for row in rows)
    assert by["gd"].setting == "lr=4"
    ratio = pass_ratio(rows, "vowels")
    assert ratio >= 10, format_table(rows)
    assert by["em"].test_score > 85.0  # accuracy % at the stopping point
    assert "EM reaches the criterion in" in format_table(rows)


def test_pass_ratio_worked_example():
    def row(solver, passes):
        return SolverRow(task="t", solver=solver, setting="", runs=1,
                         reached=int(passes is not None), passes=passes, seconds=1.0,
                         train_score=0.0, test_score=0.0, score="mse")

    assert pass_ratio([row("gd", 300.0), row("em", 10.0)], "t") == 30.0
    assert pass_ratio([row("gd", None), row("em", 10.0)], "t") is None
    assert pass_ratio([row("em", 10.0)], "t") is None
    assert pass_ratio([row("gd", 300.0), row("em", 10.0)], "other") is None


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ("vowels", "xor")}, r"SolversConfig: tasks must be one of 'vowels', 'piecewise'"),
    ({"solvers": ("sgd",)}, r"SolversConfig: solvers must be one of 'gd', 'adam'"),
    ({"runs": 0}, r"SolversConfig: runs must be an integer >= 1; got runs=0"),
    ({"adam_lr_grid": ()}, r"SolversConfig: adam_lr_grid must hold at least one step"),
    ({"regression_criterion": -1.0}, r"regression_criterion must be a finite number > 0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolversConfig(**kwargs)


def test_comparison_record_is_what_write_comparison_writes(piecewise_rows, tmp_path, monkeypatch):
    config = quick_config(tasks=("piecewise",))
    record = comparison_record(config, piecewise_rows)
    assert list(record) == ["config", "rows", "vowels_em_pass_ratio"]
    assert record["config"] == dataclasses.asdict(config)
    assert record["rows"] == [dataclasses.asdict(row) for row in piecewise_rows]
    assert record["vowels_em_pass_ratio"] is None  # the vowels were not run
    monkeypatch.setattr("moekit.experiments.solvers.compare_solvers", lambda _: piecewise_rows)
    _, files = write_comparison(config, tmp_path)
    assert json.loads(files[0].read_text()) == json.loads(json.dumps(record))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left

"""benchmarks/tabular.py's bookkeeping: cells into rows, verdicts on shared folds, resuming."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tabular

MOE, MLP = "moekit MoE, defaults (4 MLP experts)", "MLPClassifier"


def cell(model: str, seed: int, scores: list[float], data: str = "iris") -> dict[str, object]:
    return {"data": data, "seed": seed, "model": model, "rows": 150, "features": 4,
            "metric": "accuracy", "fold_scores": scores, "fit_times": [1.0] * len(scores)}


def test_rows_join_the_cells_of_the_chosen_seeds_in_order():
    cells = [cell(MOE, 0, [0.9, 1.0]), cell(MLP, 0, [0.8, 0.8]), cell(MOE, 10, [0.7, 0.7]),
             cell(MOE, 1, [0.0, 0.0])]  # seed 1 is not asked for
    rows = tabular.table_rows(cells, [0, 10])
    assert [r["model"] for r in rows] == [MOE, MLP]
    assert rows[0]["seeds"] == [0, 10]
    assert rows[0]["fold_scores"] == [0.9, 1.0, 0.7, 0.7]
    assert rows[0]["mean"] == pytest.approx(0.825)
    assert rows[0]["fit_seconds"] == pytest.approx(1.0)


def test_verdicts_compare_only_the_folds_both_models_ran():
    # the mixture has finished seed 10 as well, the MLP only seed 0: seed 10 must not count
    rows = tabular.table_rows([cell(MOE, 0, [0.9, 0.9]), cell(MLP, 0, [0.8, 1.0]),
                               cell(MOE, 10, [0.0, 0.0])], [0, 10])
    (line,) = tabular.verdicts(rows)
    assert "2 folds" in line and "0.9000 matches or beats" in line and "+0.0000" in line


def test_verdict_says_below_when_the_mixture_trails_by_more_than_the_tolerance():
    rows = tabular.table_rows([cell(MOE, 0, [0.9, 0.9]), cell(MLP, 0, [0.91, 0.91])], [0])
    (line,) = tabular.verdicts(rows)
    assert "is below" in line


def test_resume_runs_no_cell_that_is_already_done():
    names = [*tabular.CLASSIFICATION, *tabular.REGRESSION]
    done = [cell(model, 0, [1.0] * 5, data)
            for data in names
            for model in tabular._models(data in tabular.CLASSIFICATION, 0, False)]
    seen = []
    cells = tabular.run(5, [0], [], done, seen.append)
    assert cells == done and seen == []


def test_earlier_cells_refuse_a_run_with_other_folds(tmp_path):
    path = tmp_path / "tabular.json"
    assert tabular._earlier_cells(path, 5) == []  # nothing yet: start afresh
    path.write_text(json.dumps({"folds": 3, "cells": [cell(MOE, 0, [1.0])]}))
    with pytest.raises(SystemExit, match="folds=3"):
        tabular._earlier_cells(path, 5)
    path.write_text(json.dumps({"folds": 5, "cells": [cell(MOE, 0, [1.0])]}))
    assert tabular._earlier_cells(path, 5)[0]["model"] == MOE


def test_the_default_row_chooses_alpha_and_the_tuned_mixture_keeps_the_fixed_prior():
    models = tabular._models(True, 0, True)
    assert models[MOE].get_params()["alpha_candidates"] == (2.0, 0.5)
    tuned = models["moekit MoE, tuned (experts, hidden, lr; alpha 2 / n)"]
    assert tuned.estimator.get_params()["alpha_candidates"] == (2.0,)
    assert tuned.estimator.get_params()["random_state"] == 0

"""benchmarks/tabular_speed.py's bookkeeping: cell keys and resume, the markdown table, the data
loaders' shapes and targets, and the time cap killing a child."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tabular_speed

CHOICES = [{"setting": "dtype", "value": "float32", "why": "..."},
           {"setting": "batch_size", "value": 256, "why": "..."},
           {"setting": "early_stopping", "value": True, "why": "..."}]


def cell(table: str, model: str, status: str = "ok", **values: object) -> dict[str, object]:
    out = {"table": table, "model": model, "model_name": tabular_speed.MODELS[model],
           "task": "regress", "metric": "R^2", "status": status, "rows": 220, "features": 14,
           "child_seconds": 30.0, "child_cpu_seconds": 25.0, "child_peak_mb_kernel": 500.0,
           "load_before": [0.5, 0.4, 0.3], "load_after": [1.5, 0.6, 0.4], "max_seconds": 900.0,
           "max_mb": 18000.0, "threads_at_start": 2}
    if status == "ok":
        out.update(fit_seconds=10.0, score=0.9, peak_mb=480.0, peak_mb_before_fit=440.0,
                   attributes={"n_iter_": 69, "n_experts_": 4, "stop_reason_": "patience",
                               "threads_": 1, "choices_": CHOICES},
                   threadpools={"openmp": 2}, warnings=[])
    out.update(values)
    return out


def test_synthetic_expands_to_one_table_per_size_and_unknown_names_are_refused():
    names = tabular_speed.table_names(["grunfeld", "synthetic", "synthetic_500"], [100, 500])
    assert names == ["grunfeld", "synthetic_100", "synthetic_500"]  # no duplicate
    with pytest.raises(ValueError, match="unknown table 'iris'"):
        tabular_speed.table_names(["iris"], [])


def test_pending_skips_finished_cells_and_reruns_failed_or_shorter_capped_ones():
    done = [cell("grunfeld", "mlp"),
            cell("grunfeld", "hgb", "failed"),
            cell("grunfeld", "moekit", "did not finish", max_seconds=120.0),
            cell("penguins", "moekit", "did not finish", max_seconds=900.0)]
    todo = tabular_speed.pending(["grunfeld", "penguins"], ["moekit", "mlp", "hgb"], done, 900.0)
    # grunfeld/mlp finished; penguins/moekit was killed at the same cap: both stand
    assert todo == [("grunfeld", "moekit"), ("grunfeld", "hgb"), ("penguins", "mlp"),
                    ("penguins", "hgb")]
    # under a 120 s cap the killed grunfeld cell stands too
    assert ("grunfeld", "moekit") not in tabular_speed.pending(["grunfeld"], ["moekit"], done,
                                                               120.0)


def test_merge_replaces_a_rerun_cell_in_place():
    cells = [cell("a", "mlp"), cell("a", "hgb", "failed"), cell("b", "mlp")]
    merged = tabular_speed.merge(cells, cell("a", "hgb", score=0.5))
    assert [tabular_speed.cell_key(c) for c in merged] == [("a", "mlp"), ("a", "hgb"), ("b", "mlp")]
    assert merged[1]["status"] == "ok" and merged[1]["score"] == 0.5
    assert tabular_speed.merge(merged, cell("c", "mlp"))[-1]["table"] == "c"


def test_earlier_record_refuses_another_split(tmp_path):
    path = tmp_path / "speed.json"
    assert tabular_speed.earlier_record(path) == {}
    path.write_text(json.dumps({"protocol": {**tabular_speed.protocol(), "split_seed": 1},
                                "cells": []}))
    with pytest.raises(SystemExit, match="split_seed"):
        tabular_speed.earlier_record(path)
    path.write_text(json.dumps({"protocol": tabular_speed.protocol(),
                                "cells": [cell("a", "mlp")]}))
    assert tabular_speed.earlier_record(path)["cells"][0]["model"] == "mlp"


def test_markdown_puts_the_models_side_by_side_with_the_ratio_to_the_mlp():
    record = {"cells": [cell("grunfeld", "moekit", fit_seconds=40.0),
                        cell("grunfeld", "mlp", fit_seconds=0.5),
                        cell("synthetic_1000000", "moekit", "did not finish"),
                        cell("synthetic_1000000", "mlp", fit_seconds=90.0)],
              "machine": {"platform": "Linux", "cores_usable": 2, "torch_threads": 2},
              "baseline": {"status": "ok", "peak_mb": 431.9, "child_seconds": 3.2}}
    text = tabular_speed.markdown(record)
    lines = text.splitlines()
    assert lines[2] == ("| table (rows × features, score) | moekit fit (defaults) | "
                        "MLP (scaled, defaults) | moekit default / MLP fit time |")
    # 40 s / 0.5 s = 80x; killed at 900 s against the MLP's 90 s: more than 10x
    assert lines[4] == ("| grunfeld (220 × 14, R^2) | 40.0 s, 0.900, 480 MB | "
                        "0.50 s, 0.900, 480 MB | 80.0x |")
    assert lines[5] == ("| synthetic_1000000 (220 × 14, R^2) | did not finish within 900 s | "
                        "90.0 s, 0.900, 480 MB | > 10x |")
    assert ("| grunfeld | moekit fit (defaults) | 40.0 s | 30.0 s / 25.0 s | 440 → 480 MB | 69 | "
            "4 | patience | float32, batch 256, early stopping | 1 |  | 0.50 → 1.50 |") in lines
    # scikit-learn's threads are its largest thread pool's; a killed cell shows its status
    mlp = cell("grunfeld", "mlp", warnings=["ConvergenceWarning: Maximum iterations (200)"],
               attributes={"n_iter_": 200})
    assert tabular_speed._threads(mlp) == "2"
    assert tabular_speed._warnings(mlp) == "ConvergenceWarning"
    assert ("| synthetic_1000000 | moekit fit (defaults) | did not finish | 30.0 s / 25.0 s | "
            "500 MB |") in text
    assert "A child that only imports peaks at 432 MB" in text


# The offline tables come from the bench extra, which CI's `make setup` does not install.
SOURCE_PACKAGE = {"star98": "statsmodels", "grunfeld": "statsmodels", "fair": "statsmodels",
                  "penguins": "palmerpenguins"}


@pytest.mark.parametrize("name, shape, task, labels", [
    ("star98", (303, 20), "regress", None),
    ("grunfeld", (220, 14), "regress", None),
    ("penguins", (333, 10), "classify", ["Adelie", "Chinstrap", "Gentoo"]),
    ("fair", (6366, 8), "classify", [0, 1]),
    ("synthetic_200", (200, 8), "regress", None),
])
def test_loaders_return_the_documented_shapes_and_targets(name, shape, task, labels):
    if name in SOURCE_PACKAGE:
        pytest.importorskip(SOURCE_PACKAGE[name], reason="the bench extra is not installed")
    table = tabular_speed.get_table(name)
    X, y = table.load()
    assert X.shape == shape and X.dtype == np.float64 and y.shape == shape[:1]
    assert table.task == task
    if labels is not None:
        assert sorted(np.unique(y).tolist()) == labels
    assert np.isfinite(X).all()


def test_star98_target_is_the_share_above_the_median():
    pytest.importorskip("statsmodels", reason="the bench extra is not installed")
    X, y = tabular_speed.load_star98()
    assert ((y > 0) & (y < 1)).all()  # NABOVE / (NABOVE + NBELOW), a share
    assert X.shape[1] == 20  # NABOVE and NBELOW are not inputs


def test_synthetic_rows_follow_the_seed():
    X, y = tabular_speed.make_synthetic(50)
    again_X, again_y = tabular_speed.make_synthetic(50)
    np.testing.assert_array_equal(X, again_X)
    np.testing.assert_array_equal(y, again_y)
    assert not np.array_equal(tabular_speed.make_synthetic(50, seed=1)[1], y)
    assert np.abs(X).max() <= 1.0


def test_a_child_past_the_cap_is_recorded_as_did_not_finish():
    # 0.2 s is less than the child needs to import torch: it is killed before its fit
    cell = tabular_speed.run_cell("grunfeld", "hgb", max_seconds=0.2)
    assert cell["status"] == "did not finish" and cell["max_seconds"] == 0.2
    assert "score" not in cell and cell["child_seconds"] < 10
    assert tabular_speed._summary(cell) == "did not finish within 0.2 s"

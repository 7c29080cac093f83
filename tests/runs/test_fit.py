"""`moekit fit / predict / report` on CSV files, end to end, and every bad input they must
refuse."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moekit.cli import main
from moekit.estimators.persistence import load_estimator

DATA = Path(__file__).parents[1] / "assets"
CLASSES, WITH_TEXT = DATA / "classes.csv", DATA / "classes_with_text.csv"
TWO_LINES = DATA / "two_lines.csv"
QUICK = ["--no-progress", "--max-epochs", "150"]


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "classes"
    assert main(["fit", str(CLASSES), "--target", "label", "--experts", "3", "--out", str(out),
                 *QUICK]) == 0
    return out


def test_fit_writes_model_summary_and_report(class_run, capsys):
    summary = json.loads((class_run / "summary.json").read_text())
    assert summary["task"] == "classify" and summary["classes"] == ["left", "middle", "right"]
    assert summary["train_rows"] == 72 and summary["validation_rows"] == 18
    assert summary["train_score"] > 0.95 and summary["validation_score"] > 0.9
    loads = summary["expert_loads"]
    assert len(loads) == 3 and abs(sum(r["mean_proportion"] for r in loads) - 1) < 1e-9
    html = (class_run / "report.html").read_text()
    for heading in ("Learning curves", "The gate&#x27;s partition", "Routing summary",
                    "Experts and interventions", "Experts by class"):
        assert heading in html
    figures = {p.name for p in (class_run / "figures").iterdir()}
    assert figures == {"learning_curves.png", "gate_partition.png", "confusion_matrix.png"}
    # the report carries the same routing analysis `moekit analyze` writes
    stats = json.loads((class_run / "analysis" / "model" / "analysis.json").read_text())
    assert stats["n_experts"] == 3
    assert stats["expert_by_label"]["labels"] == ["left", "middle", "right"]
    estimator = load_estimator(class_run / "model")
    assert estimator.feature_names_in_.tolist() == ["x1", "x2"]
    assert estimator.metadata_["preprocessing"]["target"] == "label"


def test_predict_matches_the_saved_estimator_and_scores(class_run, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert main(["predict", str(class_run), str(CLASSES), "--proba", "--out", str(out)]) == 0
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["row", "predicted_label", "p(left)", "p(middle)", "p(right)"]
    frame = pd.read_csv(CLASSES)
    estimator = load_estimator(class_run / "model")
    np.testing.assert_allclose(pred[["p(left)", "p(middle)", "p(right)"]].to_numpy(),
                               estimator.predict_proba(frame[["x1", "x2"]]), atol=1e-12)
    assert "accuracy against the target column" in capsys.readouterr().err
    # without --out the CSV goes to stdout, and the target column is optional
    no_target = tmp_path / "no_target.csv"
    frame.drop(columns="label").to_csv(no_target, index=False)
    assert main(["predict", str(class_run), str(no_target)]) == 0
    assert capsys.readouterr().out.startswith("row,predicted_label\n1,left")


def test_report_rewrites_the_report(class_run, capsys):
    (class_run / "report.html").unlink()
    assert main(["report", str(class_run)]) == 0
    assert (class_run / "report.html").is_file()


def test_regression_with_auto_experts(tmp_path):
    out = tmp_path / "run"
    assert main(["fit", str(TWO_LINES), "--target", "y", "--experts", "auto", "--out", str(out),
                 "--expert", "linear", "--lr", "0.05", "--alpha", "0.01", "--no-progress",
                 "--max-epochs", "300"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regress" and summary["score_name"] == "R^2"
    curve = summary["n_experts_curve"]  # fitted from 1 up, until two sizes in a row do not help
    assert curve["n_experts"] + curve["not_fitted"] == [1, 2, 3, 4, 6, 8]
    assert summary["n_experts"] >= 2 and summary["validation_score"] > 0.9
    assert "Experts by target bin" in (out / "report.html").read_text()


def test_one_hot_encodes_text_columns(tmp_path):
    out = tmp_path / "run"
    assert main(["fit", str(WITH_TEXT), "--target", "label", "--one-hot", "--out", str(out),
                 "--experts", "2", *QUICK]) == 0
    assert json.loads((out / "summary.json").read_text())["inputs"] == \
        ["x1", "x2", "site=north", "site=south"]


# --- bad input: a clear message, exit code 1 (data) or 2 (usage), and nothing written ----------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def fit_fails(tmp_path, capsys, args, match, code=1):
    out = tmp_path / "out"
    assert main(["fit", *map(str, args), "--out", str(out), *QUICK]) == code
    assert match in capsys.readouterr().err
    assert not out.exists(), "nothing may be written when the input is refused"


def test_missing_file(tmp_path, capsys):
    fit_fails(tmp_path, capsys, [tmp_path / "nope.csv", "--target", "y"], "no data file at")


def test_empty_file(tmp_path, capsys):
    fit_fails(tmp_path, capsys, [write(tmp_path, "e.csv", ""), "--target", "y"], "is empty")
    fit_fails(tmp_path, capsys, [write(tmp_path, "h.csv", "a,y\n"), "--target", "y"],
              "has a header but no data rows")


def test_missing_target_column(tmp_path, capsys):
    fit_fails(tmp_path, capsys, [CLASSES, "--target", "species"],
              "there is no target column 'species'; the columns are ['x1', 'x2', 'label']")


def test_non_numeric_features_name_the_column_and_the_flag(tmp_path, capsys):
    fit_fails(tmp_path, capsys, [WITH_TEXT, "--target", "label"],
              "non-numeric feature columns: 'site' (e.g. 'south'); pass --one-hot")


def test_missing_values_say_where_and_flags_drop_or_impute(tmp_path, capsys):
    frame = pd.read_csv(CLASSES)
    frame.loc[[4, 9], "x2"] = np.nan
    path = tmp_path / "holes.csv"
    frame.to_csv(path, index=False)
    fit_fails(tmp_path, capsys, [path, "--target", "label"],
              "missing values in column 'x2' (rows 5, 10); pass --missing drop")
    for policy, rows in (("drop", 88), ("impute", 90)):
        out = tmp_path / policy
        assert main(["fit", str(path), "--target", "label", "--missing", policy, "--out", str(out),
                     *QUICK]) == 0
        assert json.loads((out / "summary.json").read_text())["rows"] == rows


def test_single_class(tmp_path, capsys):
    frame = pd.read_csv(CLASSES).assign(label="left")
    path = tmp_path / "one.csv"
    frame.to_csv(path, index=False)
    fit_fails(tmp_path, capsys, [path, "--target", "label"], "has one class only ('left')")


def test_fewer_rows_than_experts(tmp_path, capsys):
    path = tmp_path / "small.csv"
    pd.read_csv(TWO_LINES).head(5).to_csv(path, index=False)
    fit_fails(tmp_path, capsys, [path, "--target", "y", "--experts", "8",
                                 "--validation-fraction", "0"],
              "--experts 8 needs at least 8 rows")


def test_columns_at_predict_time_must_match(class_run, tmp_path, capsys):
    path = tmp_path / "renamed.csv"
    pd.read_csv(CLASSES).rename(columns={"x2": "height"}).to_csv(path, index=False)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(class_run), str(path), "--out", str(out)]) == 1
    assert "missing ['x2'], unexpected ['height']" in capsys.readouterr().err
    assert not out.exists()


def test_corrupted_or_foreign_model_folder(class_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(class_run, broken)
    (broken / "model" / "config.json").write_text("{not json")
    assert main(["predict", str(broken), str(CLASSES)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    (broken / "model" / "config.json").write_text(json.dumps({"format": "something-else"}))
    assert main(["predict", str(broken), str(CLASSES)]) == 1
    assert "is not a moekit model config" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), str(CLASSES)]) == 1
    assert "no run folder at" in capsys.readouterr().err
    (broken / "model" / "model.safetensors").write_bytes(b"garbage")
    shutil.copy(class_run / "model" / "config.json", broken / "model" / "config.json")
    assert main(["predict", str(broken), str(CLASSES)]) == 1
    assert "cannot read model.safetensors" in capsys.readouterr().err


def test_existing_run_is_not_overwritten_without_the_flag(class_run, tmp_path, capsys):
    before = (class_run / "summary.json").read_text()
    assert main(["fit", str(CLASSES), "--target", "label", "--out", str(class_run), *QUICK]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (class_run / "summary.json").read_text() == before


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(CLASSES)])
    assert exit_info.value.code == 2
    assert "--target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(CLASSES), "--target", "label", "--experts", "many"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(CLASSES), "--target", "label", "--alpha", "-1"])
    assert exit_info.value.code == 2
    assert "expected 'auto' or a number >= 0; got '-1'" in capsys.readouterr().err


def test_analyze_a_fit_run_on_its_own_data_and_on_other_data(class_run, tmp_path, capsys):
    assert main(["analyze", str(class_run)]) == 0
    printed = capsys.readouterr().out
    assert "NMI" in printed and "analysis.html" in printed
    stats = json.loads((class_run / "analysis" / "model" / "analysis.json").read_text())
    assert stats["rows"] == 90 and stats["expert_by_label"]["kind"] == "class"
    half = tmp_path / "half.csv"
    pd.read_csv(CLASSES).iloc[::2].to_csv(half, index=False)
    assert main(["analyze", str(class_run), "--data", str(half)]) == 0
    stats = json.loads((class_run / "analysis" / "model" / "analysis.json").read_text())
    assert stats["rows"] == 45


def test_analyze_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 1
    assert "is not a moekit run folder" in capsys.readouterr().err


def test_report_and_analyze_leave_out_rows_without_a_target_as_fitting_did(tmp_path, capsys):
    frame = pd.read_csv(CLASSES)
    frame.loc[[3, 40], "label"] = np.nan
    path = tmp_path / "gaps.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "run"
    assert main(["fit", str(path), "--target", "label", "--missing", "drop", "--out", str(out),
                 *QUICK]) == 0
    fitted = json.loads((out / "summary.json").read_text())
    assert main(["report", str(out)]) == 0
    assert main(["analyze", str(out)]) == 0
    stats = json.loads((out / "analysis" / "model" / "analysis.json").read_text())
    assert fitted["rows"] == stats["rows"] == 88
    # predict keeps every row and scores the 88 that have a target
    assert main(["predict", str(out), str(path), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 90
    assert "accuracy against the target column" in capsys.readouterr().err


def test_moekit_fit_and_the_estimators_share_one_source_of_defaults():
    from moekit.estimators import MixtureOfExpertsClassifier
    from moekit.runs.fit import ESTIMATOR_PARAMETERS, FitRunConfig, _estimator

    estimator = _estimator(FitRunConfig(data="d.csv", target="t"), "classify")
    defaults = MixtureOfExpertsClassifier().get_params()
    for field, param in ESTIMATOR_PARAMETERS.items():
        assert getattr(FitRunConfig, field) == defaults[param], field
        assert estimator.get_params()[param] == defaults[param], param
    assert FitRunConfig.hidden == 64  # the flat layout's `moekit fit` used 32, the estimators 64


def test_fit_help_shows_the_estimators_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hidden units of an mlp expert (default 64)" in text
    assert "epoch cap (default 500)" in text and "step size (default 0.01)" in text


def test_ctrl_c_during_the_fit_saves_the_best_model_so_far_marked_interrupted(tmp_path,
                                                                             interrupt_at, capsys):
    calls = interrupt_at(8)
    out = tmp_path / "run"
    assert main(["fit", str(CLASSES), "--target", "label", "--experts", "auto", "--out", str(out),
                 *QUICK]) == 0
    assert len(calls) == 8  # no stage after the interrupted one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stop_reason"] == "interrupted"
    assert "Interrupted (Ctrl-C)" in capsys.readouterr().out
    assert "interrupted" in (out / "report.html").read_text().lower()
    assert load_estimator(out / "model").interrupted_ is True

"""`write_fit_report`: the choices table, the interrupted banner, scores in target units, the
validation diagnostics, curves for gradient and EM fits, and the mse label of a regression."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.reports.fit import choices_section, loss_label, validation_positions, write_fit_report
from moekit.reports.html import render

ASSETS = Path(__file__).parents[1] / "assets"
VAL = np.arange(0, 90, 5)  # 18 validation rows


def fitted(cls, X, y, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(n_experts=2, expert="linear", alpha=0.01, max_epochs=30, random_state=0,
                   **params).fit(X.drop(index=VAL), np.delete(y, VAL))


def summary(task, target, inputs, **extra):
    return {"task": task, "target": target, "rows": 90, "train_rows": 72, "validation_rows": 18,
            "inputs": list(inputs.columns), "n_experts": 2, "epochs": 30,
            "stop_reason": "max_epochs", "score_name": "accuracy", "train_score": 0.9,
            "validation_score": 0.8, "data": str(ASSETS / "x.csv"), **extra}


@pytest.fixture(scope="module")
def classes():
    frame = pd.read_csv(ASSETS / "classes.csv")
    X, y = frame[["x1", "x2"]], frame["label"].to_numpy()
    return X, y, fitted(MixtureOfExpertsClassifier, X, y, early_stopping=True)


CHOICES = [{"setting": "n_experts", "value": 2, "why": "lowest held-out loss within one SE"},
           {"setting": "alpha", "value": 0.0123456, "why": "the strongest prior within one SE"},
           {"setting": "solver", "value": "adam", "why": "the default"}]


def test_report_shows_choices_banner_scores_and_confusion_matrix(classes, tmp_path):
    X, y, clf = classes
    path = write_fit_report(tmp_path / "report.html", clf, X, y,
                            summary("classify", "label", X, choices=CHOICES, interrupted=True,
                                    threads=2), validation_rows=VAL)
    html = path.read_text()
    assert "Settings chosen, and why" in html
    assert "<td>n_experts</td><td>2</td><td>lowest held-out loss within one SE</td>" in html
    assert "<td>alpha</td><td>0.01235</td>" in html and "<td>solver</td><td>adam</td>" in html
    assert 'class="banner warning"' in html and "interrupted (Ctrl-C)" in html
    assert html.index("banner warning") < html.index("<h2>Summary</h2>")  # under the title
    assert "<td>CPU threads</td><td>2</td>" in html
    assert "Scores in the target&#x27;s own units" in html
    for name in ("balanced accuracy", "log-loss (nats per row)", "majority-class baseline"):
        assert name in html
    assert "Confusion matrix (validation rows)" in html
    # the table under the figure: 18 validation rows, labelled by the target's classes
    assert "<th>true \\ predicted label</th><th>left</th><th>middle</th><th>right</th>" in html
    assert "lowest validation loss" in html  # the kept epoch, from the early-stopping history
    figures = {p.name: p.stat().st_size for p in (tmp_path / "figures").iterdir()}
    assert set(figures) == {"learning_curves.png", "confusion_matrix.png", "gate_partition.png"}
    assert all(size > 8_000 for size in figures.values())


def test_older_runs_without_choices_or_banner(classes, tmp_path):
    X, y, clf = classes
    html = write_fit_report(tmp_path / "report.html", clf, X, y,
                            summary("classify", "label", X)).read_text()
    assert "Settings chosen" not in html and "banner" not in html.split("</style>")[1]
    # no validation positions given nor saved: the scores and the matrix say they use every row
    assert "Confusion matrix (all rows: the validation rows were not given)" in html
    assert "<th>all rows</th>" in html


def test_choices_section_tolerates_odd_entries():
    assert choices_section(None) is None and choices_section([]) is None
    section = choices_section(["junk", {"setting": "lr", "value": [0.1, 0.01]}])
    assert "<td>lr</td><td>[0.1, 0.01]</td><td></td>" in render("t", [section])


def test_validation_positions():
    loaded = SimpleNamespace(metadata_={"validation_rows": [4, 1, 99]})  # 99: past the end
    assert validation_positions(loaded, 10, {}).tolist() == [4, 1]
    assert validation_positions(object(), 10, {}, [2, 3]).tolist() == [2, 3]
    assert validation_positions(object(), 10, {"validation_rows": 0}).tolist() == []
    assert validation_positions(object(), 10, {"validation_rows": 3}) is None


def test_regression_report_in_target_units_and_mse_label(tmp_path):
    frame = pd.read_csv(ASSETS / "two_lines.csv").iloc[:90]
    X, y = frame[["x"]], 100.0 + 50.0 * frame["y"].to_numpy()  # units far from standardised
    reg = fitted(MixtureOfExpertsRegressor, X, y)
    html = write_fit_report(tmp_path / "report.html", reg, X, y,
                            summary("regress", "y", X), validation_rows=VAL).read_text()
    assert "RMSE (root mean squared error) (y units)" in html
    assert "Predicted against actual (validation rows)" in html
    assert (tmp_path / "figures" / "predicted_vs_actual.png").stat().st_size > 8_000
    # the routing analysis's mse is on the standardised target, and says so
    assert "mse (standardised target) without it" in html
    assert "multiply by" in html
    assert "standardised target" in loss_label(reg, "regress")


def test_em_fit_has_its_log_likelihood_curve(classes, tmp_path):
    X, y, _ = classes
    em = fitted(MixtureOfExpertsClassifier, X, y, solver="em")
    assert "log_likelihood" in em.history_.keys and "train_loss" not in em.history_.keys
    html = write_fit_report(tmp_path / "report.html", em, X, y, summary("classify", "label", X),
                            validation_rows=VAL).read_text()
    assert "Learning curves" in html and "weights kept from iteration" in html
    assert loss_label(em, "classify").startswith("EM objective: log-likelihood per row")

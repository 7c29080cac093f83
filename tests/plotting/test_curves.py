"""`plot_learning_curves`: training and validation curves, the kept epoch, EM histories."""

import math

import numpy as np
import pytest

from moekit.fitting.history import History
from moekit.plotting.curves import history_column, history_steps, kept_record, plot_learning_curves


def gradient_history(validation: bool, accuracy: bool) -> History:
    """Training loss falls all along; validation loss is lowest at epoch 4, then rises."""
    records = []
    for epoch in range(1, 9):
        record = {"epoch": epoch, "train_loss": 1.0 / epoch}
        if accuracy:
            record["train_accuracy"] = min(1.0, 0.5 + 0.07 * epoch)
        if validation:
            record["val_loss"] = 0.2 + 0.05 * (epoch - 4) ** 2  # minimum 0.2 at epoch 4
            if accuracy:
                record["val_accuracy"] = 0.8
        records.append(record)
    return History(records)


def em_history() -> History:
    return History([{"iteration": i, "log_likelihood": -1.0 + 0.3 * i, "train_nll": 1.0 - 0.3 * i}
                    for i in range(5)])


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_kept_record_is_the_lowest_validation_loss_else_the_last():
    assert kept_record(gradient_history(True, False)) == (3, "lowest validation loss")  # epoch 4
    assert kept_record(gradient_history(False, False)) == (7, "last record")
    assert kept_record(em_history()) == (4, "last record")
    assert kept_record(History()) == (None, "no records")
    # a diverged validation loss (inf, NaN) is never the kept one
    h = History([{"val_loss": math.inf}, {"val_loss": 0.5}, {"val_loss": math.nan}])
    assert kept_record(h) == (1, "lowest validation loss")


def test_history_steps_and_columns():
    steps_T, name = history_steps(em_history())
    assert name == "iteration" and steps_T.tolist() == [0, 1, 2, 3, 4]
    steps_T, name = history_steps(History([{"train_loss": 1.0}, {"train_loss": 0.5}]))
    assert name == "epoch" and steps_T.tolist() == [1, 2]
    column = history_column(History([{"a": 1}, {"b": 2}]), "a")
    assert column[0] == 1.0 and np.isnan(column[1])


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("accuracy", [True, False])
def test_learning_curves_with_and_without_validation(png, validation, accuracy):
    history = gradient_history(validation, accuracy)
    fig = plot_learning_curves(history, loss_label="fitting loss: cross-entropy per row (nats)")
    png(fig, f"curves_{validation}_{accuracy}")
    axes = fig.axes
    assert len(axes) == (2 if accuracy else 1)
    loss_ax = axes[0]
    assert loss_ax.get_ylabel() == "fitting loss: cross-entropy per row (nats)"
    labels = legend_texts(loss_ax)
    assert ("validation" in labels) == validation and "training" in labels
    kept = "kept: epoch 4 (lowest validation loss)" if validation else \
        "kept: epoch 8 (last record)"
    assert kept in labels
    if accuracy:
        assert axes[1].get_ylabel().startswith("accuracy")


def test_learning_curves_of_an_em_fit(png):
    fig = plot_learning_curves(em_history(), loss_label="EM objective: mean log-likelihood")
    png(fig, "em")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "iteration" and ax.get_ylabel().startswith("EM objective")
    assert "kept: iteration 4 (last record)" in legend_texts(ax)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [-1.0, -0.7, -0.4, -0.1, 0.2])


def test_learning_curves_without_a_loss_say_so():
    fig = plot_learning_curves(History([{"epoch": 1}]))
    assert "no loss or accuracy" in fig.axes[0].texts[0].get_text()

"""The confusion matrix and predicted-against-actual figures."""

import numpy as np
import pytest

from moekit.plotting.diagnostics import (
    plot_confusion_matrix,
    plot_predicted_vs_actual,
    row_shares,
)


def test_row_shares_normalise_each_true_class():
    # row 0: 3 + 1 = 4 rows -> 0.75, 0.25; row 1 has no rows and stays 0
    np.testing.assert_allclose(row_shares(np.array([[3, 1], [0, 0]])), [[0.75, 0.25], [0, 0]])


def test_confusion_matrix_shows_counts_and_class_names(png):
    counts_CC = np.array([[5, 1, 0], [0, 4, 2], [0, 0, 30]])
    fig = plot_confusion_matrix(counts_CC, ["barolo", "grignolino", "barbera"])
    png(fig, "confusion")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["barolo", "grignolino", "barbera"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["barolo", "grignolino", "barbera"]
    assert [t.get_text() for t in ax.texts] == [str(c) for c in counts_CC.ravel()]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    # shaded by the row's share: the rare class's 5 of 6 is as dark as the common one's 30 of 30
    np.testing.assert_allclose(ax.images[0].get_array()[0, 0], 5 / 6)


def test_confusion_matrix_refuses_mismatched_names():
    with pytest.raises(ValueError, match=r"counts_CC must be \(C, C\) with C = len\(class_names\) "
                                         r"= 3; got shape \(2, 2\)"):
        plot_confusion_matrix(np.eye(2), ["a", "b", "c"])


def test_predicted_vs_actual_in_target_units(png):
    rng = np.random.default_rng(0)
    actual_N = rng.normal(150.0, 60.0, 80)
    fig = plot_predicted_vs_actual(actual_N, actual_N + rng.normal(0, 10, 80),
                                   target_name="progression")
    png(fig, "predicted")
    left, right = fig.axes
    assert left.get_xlabel() == "actual progression"
    assert left.get_ylabel() == "predicted progression"
    assert right.get_ylabel() == "residual: actual - predicted (progression)"
    diagonal = left.get_lines()[0]
    np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())  # the line y = x


def test_predicted_vs_actual_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="one value per row; got 3 and 2 values"):
        plot_predicted_vs_actual(np.ones(3), np.ones(2))

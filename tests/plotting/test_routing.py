"""Analysis figures: each draws what its title says, in the experts' colours, and saves as PNG."""

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from moekit.fitting.history import History
from moekit.plotting.routing import (
    plot_coactivation,
    plot_expert_by_label,
    plot_importance,
    plot_load,
    plot_routing_over_training,
)
from moekit.plotting.style import OKABE_ITO, expert_colors

F64 = torch.float64


def test_palette_is_okabe_ito_and_distinct():
    assert expert_colors(4) == list(OKABE_ITO[:4])
    assert len(set(expert_colors(8))) == 8
    assert len(set(expert_colors(12))) == 12  # beyond 8: tab20, still distinct


def test_expert_by_label_heat_map(png):
    counts = np.array([[10, 0, 5], [0, 20, 5]])
    fig = plot_expert_by_label(counts, ["x", "y", "z"], nmi=0.71, title="m")
    ax = fig.axes[0]
    assert "NMI = 0.71" in ax.get_title()
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown[:, 2], [0.5, 0.5])  # class z splits evenly
    assert sorted(t.get_text() for t in ax.texts) == sorted(["10", "0", "5", "0", "20", "5"])
    png(fig, "by_label")


def _stats(dead=(3,)):
    return {"dense": True, "load": {"load": [0.5, 0.3, 0.2, 0.0],
                                    "primary_share": [0.6, 0.3, 0.1, 0.0]},
            "dead_threshold": 0.01, "dead_experts": list(dead),
            "imbalance": {"cv": 0.8, "max_over_mean": 2.0}, "entropy": {"ratio": 0.4}}


def test_load_bar_chart(png):
    fig = plot_load(_stats())
    ax = fig.axes[0]
    assert "CV 0.80, max/mean 2.00, gate entropy / log E 0.40" in ax.get_title()
    bars = ax.patches
    assert len(bars) == 8 and to_hex(bars[0].get_facecolor()) == OKABE_ITO[0].lower()
    assert "dead" in [t.get_text() for t in ax.texts]
    png(fig, "load")


def test_routing_over_training_reads_the_history(png):
    records = [{"epoch": e, "routing_load_0": 0.5 + e / 20, "routing_load_1": 0.5 - e / 20,
                "routing_entropy_ratio": 1 - e / 10} for e in range(10)]
    fig = plot_routing_over_training(History(records), title="run")
    top, bottom = fig.axes
    assert [line.get_label() for line in top.get_lines()][:2] == ["expert 0", "expert 1"]
    np.testing.assert_allclose(bottom.get_lines()[0].get_ydata(), [1 - e / 10 for e in range(10)])
    png(fig, "history")
    with pytest.raises(ValueError, match=r"has no routing_load_<e> columns.*RoutingHistory"):
        plot_routing_over_training(History([{"epoch": 1, "train_loss": 1.0}]))


def test_coactivation_heat_map(png):
    cond = np.array([[1.0, 0.25, 0.75], [0.5, 1.0, 0.5], [0.6, 0.4, 1.0]])
    fig = plot_coactivation(cond)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "0.25" in texts and texts.count("") == 3  # the diagonal is left blank
    png(fig, "coactivation")


def test_importance_bar_chart(png):
    table = {"metric": "accuracy", "higher_is_better": True, "baseline": 0.9, "experts": [
        {"expert": 0, "ablated_change": -0.4, "forced_change": -0.1},
        {"expert": 1, "ablated_change": 0.0, "forced_change": -0.5}]}
    fig = plot_importance(table)
    left, right = fig.axes
    assert "removed" in left.get_title() and "forced" in right.get_title()
    assert "higher is better" in left.get_xlabel()
    assert [p.get_width() for p in left.patches] == [-0.4, 0.0]
    png(fig, "importance")



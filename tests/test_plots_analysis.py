"""Analysis figures: each draws what its title says, in the experts' colours, and saves as PNG."""

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from moekit import MixtureOfExperts, SparseMoE
from moekit.history import History
from moekit.plots import OKABE_ITO, expert_colors, save_figure
from moekit.plots_analysis import (Plane, gate_probs, plot_coactivation, plot_expert_by_label,
                                   plot_gate_partition, plot_importance, plot_load,
                                   plot_routing_over_training)

F64 = torch.float64


def _png(fig, tmp_path, name):
    path = save_figure(fig, tmp_path / f"{name}.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 8_000
    return path


def test_palette_is_okabe_ito_and_distinct():
    assert expert_colors(4) == list(OKABE_ITO[:4])
    assert len(set(expert_colors(8))) == 8
    assert len(set(expert_colors(12))) == 12  # beyond 8: tab20, still distinct


def test_partition_of_a_plane_shows_each_winning_expert(gen, tmp_path):
    moe = MixtureOfExperts(2, 1, 3, generator=gen).double()
    with torch.no_grad():  # three sectors: expert e wins where x points along angle 2 pi e / 3
        angles = torch.arange(3, dtype=F64) * 2 * torch.pi / 3
        moe.gate.w_DE.copy_(10 * torch.stack([angles.cos(), angles.sin()]))
        moe.gate.b_E.zero_()
    x = torch.randn(300, 2, generator=gen, dtype=F64).numpy()
    labels = gate_probs(moe, x).argmax(1)
    fig = plot_gate_partition(moe, x, labels, ["a", "b", "c"], feature_names=("F1", "F2"),
                              title="sectors")
    left, right = fig.axes[:2]
    assert left.get_xlabel() == "F1" and left.get_ylabel() == "F2"
    assert "argmax" in left.get_title() and "soft" in right.get_title()
    assert fig._suptitle.get_text().startswith("sectors: how the gate divides the input")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["expert 0", "expert 1", "expert 2", "a", "b", "c"]
    image = left.images[0].get_array()
    assert len({tuple(np.round(px, 3)) for px in image.reshape(-1, 3)}) == 3  # three regions
    _png(fig, tmp_path, "partition")


def test_partition_of_many_features_is_a_principal_plane(gen, tmp_path):
    moe = SparseMoE(5, 4, 2, hidden=4, generator=gen).eval()
    x = torch.randn(200, 5, generator=gen).numpy()
    plane = Plane.of(x)
    np.testing.assert_allclose(plane.basis_2D @ plane.basis_2D.T, np.eye(2), atol=1e-10)
    fig = plot_gate_partition(moe, x)
    assert fig.axes[0].get_xlabel() == "principal component 1"
    assert "slice through the data mean" in fig._suptitle.get_text()
    _png(fig, tmp_path, "pca")


def test_partition_of_one_feature_stacks_the_proportions(gen, tmp_path):
    moe = MixtureOfExperts(1, 1, 3, generator=gen).double()
    fig = plot_gate_partition(moe, torch.rand(100, 1, generator=gen, dtype=F64).numpy(),
                              feature_names=["x"])
    ax = fig.axes[0]
    assert ax.get_ylabel() == "mixing proportion p_e(x)" and len(ax.collections) >= 3
    _png(fig, tmp_path, "oned")


def test_expert_by_label_heat_map(tmp_path):
    counts = np.array([[10, 0, 5], [0, 20, 5]])
    fig = plot_expert_by_label(counts, ["x", "y", "z"], nmi=0.71, title="m")
    ax = fig.axes[0]
    assert "NMI = 0.71" in ax.get_title()
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown[:, 2], [0.5, 0.5])  # class z splits evenly
    assert sorted(t.get_text() for t in ax.texts) == sorted(["10", "0", "5", "0", "20", "5"])
    _png(fig, tmp_path, "by_label")


def _stats(dead=(3,)):
    return {"dense": True, "load": {"load": [0.5, 0.3, 0.2, 0.0],
                                    "primary_share": [0.6, 0.3, 0.1, 0.0]},
            "dead_threshold": 0.01, "dead_experts": list(dead),
            "imbalance": {"cv": 0.8, "max_over_mean": 2.0}, "entropy": {"ratio": 0.4}}


def test_load_bar_chart(tmp_path):
    fig = plot_load(_stats())
    ax = fig.axes[0]
    assert "CV 0.80, max/mean 2.00, gate entropy / log E 0.40" in ax.get_title()
    bars = ax.patches
    assert len(bars) == 8 and to_hex(bars[0].get_facecolor()) == OKABE_ITO[0].lower()
    assert "dead" in [t.get_text() for t in ax.texts]
    _png(fig, tmp_path, "load")


def test_routing_over_training_reads_the_history(tmp_path):
    records = [{"epoch": e, "routing_load_0": 0.5 + e / 20, "routing_load_1": 0.5 - e / 20,
                "routing_entropy_ratio": 1 - e / 10} for e in range(10)]
    fig = plot_routing_over_training(History(records), title="run")
    top, bottom = fig.axes
    assert [line.get_label() for line in top.get_lines()][:2] == ["expert 0", "expert 1"]
    np.testing.assert_allclose(bottom.get_lines()[0].get_ydata(), [1 - e / 10 for e in range(10)])
    _png(fig, tmp_path, "history")
    with pytest.raises(ValueError, match=r"has no routing_load_<e> columns.*RoutingHistory"):
        plot_routing_over_training(History([{"epoch": 1, "train_loss": 1.0}]))


def test_coactivation_heat_map(tmp_path):
    cond = np.array([[1.0, 0.25, 0.75], [0.5, 1.0, 0.5], [0.6, 0.4, 1.0]])
    fig = plot_coactivation(cond)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "0.25" in texts and texts.count("") == 3  # the diagonal is left blank
    _png(fig, tmp_path, "coactivation")


def test_importance_bar_chart(tmp_path):
    table = {"metric": "accuracy", "higher_is_better": True, "baseline": 0.9, "experts": [
        {"expert": 0, "ablated_change": -0.4, "forced_change": -0.1},
        {"expert": 1, "ablated_change": 0.0, "forced_change": -0.5}]}
    fig = plot_importance(table)
    left, right = fig.axes
    assert "removed" in left.get_title() and "forced" in right.get_title()
    assert "higher is better" in left.get_xlabel()
    assert [p.get_width() for p in left.patches] == [-0.4, 0.0]
    _png(fig, tmp_path, "importance")


def test_more_than_eight_experts_keep_their_colours_in_every_figure(gen):
    from moekit.plots import plot_partition

    moe = MixtureOfExperts(2, 3, 10, generator=gen).double()
    x = torch.randn(200, 2, generator=gen, dtype=F64).numpy()
    y = np.random.default_rng(0).integers(0, 3, 200)
    ax = plot_partition(moe, x, y, ["a", "b", "c"]).axes[0]
    drawn = {int(line.get_label().split(":")[0].removeprefix("expert ")): to_hex(line.get_color())
             for line in ax.get_lines() if line.get_label().startswith("expert")}
    assert drawn and drawn == {e: expert_colors(10)[e] for e in drawn}
    load = plot_load({"load": {"load": [0.1] * 10, "primary_share": [0.1] * 10}, "dense": True,
                      "dead_threshold": 0.01, "dead_experts": [],
                      "imbalance": {"cv": 0.0, "max_over_mean": 1.0}, "entropy": {"ratio": 1.0}})
    bars = load.axes[0].patches[:10]
    assert [to_hex(b.get_facecolor()) for b in bars] == expert_colors(10)

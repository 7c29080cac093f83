"""The gate's partition: one figure for every report, what each expert wins, in its colour."""

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from moekit import MixtureOfExperts, SparseMoE
from moekit.plotting.expert_lines import expert_decision_lines
from moekit.plotting.partition import Plane, gate_probs, plot_partition
from moekit.plotting.routing import plot_load
from moekit.plotting.style import expert_colors

F64 = torch.float64


def test_partition_of_a_plane_shows_each_winning_expert(gen, png):
    moe = MixtureOfExperts(2, 1, 3, generator=gen).double()
    with torch.no_grad():  # three sectors: expert e wins where x points along angle 2 pi e / 3
        angles = torch.arange(3, dtype=F64) * 2 * torch.pi / 3
        moe.gate.w_DE.copy_(10 * torch.stack([angles.cos(), angles.sin()]))
        moe.gate.b_E.zero_()
    x = torch.randn(300, 2, generator=gen, dtype=F64).numpy()
    labels = gate_probs(moe, x).argmax(1)
    fig = plot_partition(moe, x, labels, ["a", "b", "c"], feature_names=("F1", "F2"),
                         title="sectors")
    left, right = fig.axes[:2]
    assert left.get_xlabel() == "F1" and left.get_ylabel() == "F2"
    assert "argmax" in left.get_title() and "soft" in right.get_title()
    assert fig._suptitle.get_text().startswith("sectors: how the gate divides the input")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["expert 0", "expert 1", "expert 2", "a", "b", "c"]
    image = left.images[0].get_array()
    assert len({tuple(np.round(px, 3)) for px in image.reshape(-1, 3)}) == 3  # three regions
    png(fig, "partition")


def test_partition_of_many_features_is_a_principal_plane(gen, png):
    moe = SparseMoE(5, 4, 2, hidden=4, generator=gen).eval()
    x = torch.randn(200, 5, generator=gen).numpy()
    plane = Plane.of(x)
    np.testing.assert_allclose(plane.basis_2D @ plane.basis_2D.T, np.eye(2), atol=1e-10)
    fig = plot_partition(moe, x)
    assert fig.axes[0].get_xlabel() == "principal component 1"
    assert "slice through the data mean" in fig._suptitle.get_text()
    png(fig, "pca")


def test_partition_of_one_feature_stacks_the_proportions(gen, png):
    moe = MixtureOfExperts(1, 1, 3, generator=gen).double()
    fig = plot_partition(moe, torch.rand(100, 1, generator=gen, dtype=F64).numpy(),
                         feature_names=["x"])
    ax = fig.axes[0]
    assert ax.get_ylabel() == "mixing proportion p_e(x)" and len(ax.collections) >= 3
    png(fig, "oned")


def test_more_than_eight_experts_keep_their_colours_in_every_figure(gen):
    moe = MixtureOfExperts(2, 3, 10, generator=gen).double()
    x = torch.randn(200, 2, generator=gen, dtype=F64).numpy()
    y = np.random.default_rng(0).integers(0, 3, 200)
    lines = expert_decision_lines(moe, x, y, ["a", "b", "c"])
    ax = plot_partition(moe, x, y, ["a", "b", "c"], lines=lines).axes[0]
    drawn = {int(line.get_label().split(":")[0].removeprefix("expert ")): to_hex(line.get_color())
             for line in ax.get_lines() if line.get_label().startswith("expert")}
    assert drawn and drawn == {e: expert_colors(10)[e] for e in drawn}
    load = plot_load({"load": {"load": [0.1] * 10, "primary_share": [0.1] * 10}, "dense": True,
                      "dead_threshold": 0.01, "dead_experts": [],
                      "imbalance": {"cv": 0.0, "max_over_mean": 1.0}, "entropy": {"ratio": 1.0}})
    bars = load.axes[0].patches[:10]
    assert [to_hex(b.get_facecolor()) for b in bars] == expert_colors(10)


def test_a_gate_function_in_the_datas_units_draws_one_panel_without_soft(gen, png):
    """`moekit fit`'s report: the estimator's gate_proba on raw units, argmax panel only."""
    moe = MixtureOfExperts(2, 1, 2, generator=gen).double()
    x = 1000 + 50 * torch.randn(100, 2, generator=gen, dtype=F64).numpy()  # far from the origin
    calls = []

    def gate(rows):
        calls.append(rows.shape)
        return gate_probs(moe, (rows - 1000) / 50)

    fig = plot_partition(gate, x, np.zeros(100, dtype=int), ["only"], soft=False,
                         feature_names=("a", "b"))
    assert len(fig.axes) == 1 and calls and calls[0][1] == 2
    left, right = fig.axes[0].get_xlim()
    assert left < x[:, 0].min() < x[:, 0].max() < right  # the grid is in the data's units
    png(fig, "raw")


def test_expert_lines_need_two_features(gen):
    moe = MixtureOfExperts(3, 2, 2, generator=gen).double()
    x = torch.randn(50, 3, generator=gen, dtype=F64).numpy()
    lines = expert_decision_lines(MixtureOfExperts(2, 2, 2, generator=gen).double(), x[:, :2],
                                  np.arange(50) % 2, ["a", "b"])
    with pytest.raises(ValueError, match="lines are drawn in the plane of two features; got 3"):
        plot_partition(moe, x, lines=lines)

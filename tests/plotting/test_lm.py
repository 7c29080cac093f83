"""The language-model figures drawn from plain arrays: here the routing saturation curve."""

import numpy as np

from moekit.plotting.lm import plot_saturation


def test_the_saturation_curve_has_a_line_per_layer_and_chance_dashed(png):
    steps = [0, 125, 250, 1000]
    overlap_SL = np.array([[0.3, 0.26, 0.25], [0.7, 0.5, 0.4], [0.9, 0.8, 0.6], [1, 1, 1]])
    chance_SL = np.full((4, 3), 0.25)
    fig = plot_saturation(steps, overlap_SL, chance_SL, top1_agreement_SL=overlap_SL - 0.1,
                          top_k=2)
    left, right = fig.axes
    assert left.get_xlabel() == right.get_xlabel() == "training step of the snapshot"
    assert left.get_ylabel() == "top-2 overlap with the final routing"
    assert right.get_ylabel() == "same first choice as the final model"
    solid = [line for line in left.lines if line.get_label().startswith("layer")]
    dashed = [line for line in left.lines if line.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 3
    np.testing.assert_array_equal(solid[1].get_ydata(), overlap_SL[:, 1])
    assert left.get_ylim() == (0, 1.04) and left.get_xlim()[0] < 0 < 1000 < left.get_xlim()[1]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["layer 0", "layer 1", "layer 2"] and labels[3].startswith("chance")
    png(fig, "saturation")
    assert len(plot_saturation(steps, overlap_SL, chance_SL, top_k=2).axes) == 1

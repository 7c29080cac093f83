"""Synthetic tasks with a known answer."""

import pytest
import torch

from moekit.data.synthetic import piecewise_linear


def test_pieces_without_noise_follow_the_lines():
    x, y = piecewise_linear(500, breaks=(0.5,), pieces=((1.0, 0.0), (0.0, 2.0)), noise=0.0,
                            generator=torch.Generator().manual_seed(0))
    left = x[:, 0] < 0.5
    torch.testing.assert_close(y[left], x[left])  # y = x on the left
    torch.testing.assert_close(y[~left], torch.full_like(y[~left], 2.0))  # y = 2 on the right


def test_bad_arguments():
    with pytest.raises(ValueError,
                       match="pieces must have len\\(breaks\\) \\+ 1 = 2 entries; got 3"):
        piecewise_linear(10, breaks=(0.5,), pieces=((1, 0), (1, 0), (1, 0)))
    with pytest.raises(ValueError, match="breaks must be increasing and inside"):
        piecewise_linear(10, breaks=(1.5,))
    with pytest.raises(ValueError, match="n must be an integer >= 1; got n=0"):
        piecewise_linear(0)

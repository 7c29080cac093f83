"""Synthetic tasks whose answer is known: a 1-D function made of straight pieces, one expert each.

Shape legend: N rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moekit._checks import check_int


def piecewise_linear(n: int, *, breaks: Sequence[float] = (0.4,),
                     pieces: Sequence[tuple[float, float]] = ((2.0, 0.0), (-3.0, 2.0)),
                     noise: float = 0.05, low: float = 0.0, high: float = 1.0,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """1-D regression whose true function is linear on each interval between ``breaks``.

    Piece j is y = slope_j * x + intercept_j on [breaks[j-1], breaks[j]); x ~ U(low, high), plus
    Gaussian noise of standard deviation ``noise``. Returns x (N, 1) and y (N, 1).

    Example:
        >>> x, y = piecewise_linear(100, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([100, 1]), torch.Size([100, 1]))
    """
    check_int("piecewise_linear", "n", n, minimum=1)
    if len(pieces) != len(breaks) + 1:
        raise ValueError(f"piecewise_linear: pieces must have len(breaks) + 1 = {len(breaks) + 1} "
                         f"entries; got {len(pieces)}.")
    if list(breaks) != sorted(breaks) or not all(low < b < high for b in breaks):
        raise ValueError(f"piecewise_linear: breaks must be increasing and inside ({low}, {high}); "
                         f"got breaks={tuple(breaks)}.")
    x_N = low + (high - low) * torch.rand(n, generator=generator, dtype=dtype)
    piece_N = torch.bucketize(x_N, torch.tensor(breaks, dtype=dtype), right=True)
    slope_N = torch.tensor([p[0] for p in pieces], dtype=dtype)[piece_N]
    intercept_N = torch.tensor([p[1] for p in pieces], dtype=dtype)[piece_N]
    y_N = slope_N * x_N + intercept_N + noise * torch.randn(n, generator=generator, dtype=dtype)
    return x_N.reshape(-1, 1), y_N.reshape(-1, 1)

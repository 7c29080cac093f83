"""Initial weights shared by gates and experts, drawn from the caller's generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_fan_in_(tensor: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    """Fill ``tensor`` in place from nn.Linear's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn from the caller's generator so runs are reproducible.

    Example:
        >>> w = torch.empty(4, 3)
        >>> uniform_fan_in_(w, 4, torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= 0.5)
        True
    """
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)

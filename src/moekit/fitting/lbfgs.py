"""L-BFGS that restarts from steepest descent when a step leaves the weights where they were.

PyTorch's L-BFGS keeps its curvature pairs between calls. On a non-convex mixture error a failed
strong-Wolfe search (step 0) or a direction that is not one of descent leaves the weights, the
gradient and the stored pairs unchanged, so every later call repeats the same failed step and
training stalls on a plateau it never left. Forgetting the pairs and stepping again from the
gradient restarts the method, as quasi-Newton codes do when their direction stops making progress.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class RestartingLBFGS(torch.optim.LBFGS):
    """``torch.optim.LBFGS`` whose :meth:`step` retries once from a fresh state when the
    weights did not move: the retry is a line search along the negative gradient."""

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        before = [p.detach().clone() for p in self._params]
        loss = super().step(closure)
        if all(torch.equal(old, p) for old, p in zip(before, self._params, strict=True)):
            self.state.clear()  # the curvature pairs, the last direction and step length
            loss = super().step(closure)
        return loss

"""Hooks into :func:`moekit.fitting.gradient.fit`: the state callbacks see, the base class, and
the stock callbacks (skorch's pattern: extend the loop through named hooks, never by copying it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.fitting.config import TrainConfig
from moekit.fitting.history import History


@dataclass
class TrainState:
    """What callbacks see. Set ``stop = True`` to end training after this epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    history: History
    epoch: int = 0
    stop: bool = False
    stop_reason: str | None = None
    best: float | None = None
    epochs_since_best: int = 0


class Callback:
    """Hooks into :func:`fit`; override the ones you need.

    A callback that remembers something across epochs returns it from :meth:`state_dict` (tensors,
    numbers, strings, lists and dicts of them), so that a checkpoint keeps it and a resumed fit
    hands it back through :meth:`load_state_dict` before ``on_train_begin``.
    """

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class KeepBest(Callback):
    """Remember the weights of the epoch with the lowest ``monitor`` (a validation metric by
    default) and restore them when training ends: early stopping that keeps the best epoch.

    Example:
        >>> fit(model, x, y, config, x_val=xv, y_val=yv, callbacks=[KeepBest()])  # doctest: +SKIP
    """

    def __init__(self, monitor: str = "val_loss") -> None:
        self.monitor = monitor
        self.best = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        value = state.history[-1][self.monitor]
        if value < self.best:
            self.best = value
            self.best_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def on_train_end(self, state: TrainState) -> None:
        if self.best_state is not None:
            state.model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_state = state["best"], state["best_state"]

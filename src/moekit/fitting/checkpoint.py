"""Checkpoints of a gradient fit: the model, the optimizer, the history and the shuffling
generator, written atomically, so that ``fit(..., resume=True)`` continues where a run stopped."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from moekit.fitting.callbacks import TrainState
from moekit.fitting.history import History
from moekit.io.files import atomic_path

logger = logging.getLogger(__name__)

RESUMABLE = ("epoch", "stop", "stop_reason", "best", "epochs_since_best")


def save_checkpoint(state: TrainState, generator: torch.Generator) -> None:
    """Write the fit's state to ``state.config.checkpoint_path`` atomically."""
    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "history": state.history.to_list(),
        "generator": generator.get_state(),
        "train_config": dataclasses.asdict(state.config),
        **{name: getattr(state, name) for name in RESUMABLE},
    }
    with atomic_path(Path(state.config.checkpoint_path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(state: TrainState, generator: torch.Generator) -> None:
    """Restore a fit's state from its checkpoint, if the file exists (else start from epoch 0)."""
    path = Path(state.config.checkpoint_path or "")
    if not state.config.checkpoint_path or not path.is_file():
        logger.info("resume: no checkpoint at %s; starting from epoch 0", path)
        return
    payload = torch.load(path, weights_only=True)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    state.history = History(payload["history"])
    for name in RESUMABLE:
        setattr(state, name, payload[name])
    if state.stop_reason == "max_epochs":  # a run that hit its cap goes on if the cap was raised
        state.stop_reason = None
    logger.info("resume: continuing from epoch %d of %s", state.epoch, path)

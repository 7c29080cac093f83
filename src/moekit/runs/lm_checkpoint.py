"""The training state of `moekit lm train` (both models, their AdamW optimizers and learning-rate
schedules, the batch generator), Ctrl-C deferred to the end of a step, the checkpoint, and the
check that a resumed run is the one interrupted.

Optimisation (nanoGPT's recipe): AdamW, betas (0.9, 0.95), weight decay on matrices (and the
embedding) only, the gradient norm clipped at 1 (in the step); the learning rate rises linearly
over ``warmup_steps`` then follows a cosine down to ``MIN_LR_RATIO`` * lr at the last step
(:func:`lr_factor`).

A checkpoint holds everything the next step depends on: both models' weights (buffers included:
the sigmoid router's bias), both AdamW optimizers, both learning-rate schedulers, the batch
generator's state, the history so far, the step reached, and the thread count the run computed on.
It is written atomically (``.lm.pt.xxxxxxxx.tmp`` renamed into place) inside the run's partial
folder (:data:`moekit.io.run_folder.CHECKPOINT_DIR`), so a kill at any moment leaves the previous
checkpoint whole, and a resumed run ends with exactly the weights and history an uninterrupted run
would have.

What makes a run that run (:func:`start_or_resume`) is recorded beside it as JSON: every option of
:class:`~moekit.runs.lm_train.LMTrainConfig` but :data:`RESUME_MAY_CHANGE` (its data paths made
absolute), and the sha256 of the corpus's bytes and labels. A resume with another record is refused,
naming each difference. ``steps`` may be raised (the cosine schedule is then stretched from the
step reached on), never lowered below the steps already run.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.exceptions import DataError, Setting
from moekit.io.files import atomic_path
from moekit.io.run_folder import CHECKPOINT_DIR, record_or_check_identity
from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.nn.routers import step_load_biases

logger = logging.getLogger(__name__)

MIN_LR_RATIO, BETAS, GRAD_CLIP = 0.1, (0.9, 0.95), 1.0
CHECKPOINT_FILE = "lm.pt"
FORMAT, KIND = 1, "lm-train"
MODELS = ("moe", "dense")
# Options that change neither the weights nor the history of the steps run (steps may be raised).
# snapshot_every: the snapshots taken stay; later ones follow the interval the resuming call gives.
RESUME_MAY_CHANGE = ("out", "overwrite", "resume", "progress", "threads", "steps",
                     "checkpoint_every", "snapshot_every")
# Identity entries that are not options: how a difference in them is said.
NOT_OPTIONS = {"corpus_sha256": lambda before, now: "other bytes in the data",
               "labels_sha256": lambda before, now: "other category labels (another Python's "
                                                    "tokenize)"}


@dataclass
class LMTrainingState:
    """What a step of `moekit lm train` reads and changes, for both models (keys :data:`MODELS`).

    ``history`` holds ``steps`` (one record per step: both training losses), ``evals`` (one
    record per evaluation: both validation bits per byte) and ``snapshots`` (one record per
    snapshot of the MoE saved: :mod:`.lm_snapshots`); ``step`` is the number of steps run.
    """

    models: dict[str, MoETransformerLM]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    batches: torch.Generator
    history: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"steps": [], "evals": [], "snapshots": []})
    step: int = 0


def lr_factor(step: int, warmup_steps: int, steps: int) -> float:
    """The learning rate of update ``step`` (from 0) as a fraction of ``lr``: (step + 1) /
    warmup_steps during the warm-up, then MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 + cos(pi * p)) / 2,
    p = (step - warmup_steps) / (steps - 1 - warmup_steps) the share of the decay done (so the
    last update, ``steps - 1``, is at MIN_LR_RATIO).

        >>> [round(lr_factor(s, 2, 6), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * p))


def new_state(configs: dict[str, LMConfig], *, seed: int, lr: float, weight_decay: float,
              warmup_steps: int, steps: int) -> LMTrainingState:
    """Both models (``configs`` by :data:`MODELS`) at their initial weights (each drawn from
    ``torch.Generator().manual_seed(seed)``), their optimizers and schedules, and the batch
    generator (seeded ``seed + 1``)."""
    models, optimizers, schedulers = {}, {}, {}
    for name in MODELS:
        model = MoETransformerLM(configs[name], generator=torch.Generator().manual_seed(seed))
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        optimizers[name] = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay},
             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=BETAS)
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[name], lambda s: lr_factor(s, warmup_steps, steps))
        models[name] = model.train()
    return LMTrainingState(models, optimizers, schedulers,
                           torch.Generator().manual_seed(seed + 1))


def train_step(state: LMTrainingState, x_BT: Tensor, y_BT: Tensor) -> None:
    """One step: both models updated on the batch ``x_BT`` -> ``y_BT`` (cross-entropy, plus the
    MoE's auxiliary losses), their gradient norms clipped at GRAD_CLIP; both losses (and the
    learning rate of the step) appended to the history."""
    record: dict[str, Any] = {"step": state.step + 1,
                              "lr": state.optimizers["moe"].param_groups[0]["lr"]}
    for name in MODELS:
        out = state.models[name].loss(x_BT, y_BT)
        state.optimizers[name].zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(state.models[name].parameters(), GRAD_CLIP)
        state.optimizers[name].step()
        step_load_biases(state.models[name])  # the sigmoid router's bias: once per step
        state.schedulers[name].step()
        record[f"{name}_loss"] = float(out.cross_entropy.detach())
        if name == "moe":
            record["moe_aux_loss"] = float(out.aux_loss.detach())
    state.history["steps"].append(record)
    state.step += 1


class StopRequest:
    """Ctrl-C, deferred to the end of the step it comes in (a second one stops at once): inside
    the block, SIGINT sets ``requested`` and :meth:`check` raises KeyboardInterrupt. Installed
    only in the main thread over Python's default handler; the previous handler comes back."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def checkpoint_path(build: Path) -> Path:
    """Where the run built in ``build`` keeps its checkpoint."""
    return Path(build) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_lm_checkpoint(path: Path, state: LMTrainingState, threads: int) -> None:
    """Write ``state`` (and the thread count it was computed on) to ``path`` atomically."""
    payload = {
        "format": FORMAT, "kind": KIND, "step": state.step, "threads": threads,
        "history": json.dumps(state.history),  # floats as JSON: the same text read back
        "batches": state.batches.get_state(),
        **{f"{name}.model": state.models[name].state_dict() for name in MODELS},
        **{f"{name}.optimizer": state.optimizers[name].state_dict() for name in MODELS},
        **{f"{name}.scheduler": state.schedulers[name].state_dict() for name in MODELS},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    logger.info("lm train: checkpoint at step %d in %s", state.step, path)


def read_lm_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when there is none), after removing what killed writes of
    it left; a DataError naming the file when it cannot be read or is not one of ours."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    if not path.is_file():
        return None
    fix = "pass overwrite=True to start the run again"
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated zip, a damaged pickle, another file: all unusable
        raise DataError(f"the checkpoint {str(path)!r} is truncated or corrupted "
                        f"({type(err).__name__}); {fix}.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT \
            or payload.get("kind") != KIND:
        raise DataError(f"{str(path)!r} is not a checkpoint of `moekit lm train` "
                        f"(format {FORMAT}); {fix}.")
    return payload


def restore_lm_checkpoint(state: LMTrainingState, payload: dict[str, Any], steps: int) -> None:
    """Load a checkpoint into ``state`` (models, optimizers, schedulers, generator, history, step);
    a DataError when it has run more than ``steps`` steps."""
    if payload["step"] > steps:
        raise DataError(f"the interrupted run has already run {payload['step']} steps; "
                        "this call has ", Setting("steps", steps), "; pass ",
                        Setting("steps", payload["step"]), " or more to resume it.")
    for name in MODELS:
        state.models[name].load_state_dict(payload[f"{name}.model"])
        state.optimizers[name].load_state_dict(payload[f"{name}.optimizer"])
        state.schedulers[name].load_state_dict(payload[f"{name}.scheduler"])
    state.batches.set_state(payload["batches"])
    state.history = json.loads(payload["history"])
    state.step = payload["step"]
    logger.info("lm train: resuming at step %d", state.step)


def start_or_resume(build: Path, identity: dict[str, Any], resume: bool) -> None:
    """Record the run's ``identity`` in its partial folder ``build``; when resuming a run that
    recorded one, refuse (a DataError) an identity that differs, naming every difference."""
    record_or_check_identity(build, identity, resume=resume, command="lm train --resume",
                             what="run", explain=NOT_OPTIONS)

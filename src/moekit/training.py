"""The gradient fitting loop for mixtures of experts.

Shape legend: N rows, D input features, O outputs, C classes (C = O for classification).

Full batch with plain SGD and no momentum is the protocol of Jacobs et al. (1991); minibatches, Adam
and L-BFGS are there for everything else. Each epoch ends with the model evaluated on the whole
training set (and the validation set, if given); those metrics drive stopping and the history.

Metrics (prefixed ``train_`` or ``val_``):
    loss      the objective (the named error function, mean over rows, plus the layer's aux loss)
    sse       squared error of the blended output per case: mean over rows of sum over outputs
    mse       squared error per output unit: mean over rows and outputs
    accuracy  classification only: the class with the highest blended output is the answer
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit._checks import (check_choice, check_finite, check_int, check_matrix,
                            check_positive_float, check_same_rows)
from moekit.history import History
from moekit.io import atomic_path
from moekit.lbfgs import RestartingLBFGS
from moekit.losses import mixture_loss, resolve_loss_name

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "lbfgs")
METRICS = ("loss", "sse", "mse", "accuracy")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit. The defaults are the paper's: full batch, SGD, no momentum, Eq. 3.

    Attributes:
        loss: 'mixture_nll' (Eq. 3, alias 'eq3'), 'competitive' ('eq2'), 'cooperative' ('eq1'),
            or 'categorical_nll' (class-index targets, softmax-head experts).
        variance: the Gaussian variance of Eq. 3 (1 in the paper).
        optimizer: 'sgd' (plain, no momentum), 'adam' or 'lbfgs' (strong-Wolfe line search,
            restarted from the gradient when a step stalls).
        lr: the step size.
        max_epochs: the cap on epochs; reaching it is reported as ``stop_reason='max_epochs'``.
        batch_size: rows per update; None is full batch (one update per epoch, as in the paper).
        stop_metric, stop_threshold: stop once the metric reaches the threshold (at or below it,
            or at or above it for an accuracy), e.g. ('train_sse', 0.08).
        patience: stop after this many epochs without an improvement of ``monitor`` by more than
            ``min_delta``; None disables it.
        weight_decay: an L2 penalty, weight_decay / 2 * (sum of squared weights), added to the
            objective that is minimised (the ``loss`` metrics do not include it); 0 disables it.
        seed: seeds the generator that shuffles minibatches (model weights come from the caller).
        progress: show a progress bar (on stderr).
        checkpoint_path: if set, a checkpoint is written there every ``checkpoint_every`` epochs and at
            the end; ``fit(..., resume=True)`` continues from it.
    """

    loss: str = "mixture_nll"
    variance: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.1
    max_epochs: int = 1000
    batch_size: int | None = None
    stop_metric: str | None = None
    stop_threshold: float | None = None
    patience: int | None = None
    monitor: str = "train_loss"
    min_delta: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True
    checkpoint_path: str | None = None
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        object.__setattr__(self, "loss", resolve_loss_name(self.loss))
        check_positive_float(owner, "variance", self.variance)
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_positive_float(owner, "lr", self.lr)
        check_int(owner, "max_epochs", self.max_epochs, minimum=1)
        if self.batch_size is not None:
            check_int(owner, "batch_size", self.batch_size, minimum=1)
        if (self.stop_metric is None) != (self.stop_threshold is None):
            raise ValueError(f"{owner}: stop_metric and stop_threshold go together; got "
                             f"stop_metric={self.stop_metric!r}, stop_threshold={self.stop_threshold!r}.")
        for name in ("stop_metric", "monitor"):
            value = getattr(self, name)
            if value is not None:
                _check_metric_name(owner, name, value)
        if self.patience is not None:
            check_int(owner, "patience", self.patience, minimum=1)
        check_int(owner, "checkpoint_every", self.checkpoint_every, minimum=1)
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ValueError(f"{owner}: weight_decay must be a number >= 0; "
                             f"got weight_decay={self.weight_decay!r}.")


def _check_metric_name(owner: str, name: str, value: str) -> None:
    prefix, _, metric = value.partition("_")
    if prefix not in ("train", "val") or metric not in METRICS:
        choices = [f"{p}_{m}" for p in ("train", "val") for m in METRICS]
        check_choice(owner, name, value, choices)


def _higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


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
    """Hooks into :func:`fit`; override the ones you need."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`fit`: the history, the epochs run, and why it stopped
    ('threshold', 'patience', 'callback', 'diverged' or 'max_epochs')."""

    history: History
    epochs: int
    stop_reason: str
    config: TrainConfig = field(repr=False)

    @property
    def reached_threshold(self) -> bool:
        return self.stop_reason == "threshold"


@dataclass(frozen=True)
class Targets:
    """Targets in the forms the losses and metrics need."""

    for_loss: Tensor  # (N, O) floats, or (N,) class indices for 'categorical_nll'
    dense_NO: Tensor  # (N, O) floats: one-hot rows for classification
    classes_N: Tensor | None  # class indices for classification, else None


def prepare_targets(owner: str, name: str, y: Tensor, *, out_features: int, loss: str,
                    dtype: torch.dtype) -> Targets:
    """Validate ``y`` and derive its forms. Integer 1-D targets are class indices in [0, O)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor; got {type(y).__name__}.")
    if not y.is_floating_point():
        if y.ndim != 1:
            raise ValueError(f"{owner}: class-index {name} must be 1-D; got shape {tuple(y.shape)}.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out_features):
            raise ValueError(f"{owner}: class indices in {name} must lie in [0, {out_features}) for a "
                             f"model with out_features={out_features}; got values from {int(y.min())} "
                             f"to {int(y.max())}.")
        classes_N = y.long()
        dense_NO = nn.functional.one_hot(classes_N, out_features).to(dtype)
        return Targets(classes_N if loss == "categorical_nll" else dense_NO, dense_NO, classes_N)
    if loss == "categorical_nll":
        raise ValueError(f"{owner}: loss='categorical_nll' needs integer class indices in {name}; "
                         f"got dtype={y.dtype}. Pass y.long(), or use loss='mixture_nll'.")
    check_finite(owner, name, y)
    dense_NO = y.reshape(-1, 1) if y.ndim == 1 else y
    if dense_NO.ndim != 2 or dense_NO.shape[1] != out_features:
        raise ValueError(f"{owner}: {name} must have shape (N, {out_features}) to match the model's "
                         f"out_features={out_features}; got {tuple(y.shape)}.")
    dense_NO = dense_NO.to(dtype)
    return Targets(dense_NO, dense_NO, None)


@torch.no_grad()
def evaluate(model: nn.Module, x_ND: Tensor, targets: Targets, config: TrainConfig,
             prefix: str) -> dict[str, float]:
    """The metrics of ``model`` on one data set, named ``{prefix}_{metric}``."""
    out = model(x_ND)
    loss = mixture_loss(config.loss, out, targets.for_loss, variance=config.variance) + out.aux_loss
    sq_NO = (targets.dense_NO - out.output).square()
    metrics = {"loss": loss.item(), "sse": sq_NO.sum(-1).mean().item(), "mse": sq_NO.mean().item()}
    if targets.classes_N is not None:
        metrics["accuracy"] = (out.output.argmax(-1) == targets.classes_N).double().mean().item()
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.0)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return RestartingLBFGS(params, lr=config.lr, max_iter=1, line_search_fn="strong_wolfe")


def _batches(n_rows: int, batch_size: int | None, generator: torch.Generator) -> list[Tensor | None]:
    if batch_size is None or batch_size >= n_rows:
        return [None]  # full batch: no indexing, no shuffling
    order = torch.randperm(n_rows, generator=generator)
    return list(order.split(batch_size))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x_ND: Tensor,
                 targets: Targets, config: TrainConfig, generator: torch.Generator) -> None:
    """One pass over the data: one update per (shuffled) minibatch, or one full-batch update."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for rows in _batches(x_ND.shape[0], config.batch_size, generator):
        x_batch = x_ND if rows is None else x_ND[rows]
        y_batch = targets.for_loss if rows is None else targets.for_loss[rows]

        def closure(x_batch: Tensor = x_batch, y_batch: Tensor = y_batch) -> Tensor:
            optimizer.zero_grad()
            out = model(x_batch)
            loss = mixture_loss(config.loss, out, y_batch, variance=config.variance) + out.aux_loss
            if config.weight_decay:
                loss = loss + 0.5 * config.weight_decay * sum(p.square().sum() for p in params)
            loss.backward()
            return loss

        optimizer.step(closure)
    model.eval()


def _update_stopping(state: TrainState, record: dict[str, float]) -> None:
    config = state.config
    if not math.isfinite(record["train_loss"]):
        warnings.warn(f"fit: the training loss became {record['train_loss']} at epoch {state.epoch} "
                      f"with optimizer={config.optimizer!r}, lr={config.lr}; training stopped. "
                      "Lower lr (or use optimizer='adam').", RuntimeWarning, stacklevel=3)
        state.stop, state.stop_reason = True, "diverged"
        return
    if config.stop_metric is not None:
        value = record[config.stop_metric]
        hit = value >= config.stop_threshold if _higher_is_better(config.stop_metric) \
            else value <= config.stop_threshold
        if hit:
            state.stop, state.stop_reason = True, "threshold"
            return
    if config.patience is not None:
        value = record[config.monitor]
        sign = -1.0 if _higher_is_better(config.monitor) else 1.0
        if state.best is None or sign * (state.best - value) > config.min_delta:
            state.best, state.epochs_since_best = value, 0
        else:
            state.epochs_since_best += 1
            if state.epochs_since_best >= config.patience:
                state.stop, state.stop_reason = True, "patience"


def fit(model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig | None = None, *,
        x_val: Tensor | None = None, y_val: Tensor | None = None,
        callbacks: Sequence[Callback] = (), resume: bool = False) -> TrainResult:
    """Fit a mixture of experts by gradient descent on the configured error function.

    Args:
        model: a layer returning :class:`~moekit.layers.MoEOutput`, with a ``config`` that has
            ``in_features`` and ``out_features`` (e.g. :class:`~moekit.layers.MixtureOfExperts`).
        x: inputs, (N, D). y: targets, (N, O) floats or (N,) class indices.
        config: a :class:`TrainConfig`; the defaults are the paper's protocol.
        x_val, y_val: an optional validation set, evaluated every epoch as ``val_*`` metrics.
        callbacks: :class:`Callback` objects called at the start, after each epoch, and at the end.
        resume: continue from ``config.checkpoint_path`` if that file exists.

    Returns:
        a :class:`TrainResult`; the model is trained in place.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> x = torch.linspace(0, 1, 50).reshape(-1, 1); y = (x > 0.5).double() * x
        >>> moe = MixtureOfExperts(1, 1, 2).double()
        >>> fit(moe, x.double(), y, TrainConfig(max_epochs=5, progress=False)).epochs
        5
    """
    config = config or TrainConfig()
    in_features, out_features = model.config.in_features, model.config.out_features
    x_ND, targets = _checked_data(model, "x", "y", x, y, config, in_features, out_features)
    val = None
    if (x_val is None) != (y_val is None):
        raise ValueError("fit: pass x_val and y_val together, or neither.")
    if x_val is not None:
        val = _checked_data(model, "x_val", "y_val", x_val, y_val, config, in_features, out_features)
    _check_metrics_produced(config, targets, None if val is None else val[1])

    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    state = TrainState(model, optimizer, config, History())
    if resume:
        _load_checkpoint(state, generator)
    for callback in callbacks:
        callback.on_train_begin(state)

    bar = tqdm(total=config.max_epochs, initial=state.epoch, desc="fit", unit="epoch",
               disable=not config.progress, leave=False)
    while not state.stop and state.epoch < config.max_epochs:
        train_epoch(model, optimizer, x_ND, targets, config, generator)
        state.epoch += 1
        record = {"epoch": state.epoch, **evaluate(model, x_ND, targets, config, "train")}
        if val is not None:
            record.update(evaluate(model, *val, config, "val"))
        state.history.append(record)
        _update_stopping(state, record)
        for callback in callbacks:
            callback.on_epoch_end(state)
        if state.stop and state.stop_reason is None:
            state.stop_reason = "callback"
        if config.checkpoint_path and (state.epoch % config.checkpoint_every == 0 or state.stop):
            _save_checkpoint(state, generator)
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.4g}", refresh=False)
    bar.close()

    state.stop_reason = state.stop_reason or "max_epochs"
    if config.checkpoint_path:
        _save_checkpoint(state, generator)
    for callback in callbacks:
        callback.on_train_end(state)
    logger.info("fit stopped after %d epochs (%s)", state.epoch, state.stop_reason)
    return TrainResult(state.history, state.epoch, state.stop_reason, config)


def _check_metrics_produced(config: TrainConfig, targets: Targets, val_targets: Targets | None
                            ) -> None:
    """Raise a ValueError, before any training, for a requested metric no epoch will record: a
    'val_*' metric without a validation set, or an accuracy without class-index targets."""
    names = ["stop_metric"] + (["monitor"] if config.patience is not None else [])
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        prefix, _, metric = value.partition("_")
        if prefix == "val" and val_targets is None:
            raise ValueError(f"fit: {name}={value!r} needs a validation set; pass x_val and y_val, "
                             f"or use {name}='train_{metric}'.")
        used = targets if prefix == "train" else val_targets
        if metric == "accuracy" and used.classes_N is None:
            data = "y" if prefix == "train" else "y_val"
            raise ValueError(f"fit: {name}={value!r} needs class-index targets (classification); "
                             f"{data} holds floats (a regression). Pass integer class indices in "
                             f"{data}, or use {name}='{prefix}_mse' (or '{prefix}_sse', "
                             f"'{prefix}_loss').")


def _checked_data(model: nn.Module, x_name: str, y_name: str, x: Tensor, y: Tensor,
                  config: TrainConfig, in_features: int, out_features: int
                  ) -> tuple[Tensor, Targets]:
    check_matrix("fit", x_name, x, n_columns=in_features)
    check_finite("fit", x_name, x)
    check_same_rows("fit", **{x_name: x, y_name: y})
    if x.shape[0] == 0:
        raise ValueError(f"fit: {x_name} has no rows; pass at least one row.")
    dtype = next(model.parameters()).dtype
    if x.dtype != dtype:
        raise TypeError(f"fit: {x_name} has dtype {x.dtype} but the model's weights are {dtype}; "
                        f"convert one of them (x.to({dtype}) or model.to({x.dtype})).")
    return x, prepare_targets("fit", y_name, y, out_features=out_features, loss=config.loss,
                              dtype=dtype)


_RESUMABLE = ("epoch", "stop", "stop_reason", "best", "epochs_since_best")


def _save_checkpoint(state: TrainState, generator: torch.Generator) -> None:
    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "history": state.history.to_list(),
        "generator": generator.get_state(),
        "train_config": dataclasses.asdict(state.config),
        **{name: getattr(state, name) for name in _RESUMABLE},
    }
    with atomic_path(Path(state.config.checkpoint_path)) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(state: TrainState, generator: torch.Generator) -> None:
    path = Path(state.config.checkpoint_path or "")
    if not state.config.checkpoint_path or not path.is_file():
        logger.info("resume: no checkpoint at %s; starting from epoch 0", path)
        return
    payload = torch.load(path, weights_only=True)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    state.history = History(payload["history"])
    for name in _RESUMABLE:
        setattr(state, name, payload[name])
    if state.stop_reason == "max_epochs":  # a run that hit its cap goes on if the cap was raised
        state.stop_reason = None
    logger.info("resume: continuing from epoch %d of %s", state.epoch, path)

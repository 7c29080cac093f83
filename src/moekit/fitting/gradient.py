"""The gradient fitting loop for mixtures of experts.

Shape legend: N rows, D input features, O outputs, C classes (C = O for classification).

Full batch with plain SGD and no momentum is the protocol of Jacobs et al. (1991); minibatches, Adam
and L-BFGS are there for everything else. Each epoch ends with the model evaluated on the whole
training set, or with the running means of its batches (``TrainConfig.train_metrics``), and on the
validation set if given; those metrics (:mod:`moekit.fitting.config`) drive stopping and the
history.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit._checks import check_finite, check_matrix, check_same_rows
from moekit.exceptions import ConvergenceWarning, DivergenceWarning
from moekit.fitting.callbacks import Callback, TrainState
from moekit.fitting.checkpoint import fit_identity, load_checkpoint, save_checkpoint
from moekit.fitting.config import TrainConfig, higher_is_better
from moekit.fitting.history import History
from moekit.fitting.lbfgs import RestartingLBFGS
from moekit.fitting.objective import Targets, mixture_loss, prepare_targets
from moekit.nn.outputs import MoEOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`fit`: the history, the epochs run, and why it stopped
    ('threshold', 'patience', 'callback', 'diverged', 'max_epochs', or 'interrupted': Ctrl-C with
    ``TrainConfig(on_interrupt='stop')``)."""

    history: History
    epochs: int
    stop_reason: str
    config: TrainConfig = field(repr=False)

    @property
    def reached_threshold(self) -> bool:
        return self.stop_reason == "threshold"


@torch.no_grad()
def _metrics(out: MoEOutput, loss: Tensor, dense_NO: Tensor, classes_N: Tensor | None
             ) -> dict[str, float]:
    sq_NO = (dense_NO - out.output).square()
    metrics = {"loss": loss.item(), "sse": sq_NO.sum(-1).mean().item(), "mse": sq_NO.mean().item()}
    if classes_N is not None:
        metrics["accuracy"] = (out.output.argmax(-1) == classes_N).double().mean().item()
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, x_ND: Tensor, targets: Targets, config: TrainConfig,
             prefix: str) -> dict[str, float]:
    """The metrics of ``model`` on one data set, named ``{prefix}_{metric}``."""
    out = model(x_ND)
    loss = mixture_loss(config.loss, out, targets.for_loss, variance=config.variance) + out.aux_loss
    metrics = _metrics(out, loss, targets.dense_NO, targets.classes_N)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return RestartingLBFGS(params, lr=config.lr, max_iter=1, line_search_fn="strong_wolfe")


def _batches(n_rows: int, batch_size: int | None,
             generator: torch.Generator) -> list[Tensor | None]:
    if batch_size is None or batch_size >= n_rows:
        return [None]  # full batch: no indexing, no shuffling
    order = torch.randperm(n_rows, generator=generator)
    return list(order.split(batch_size))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x_ND: Tensor,
                targets: Targets, config: TrainConfig, generator: torch.Generator
                ) -> dict[str, float]:
    """One pass over the data: one update per (shuffled) minibatch, or one full-batch update.

    Returns the running ``train_*`` metrics (``config.train_metrics='running'``): each batch's
    metrics from the forward pass of its update, averaged over rows; else an empty dict.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    running = config.train_metrics == "running"
    totals: dict[str, float] = {}
    for rows in _batches(x_ND.shape[0], config.batch_size, generator):
        x_batch = x_ND if rows is None else x_ND[rows]
        y_batch = targets.for_loss if rows is None else targets.for_loss[rows]
        seen: list[dict[str, float]] = []  # L-BFGS calls the closure more than once per step

        def closure(x_batch: Tensor = x_batch, y_batch: Tensor = y_batch,
                    rows: Tensor | None = rows, seen: list = seen) -> Tensor:
            optimizer.zero_grad()
            out = model(x_batch)
            loss = mixture_loss(config.loss, out, y_batch, variance=config.variance) + out.aux_loss
            if running and not seen:
                seen.append(_batch_metrics(out, loss, targets, rows))
            if config.weight_decay:
                loss = loss + 0.5 * config.weight_decay * sum(p.square().sum() for p in params)
            loss.backward()
            return loss

        optimizer.step(closure)
        if seen:
            n_batch = x_batch.shape[0]
            for name, value in seen[0].items():
                totals[name] = totals.get(name, 0.0) + value * n_batch
    model.eval()
    return {f"train_{name}": total / x_ND.shape[0] for name, total in totals.items()}


def _batch_metrics(out: MoEOutput, loss: Tensor, targets: Targets, rows: Tensor | None
                   ) -> dict[str, float]:
    dense_NO = targets.dense_NO if rows is None else targets.dense_NO[rows]
    classes_N = targets.classes_N
    if classes_N is not None and rows is not None:
        classes_N = classes_N[rows]
    return _metrics(out, loss.detach(), dense_NO, classes_N)


def _update_stopping(state: TrainState, record: dict[str, float]) -> None:
    config = state.config
    if not math.isfinite(record["train_loss"]):
        warnings.warn(f"fit: the training loss became {record['train_loss']} at epoch "
                      f"{state.epoch} with optimizer={config.optimizer!r}, lr={config.lr}; "
                      "training stopped. Lower lr (or use optimizer='adam').",
                      DivergenceWarning, stacklevel=3)
        state.stop, state.stop_reason = True, "diverged"
        return
    if config.stop_metric is not None:
        value = record[config.stop_metric]
        hit = value >= config.stop_threshold if higher_is_better(config.stop_metric) \
            else value <= config.stop_threshold
        if hit:
            state.stop, state.stop_reason = True, "threshold"
            return
    if config.patience is not None:
        value = record[config.monitor]
        sign = -1.0 if higher_is_better(config.monitor) else 1.0
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
        model: a layer returning :class:`~moekit.nn.outputs.MoEOutput`, with a ``config`` that has
            ``in_features`` and ``out_features`` (e.g. :class:`~moekit.nn.dense.MixtureOfExperts`).
        x: inputs, (N, D). y: targets, (N, O) floats or (N,) class indices.
        config: a :class:`TrainConfig`; the defaults are the paper's protocol.
        x_val, y_val: an optional validation set, evaluated every epoch as ``val_*`` metrics.
        callbacks: :class:`Callback` objects called at the start, after each epoch, and at the end.
        resume: continue from ``config.checkpoint_path`` if that file exists (else start). The
            checkpoint must be this fit's: the same model (class, config, parameter shapes), data
            and TrainConfig, but for ``max_epochs``, ``progress`` and the checkpoint settings;
            anything else is refused with a DataError naming each difference, as is a file that
            cannot be read (:mod:`moekit.fitting.checkpoint`). Callbacks may change. Killed at
            any point and resumed, the fit ends with the weights of an uninterrupted one.

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
        val = _checked_data(model, "x_val", "y_val", x_val, y_val, config, in_features,
                            out_features)
    _check_metrics_produced(config, targets, None if val is None else val[1])

    if resume and not config.checkpoint_path:
        raise ValueError("fit: resume=True needs the file to resume from; set "
                         "TrainConfig(checkpoint_path=...), or pass resume=False.")
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    state = TrainState(model, optimizer, config, History())
    identity = None
    if config.checkpoint_path:  # computed once: hashing the data each save would cost an epoch
        identity = fit_identity(model, optimizer, config,
                                {"x": x, "y": y, "x_val": x_val, "y_val": y_val})
    if resume:
        load_checkpoint(state, generator, callbacks, identity)
    for callback in callbacks:
        callback.on_train_begin(state)

    bar = _progress_bar(config, state.epoch)
    try:
        while not state.stop and state.epoch < config.max_epochs:
            record = _run_epoch(state, generator, x_ND, targets, val)
            for callback in callbacks:
                callback.on_epoch_end(state)
            if state.stop and state.stop_reason is None:
                state.stop_reason = "callback"
            if config.checkpoint_path and (state.epoch % config.checkpoint_every == 0
                                           or state.stop):
                save_checkpoint(state, generator, callbacks, identity)
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
    except KeyboardInterrupt:
        if config.on_interrupt == "raise":
            raise
        # the epoch under way is dropped; the last checkpoint (if any) stays the resumable state
        state.stop, state.stop_reason = True, "interrupted"
        identity = None
    finally:
        bar.close()

    state.stop_reason = state.stop_reason or "max_epochs"
    if state.stop_reason == "max_epochs" and config.stop_metric is not None and len(state.history):
        warnings.warn(f"fit: {config.stop_metric} did not reach {config.stop_threshold} within "
                      f"max_epochs={config.max_epochs} (last value "
                      f"{state.history[-1][config.stop_metric]:.4g}). Raise max_epochs or lr.",
                      ConvergenceWarning, stacklevel=2)
    if config.checkpoint_path and identity is not None:
        save_checkpoint(state, generator, callbacks, identity)
    for callback in callbacks:
        callback.on_train_end(state)
    logger.info("fit stopped after %d epochs (%s)", state.epoch, state.stop_reason)
    return TrainResult(state.history, state.epoch, state.stop_reason, config)


def _run_epoch(state: TrainState, generator: torch.Generator, x_ND: Tensor, targets: Targets,
               val: tuple[Tensor, Targets] | None) -> dict[str, float]:
    """Train one epoch, record its metrics in the history and update the stopping state."""
    config = state.config
    running = train_epoch(state.model, state.optimizer, x_ND, targets, config, generator)
    state.epoch += 1
    record = {"epoch": state.epoch,
              **(running or evaluate(state.model, x_ND, targets, config, "train"))}
    if val is not None:
        record.update(evaluate(state.model, *val, config, "val"))
    state.history.append(record)
    _update_stopping(state, record)
    return record


def _progress_bar(config: TrainConfig, epoch: int) -> tqdm:
    """A bar labelled ``config.progress_label``; it counts to ``max_epochs`` only when the fit
    runs to the cap (no ``patience``), else it counts epochs without a made-up end."""
    total = config.max_epochs if config.patience is None and config.stop_metric is None else None
    return tqdm(total=total, initial=epoch, desc=config.progress_label, unit="epoch",
                disable=not config.progress, leave=True, dynamic_ncols=True)


def _postfix(record: dict[str, float]) -> dict[str, str]:
    """The bar's numbers: the held-out loss and accuracy when there is a validation set."""
    shown = [k for k in ("train_loss", "val_loss", "val_accuracy") if k in record]
    return {k: f"{record[k]:.4g}" for k in shown}


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



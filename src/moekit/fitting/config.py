"""How to fit by gradient: :class:`TrainConfig`, and the metrics a fit records.

Metrics (prefixed ``train_`` or ``val_``):
    loss      the objective (the named error function, mean over rows, plus the layer's aux loss)
    sse       squared error of the blended output per case: mean over rows of sum over outputs
    mse       squared error per output unit: mean over rows and outputs
    accuracy  classification only: the class with the highest blended output is the answer

The ``train_`` metrics are exact by default: the model evaluated on every training row after the
epoch (the paper's stopping rule needs that). ``train_metrics='running'`` records instead the mean
over the epoch's minibatches of each batch's metrics, taken in the forward pass of its update (the
weights before the update, as scikit-learn's MLP reports its loss): no second pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.fitting.objective import resolve_loss_name

OPTIMIZERS = ("sgd", "adam", "lbfgs")
TRAIN_METRICS = ("full", "running")
ON_INTERRUPT = ("raise", "stop")
METRICS = ("loss", "sse", "mse", "accuracy")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit. The defaults are the paper's: full batch, SGD, no momentum, Eq. 3.

    Attributes:
        loss: 'mixture_nll' (Eq. 3, alias 'eq3'), 'competitive' ('eq2'), 'cooperative' ('eq1'),
            or 'categorical_nll' (class-index targets, softmax-head experts).
        variance: the Gaussian variance of Eq. 3 (1 in the paper).
        optimizer: 'sgd' (gradient descent, plain unless ``momentum``), 'adam' or 'lbfgs'
            (strong-Wolfe line search, restarted from the gradient when a step stalls).
        lr: the step size.
        momentum: SGD's momentum (optimizer='sgd' only); 0, the paper's, is plain gradient descent.
        max_epochs: the cap on epochs; reaching it is reported as ``stop_reason='max_epochs'``.
        batch_size: rows per update; None is full batch (one update per epoch, as in the paper).
        stop_metric, stop_threshold: stop once the metric reaches the threshold (at or below it,
            or at or above it for an accuracy), e.g. ('train_sse', 0.08).
        patience: stop after this many epochs without an improvement of ``monitor`` by more than
            ``min_delta``; None disables it.
        weight_decay: an L2 penalty, weight_decay / 2 * (sum of squared weights), added to the
            objective that is minimised (the ``loss`` metrics do not include it); 0 disables it.
        seed: seeds the generator that shuffles minibatches (model weights come from the caller).
        train_metrics: 'full' (every training row evaluated after each epoch) or 'running' (the
            mean of the batches' metrics during the epoch; see the module's docstring).
        progress: show a progress bar (on stderr), labelled ``progress_label``.
        on_interrupt: what Ctrl-C (KeyboardInterrupt) during an epoch does: 'raise' it, or
            'stop' the fit there as if a callback had stopped it, with
            ``stop_reason='interrupted'`` (callbacks' ``on_train_end`` still run, so
            :class:`~moekit.fitting.callbacks.KeepBest` restores the best epoch).
        checkpoint_path: if set, a checkpoint is written there every ``checkpoint_every`` epochs
            and at the end; ``fit(..., resume=True)`` continues from it. A resumed fit must have
            the same config, but for ``RESUME_MAY_CHANGE`` (:mod:`moekit.fitting.checkpoint`):
            ``max_epochs`` (raised, or kept above the epochs already run), ``progress``,
            ``checkpoint_path`` and ``checkpoint_every``.
    """

    loss: str = "mixture_nll"
    variance: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    max_epochs: int = 1000
    batch_size: int | None = None
    stop_metric: str | None = None
    stop_threshold: float | None = None
    patience: int | None = None
    monitor: str = "train_loss"
    min_delta: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    train_metrics: str = "full"
    progress: bool = True
    progress_label: str = "fit"
    on_interrupt: str = "raise"
    checkpoint_path: str | None = None
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        object.__setattr__(self, "loss", resolve_loss_name(self.loss))
        check_positive_float(owner, "variance", self.variance)
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_positive_float(owner, "lr", self.lr)
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"{owner}: momentum must be a number in [0, 1); "
                             f"got momentum={self.momentum!r}.")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"{owner}: momentum applies to optimizer='sgd' only; got "
                             f"momentum={self.momentum!r} with optimizer={self.optimizer!r}. "
                             "Pass momentum=0.0, or optimizer='sgd'.")
        check_int(owner, "max_epochs", self.max_epochs, minimum=1)
        if self.batch_size is not None:
            check_int(owner, "batch_size", self.batch_size, minimum=1)
        if (self.stop_metric is None) != (self.stop_threshold is None):
            raise ValueError(f"{owner}: stop_metric and stop_threshold go together; got "
                             f"stop_metric={self.stop_metric!r}, "
                             f"stop_threshold={self.stop_threshold!r}.")
        for name in ("stop_metric", "monitor"):
            value = getattr(self, name)
            if value is not None:
                check_metric_name(owner, name, value)
        if self.patience is not None:
            check_int(owner, "patience", self.patience, minimum=1)
        check_int(owner, "checkpoint_every", self.checkpoint_every, minimum=1)
        check_choice(owner, "train_metrics", self.train_metrics, TRAIN_METRICS)
        check_choice(owner, "on_interrupt", self.on_interrupt, ON_INTERRUPT)
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ValueError(f"{owner}: weight_decay must be a number >= 0; "
                             f"got weight_decay={self.weight_decay!r}.")


def check_metric_name(owner: str, name: str, value: str) -> None:
    prefix, _, metric = value.partition("_")
    if prefix not in ("train", "val") or metric not in METRICS:
        choices = [f"{p}_{m}" for p in ("train", "val") for m in METRICS]
        check_choice(owner, name, value, choices)


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")

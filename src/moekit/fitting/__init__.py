"""How parameters are found: the objective the loops share, gradient fitting (one run, or many
replicate runs as one batched computation), and EM.

:mod:`~moekit.fitting.objective` (error function names, targets) is at the bottom; then
:mod:`~moekit.fitting.config`, :mod:`~moekit.fitting.callbacks`, :mod:`~moekit.fitting.history`,
:mod:`~moekit.fitting.checkpoint` and :mod:`~moekit.fitting.gradient` (``fit``);
:mod:`~moekit.fitting.replicates` with its engines; :mod:`~moekit.fitting.em_config`,
:mod:`~moekit.fitting.em_steps` and :mod:`~moekit.fitting.em` (``fit_em``).
"""

from moekit.fitting.callbacks import Callback, KeepBest, TrainState
from moekit.fitting.config import TrainConfig
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.fitting.gradient import TrainResult, evaluate, fit
from moekit.fitting.history import History
from moekit.fitting.objective import LOSS_NAMES, Targets, mixture_loss, prepare_targets
from moekit.fitting.replicates import ReplicateConfig, ReplicateResult, train_replicates

__all__ = [
    "LOSS_NAMES",
    "Callback",
    "EMConfig",
    "EMResult",
    "History",
    "KeepBest",
    "ReplicateConfig",
    "ReplicateResult",
    "Targets",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "evaluate",
    "fit",
    "fit_em",
    "mixture_loss",
    "prepare_targets",
    "train_replicates",
]

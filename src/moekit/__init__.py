"""moekit: mixtures of experts, from Jacobs et al. (1991) to sparse routed layers.

    >>> from moekit import MixtureOfExperts, TrainConfig, fit
"""

from moekit._version import __version__
from moekit.experts import ExpertConfig, LinearExperts, MLPExperts
from moekit.gates import GateConfig, RouterConfig, Routing, SoftmaxGate
from moekit.history import History
from moekit.io import load_model, save_model
from moekit.layers import MixtureOfExperts, MoEConfig, MoEOutput, SparseMoE, SparseMoEConfig
from moekit.losses import (categorical_mixture_nll, competitive_loss, cooperative_loss,
                           mixture_loss, mixture_nll, responsibilities)
from moekit.training import Callback, TrainConfig, TrainResult, TrainState, evaluate, fit

__all__ = [
    "__version__", "ExpertConfig", "LinearExperts", "MLPExperts", "GateConfig", "Routing",
    "SoftmaxGate", "RouterConfig", "SparseMoE", "SparseMoEConfig", "History", "load_model", "save_model", "MixtureOfExperts", "MoEConfig",
    "MoEOutput", "categorical_mixture_nll", "competitive_loss", "cooperative_loss", "mixture_loss",
    "mixture_nll", "responsibilities", "Callback", "TrainConfig", "TrainResult", "TrainState",
    "evaluate", "fit",
]

"""moekit: mixtures of experts, from Jacobs et al. (1991) to sparse routed layers.

    >>> from moekit import MixtureOfExperts, TrainConfig, fit
"""

from moekit._version import __version__
from moekit.cpu_memory import keep_freed_memory
from moekit.experts import ExpertConfig, LinearExperts, MLPExperts
from moekit.gates import GateConfig, RouterConfig, Routing, SoftmaxGate
from moekit.grad_memory import release_gradient_memory
from moekit.em import EMConfig, EMResult, fit_em
from moekit.gaussian_gate import GaussianGate, LocalizedMixtureOfExperts
from moekit.hme import HierarchicalMixtureOfExperts, HMEConfig
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
    "evaluate", "fit", "EMConfig", "EMResult", "fit_em", "GaussianGate",
    "LocalizedMixtureOfExperts", "HierarchicalMixtureOfExperts", "HMEConfig",
    "MixtureOfExpertsClassifier", "MixtureOfExpertsRegressor", "save_estimator",
    "load_estimator", "record_routing", "routing_agreement", "RoutingHistory", "ablate_expert",
    "force_expert", "scale_temperature", "expert_importance", "keep_freed_memory",
    "release_gradient_memory",
]

# scikit-learn is imported only when an estimator or the analysis is first asked for, so that
# `import moekit` stays light.
_LAZY = {"MixtureOfExpertsClassifier": "moekit.estimators",
         "MixtureOfExpertsRegressor": "moekit.estimators",
         "save_estimator": "moekit.estimator_io", "load_estimator": "moekit.estimator_io",
         "record_routing": "moekit.analysis", "routing_agreement": "moekit.routing_agreement",
         "RoutingHistory": "moekit.analysis", "ablate_expert": "moekit.interventions",
         "force_expert": "moekit.interventions", "scale_temperature": "moekit.interventions",
         "expert_importance": "moekit.interventions"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")

"""moekit: mixtures of experts, from Jacobs et al. (1991) to sparse routed layers.

    >>> from moekit import MixtureOfExperts, TrainConfig, fit

The package map (README, "Layout"): ``moekit.nn`` (the model), ``moekit.losses`` (the error
functions), ``moekit.fitting`` (gradient and EM), ``moekit.analysis`` (what the experts do),
``moekit.estimators`` (scikit-learn), ``moekit.io``, ``moekit.interop``, ``moekit.data``,
``moekit.plotting``, ``moekit.reports``, ``moekit.runs``, ``moekit.experiments`` and
``moekit.cli``. The names below are the public surface.
"""

from moekit._lazy import lazy_names as _lazy_names
from moekit._version import __version__
from moekit.exceptions import ConvergenceWarning, DataError, DivergenceWarning, MoekitError
from moekit.fitting.callbacks import Callback, KeepBest, TrainState
from moekit.fitting.config import TrainConfig
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.fitting.gradient import TrainResult, evaluate, fit
from moekit.fitting.history import History
from moekit.fitting.objective import mixture_loss
from moekit.io.models import load_model, save_model
from moekit.losses import (
    categorical_mixture_nll,
    competitive_loss,
    cooperative_loss,
    mixture_nll,
    responsibilities,
)
from moekit.nn.dense import MixtureOfExperts, MoEConfig
from moekit.nn.experts import ExpertConfig, LinearExperts, MLPExperts
from moekit.nn.gates import GateConfig, SoftmaxGate
from moekit.nn.gaussian_gate import GaussianGate
from moekit.nn.grouped_mm import release_gradient_memory
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts, HMEConfig
from moekit.nn.localized import LocalizedMixtureOfExperts
from moekit.nn.outputs import MoEOutput, Routing
from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE, SparseMoEConfig
from moekit.runtime import keep_freed_memory

# scikit-learn (and SciPy) are imported only when an estimator or the analysis is first asked for,
# so that `import moekit` stays light.
_LAZY = {
    "MixtureOfExpertsClassifier": "moekit.estimators.classifier",
    "MixtureOfExpertsRegressor": "moekit.estimators.regressor",
    "RoutingHistory": "moekit.analysis.over_training",
    "ablate_expert": "moekit.analysis.interventions",
    "expert_importance": "moekit.analysis.importance",
    "force_expert": "moekit.analysis.interventions",
    "load_estimator": "moekit.estimators.persistence",
    "record_routing": "moekit.analysis.recorder",
    "routing_agreement": "moekit.analysis.agreement",
    "save_estimator": "moekit.estimators.persistence",
    "scale_temperature": "moekit.analysis.interventions",
}

__all__ = [
    "Callback",
    "ConvergenceWarning",
    "DataError",
    "DivergenceWarning",
    "EMConfig",
    "EMResult",
    "ExpertConfig",
    "GateConfig",
    "GaussianGate",
    "HMEConfig",
    "HierarchicalMixtureOfExperts",
    "History",
    "KeepBest",
    "LinearExperts",
    "LocalizedMixtureOfExperts",
    "MLPExperts",
    "MixtureOfExperts",
    "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor",
    "MoEConfig",
    "MoEOutput",
    "MoekitError",
    "RouterConfig",
    "Routing",
    "RoutingHistory",
    "SoftmaxGate",
    "SparseMoE",
    "SparseMoEConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "__version__",
    "ablate_expert",
    "categorical_mixture_nll",
    "competitive_loss",
    "cooperative_loss",
    "evaluate",
    "expert_importance",
    "fit",
    "fit_em",
    "force_expert",
    "keep_freed_memory",
    "load_estimator",
    "load_model",
    "mixture_loss",
    "mixture_nll",
    "record_routing",
    "release_gradient_memory",
    "responsibilities",
    "routing_agreement",
    "save_estimator",
    "save_model",
    "scale_temperature",
]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

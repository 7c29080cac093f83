"""The model: gates and routers, expert banks, dispatch and combine, and the layers built from them.

Read bottom up: :mod:`~moekit.nn.outputs` (the records every stage passes on),
:mod:`~moekit.nn.init`, the gates (:mod:`~moekit.nn.gates`, :mod:`~moekit.nn.routers`,
:mod:`~moekit.nn.gaussian_gate`, :mod:`~moekit.nn.tree_gate`), :mod:`~moekit.nn.dispatch` and
:mod:`~moekit.nn.grouped_mm` (only the chosen experts run), :mod:`~moekit.nn.experts`, then the
layers: the dense mixtures of 1991 (:mod:`~moekit.nn.dense`, :mod:`~moekit.nn.hierarchical`,
:mod:`~moekit.nn.localized`) and the routed block (:mod:`~moekit.nn.sparse`); on top, the byte-level
MoE transformer language model (:mod:`~moekit.nn.attention`, :mod:`~moekit.nn.lm`).
"""

from moekit.nn.dense import DenseMixture, MixtureOfExperts, MoEConfig
from moekit.nn.experts import ExpertConfig, GLUExperts, LinearExperts, MLPExperts
from moekit.nn.gates import GateConfig, SoftmaxGate
from moekit.nn.gaussian_gate import GaussianGate, GaussianGateParams
from moekit.nn.grouped_mm import release_gradient_memory
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts, HMEConfig
from moekit.nn.lm import LMConfig, LMCosts, LMLoss, LMOutput, MoETransformerLM
from moekit.nn.localized import LocalizedMixtureOfExperts, LocalizedMoEConfig
from moekit.nn.outputs import DispatchPlan, MoEOutput, Routing
from moekit.nn.routers import (
    ExpertChoiceRouter,
    RouterConfig,
    SigmoidBiasRouter,
    TopKRouter,
    step_load_biases,
)
from moekit.nn.sparse import SparseMoE, SparseMoEConfig, replay_routing
from moekit.nn.tree_gate import TreeGate

__all__ = [
    "DenseMixture",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "ExpertConfig",
    "GLUExperts",
    "GateConfig",
    "GaussianGate",
    "GaussianGateParams",
    "HMEConfig",
    "HierarchicalMixtureOfExperts",
    "LMConfig",
    "LMCosts",
    "LMLoss",
    "LMOutput",
    "LinearExperts",
    "LocalizedMixtureOfExperts",
    "LocalizedMoEConfig",
    "MLPExperts",
    "MixtureOfExperts",
    "MoEConfig",
    "MoEOutput",
    "MoETransformerLM",
    "RouterConfig",
    "Routing",
    "SigmoidBiasRouter",
    "SoftmaxGate",
    "SparseMoE",
    "SparseMoEConfig",
    "TopKRouter",
    "TreeGate",
    "release_gradient_memory",
    "replay_routing",
    "step_load_biases",
]

"""Hierarchical mixtures of experts (Jordan & Jacobs 1994): a tree of softmax gates
(:mod:`moekit.nn.tree_gate`), experts at the leaves.

Shape legend: N rows, D input features, O outputs, E experts (leaves, E = B**L), G gate nodes,
B branching factor, L depth.

The output is sum_e pi_e(x) o_e(x), pi_e the product of the gate probabilities along leaf e's path;
the depth-1 tree is the flat mixture of Jacobs et al. (1991).

Training: by gradient, ``moekit.fit`` on Eq. 3 generalised to the tree (the layer's
``routing.logits_NE`` are the leaves' log path probabilities, which the losses use unchanged); or by
EM, :func:`moekit.fitting.em.fit_em`, which uses :func:`~moekit.nn.tree_gate.node_posteriors` for
the gates' M-step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit._checks import check_int, check_matrix
from moekit.nn.dense import DenseMixture
from moekit.nn.experts import ExpertConfig
from moekit.nn.finite import check_finite_rows, check_flag
from moekit.nn.gates import GateConfig
from moekit.nn.tree_gate import TreeGate, n_gate_nodes

# A guard against trees whose leaves could not be held in memory (B**L experts on every row).
MAX_LEAVES = 65536


@dataclass(frozen=True)
class HMEConfig:
    """Everything needed to rebuild a :class:`HierarchicalMixtureOfExperts` (saved with it).

    Attributes:
        in_features: D; every gate and every expert sees the same input.
        out_features: O, each expert's outputs.
        depth: L >= 1, the number of gate levels (1 is the flat mixture).
        branching: B >= 2, the children of every gate.
        expert: the leaves' :class:`~moekit.nn.experts.ExpertConfig` (EM needs linear experts).
        gate: every node's :class:`~moekit.nn.gates.GateConfig` (a softmax gate, with or without
            bias).
        check_finite: refuse input rows holding NaN or inf (True, the default): one such row makes
            the loss and every gradient NaN. False skips the check (one reduction and one device
            sync per forward); a bad row then gives a NaN output row and NaN gradients.
    """

    in_features: int
    out_features: int
    depth: int = 2
    branching: int = 2
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    check_finite: bool = True

    def __post_init__(self) -> None:
        owner = "HierarchicalMixtureOfExperts"
        check_int(owner, "in_features", self.in_features, minimum=1)
        check_int(owner, "out_features", self.out_features, minimum=1)
        check_int(owner, "depth", self.depth, minimum=1)
        check_int(owner, "branching", self.branching, minimum=2)
        if self.depth > math.log2(MAX_LEAVES) or self.branching**self.depth > MAX_LEAVES:
            # a deep tree's leaf count can be too long to print (Python refuses > 4300 digits)
            leaves = (f"{self.branching**self.depth}" if self.depth <= math.log2(MAX_LEAVES)
                      else f"more than {MAX_LEAVES}")
            raise ValueError(f"{owner}: branching**depth (the number of experts) must be at most "
                             f"{MAX_LEAVES}; got branching={self.branching}, depth={self.depth} "
                             f"({leaves} experts). Use a shallower tree.")
        check_flag(owner, "check_finite", self.check_finite)

    @property
    def n_experts(self) -> int:
        """E = B**L, the leaves."""
        return self.branching**self.depth

    @property
    def n_gates(self) -> int:
        """G, the internal (gate) nodes."""
        return n_gate_nodes(self.depth, self.branching)


class HierarchicalMixtureOfExperts(DenseMixture):
    """A hierarchical mixture of experts (Jordan & Jacobs 1994): a tree of softmax gates of depth L
    and branching B, with E = B**L experts at the leaves.

    The output record is the flat layer's :class:`~moekit.nn.outputs.MoEOutput`:
    ``routing.probs_NE`` are the leaves' path probabilities (dense), ``expert_outputs`` every leaf's
    output (N, E, O), so the losses of :mod:`moekit.losses` and ``moekit.fit`` work unchanged.
    Per-node gate probabilities: ``model.gate.node_probs(x)`` (N, G, B).

    Args:
        in_features: D. out_features: O.
        depth: L >= 1 gate levels. branching: B >= 2 children per gate.
        expert: an :class:`ExpertConfig` for the leaves (default: linear, identity head).
        gate: a :class:`GateConfig` for every node (default: softmax with bias).
        check_finite: refuse input rows holding NaN or inf (default True; see :class:`HMEConfig`).
        generator: the random generator for the initial weights.

    Example:
        >>> hme = HierarchicalMixtureOfExperts(3, 2, depth=2, branching=2)
        >>> out = hme(torch.randn(5, 3))
        >>> out.output.shape, out.routing.probs_NE.shape, out.expert_outputs.shape
        (torch.Size([5, 2]), torch.Size([5, 4]), torch.Size([5, 4, 2]))
    """

    config_class = HMEConfig

    def __init__(self, in_features: int, out_features: int, depth: int = 2, branching: int = 2, *,
                 expert: ExpertConfig | None = None, gate: GateConfig | None = None,
                 check_finite: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = HMEConfig(in_features, out_features, depth, branching,
                                expert=expert or ExpertConfig(), gate=gate or GateConfig(),
                                check_finite=check_finite)
        self.gate = TreeGate(in_features, depth=depth, branching=branching,
                             bias=self.config.gate.bias, generator=generator)
        self.experts = self.config.expert.build(in_features, out_features, self.config.n_experts,
                                                generator=generator)

    def node_probs(self, x_ND: Tensor) -> Tensor:
        """Every gate node's probabilities over its children, (N, G, B), breadth-first order."""
        check_matrix("HierarchicalMixtureOfExperts", "x", x_ND, n_columns=self.config.in_features)
        if self.config.check_finite:
            check_finite_rows("HierarchicalMixtureOfExperts", x_ND)
        return self.gate.node_probs(x_ND)

"""Hierarchical mixtures of experts (Jordan & Jacobs 1994): a tree of softmax gates, experts at
the leaves.

Shape legend: N rows, D input features, O outputs, E experts (leaves, E = B**L), G gate nodes
(internal nodes, G = (B**L - 1) / (B - 1)), B branching factor, L depth.

A tree of depth L and branching B has one softmax gate at every internal node. Node g splits its
probability over its B children: g_{b|g}(x) = softmax(x W_g + b_g)_b. The mixing proportion of
leaf e is the product of the gate probabilities along its path from the root,

    pi_e(x) = prod_{l=0}^{L-1} g_{b_l | node_l(e)}(x),

and the output is sum_e pi_e(x) o_e(x). The depth-1 tree is the flat mixture of Jacobs et al.
(1991).

Nodes are numbered breadth first: level l holds nodes [(B**l - 1)/(B - 1), (B**(l+1) - 1)/(B - 1));
node k of level l has children B*k + b (b = 0..B-1) in level l + 1; leaf e is the path whose
branches, read as base-B digits from the root, spell e. All gates of the tree are one stacked
parameter ``w_GDB`` (and ``b_GB``), so every node runs in one einsum.

Training: by gradient, ``moekit.fit`` on Eq. 3 generalised to the tree (the layer's
``routing.logits_NE`` are the leaves' log path probabilities, which the losses use unchanged); or by
EM, :func:`moekit.em.fit_em`, which uses :func:`node_posteriors` for the gates' M-step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit._checks import check_int, check_matrix
from moekit.experts import ExpertConfig
from moekit.gates import GateConfig, Routing, uniform_fan_in_
from moekit.layers import MoEOutput, dense_mixture

# A guard against trees whose leaves could not be held in memory (B**L experts on every row).
MAX_LEAVES = 65536


def n_gate_nodes(depth: int, branching: int) -> int:
    """G, the internal nodes of a full tree: 1 + B + ... + B**(L-1).

    Example:
        >>> n_gate_nodes(3, 2)  # 1 + 2 + 4
        7
    """
    return (branching**depth - 1) // (branching - 1)


def level_slice(level: int, branching: int) -> slice:
    """The node indices (breadth-first) of one level of the tree.

    Example:
        >>> level_slice(2, 3)  # after the root and its 3 children come 9 grandchildren
        slice(4, 13, None)
    """
    start = n_gate_nodes(level, branching) if level else 0
    return slice(start, start + branching**level)


def path_log_probs(node_log_probs_NGB: Tensor, depth: int, branching: int) -> Tensor:
    """Leaf log path probabilities, log pi_e = sum over the path of log g_{b|node}; shape (N, E).

    Args:
        node_log_probs_NGB: every node's log gate probabilities over its B children, (N, G, B).

    Example:
        >>> node = torch.tensor([[[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]]]).log()  # depth 2, B = 2
        >>> path_log_probs(node, 2, 2).exp()
        tensor([[0.1000, 0.4000, 0.5000, 0.0000]])
    """
    n_rows = node_log_probs_NGB.shape[0]
    log_path = node_log_probs_NGB.new_zeros(n_rows, 1)
    for level in range(depth):
        level_NKB = node_log_probs_NGB[:, level_slice(level, branching)]
        log_path = (log_path.unsqueeze(-1) + level_NKB).reshape(n_rows, branching ** (level + 1))
    return log_path


def node_posteriors(h_NE: Tensor, depth: int, branching: int) -> Tensor:
    """The posterior mass of each child of each node, (N, G, B), from leaf posteriors h (N, E).

    Entry (n, g, b) is the posterior probability that row n's path goes through child b of node g
    (the joint posterior; its sum over b is the posterior of reaching node g). These are the
    targets and row weights of node g's M-step in EM (Jordan & Jacobs 1994, Eq. 25-27).

    Example:
        >>> node_posteriors(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 2, 2)
        tensor([[[0.3000, 0.7000],
                 [0.1000, 0.2000],
                 [0.3000, 0.4000]]])
    """
    n_rows = h_NE.shape[0]
    levels = []
    for level in range(depth):
        below = branching ** (depth - level - 1)
        mass_NK = h_NE.reshape(n_rows, branching ** (level + 1), below).sum(-1)
        levels.append(mass_NK.reshape(n_rows, branching**level, branching))
    return torch.cat(levels, dim=1)


@dataclass(frozen=True)
class HMEConfig:
    """Everything needed to rebuild a :class:`HierarchicalMixtureOfExperts` (saved with it).

    Attributes:
        in_features: D; every gate and every expert sees the same input.
        out_features: O, each expert's outputs.
        depth: L >= 1, the number of gate levels (1 is the flat mixture).
        branching: B >= 2, the children of every gate.
        expert: the leaves' :class:`~moekit.experts.ExpertConfig` (EM needs linear experts).
        gate: every node's :class:`~moekit.gates.GateConfig` (a softmax gate, with or without bias).
    """

    in_features: int
    out_features: int
    depth: int = 2
    branching: int = 2
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        owner = "HierarchicalMixtureOfExperts"
        check_int(owner, "in_features", self.in_features, minimum=1)
        check_int(owner, "out_features", self.out_features, minimum=1)
        check_int(owner, "depth", self.depth, minimum=1)
        check_int(owner, "branching", self.branching, minimum=2)
        if self.depth > math.log2(MAX_LEAVES) or self.branching**self.depth > MAX_LEAVES:
            raise ValueError(f"{owner}: branching**depth (the number of experts) must be at most "
                             f"{MAX_LEAVES}; got branching={self.branching}, depth={self.depth} "
                             f"({self.branching**self.depth} experts). Use a shallower tree.")

    @property
    def n_experts(self) -> int:
        """E = B**L, the leaves."""
        return self.branching**self.depth

    @property
    def n_gates(self) -> int:
        """G, the internal (gate) nodes."""
        return n_gate_nodes(self.depth, self.branching)


class TreeGate(nn.Module):
    """All the softmax gates of a tree, stacked: ``w_GDB`` (G, D, B) and ``b_GB`` (G, B).

    Calling it returns a dense :class:`~moekit.gates.Routing` over the leaves: ``probs_NE`` are the
    path probabilities, ``logits_NE`` their logs (already normalised, so a softmax returns them).

    Example:
        >>> gate = TreeGate(2, depth=2, branching=3, generator=torch.Generator().manual_seed(0))
        >>> routing = gate(torch.zeros(4, 2))
        >>> routing.probs_NE.shape, gate.node_log_probs(torch.zeros(4, 2)).shape
        (torch.Size([4, 9]), torch.Size([4, 4, 3]))
    """

    def __init__(self, in_features: int, *, depth: int, branching: int, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        owner = "TreeGate"
        self.in_features = check_int(owner, "in_features", in_features, minimum=1)
        self.depth = check_int(owner, "depth", depth, minimum=1)
        self.branching = check_int(owner, "branching", branching, minimum=2)
        n_gates = n_gate_nodes(depth, branching)
        self.w_GDB = nn.Parameter(torch.empty(n_gates, in_features, branching))
        self.b_GB = nn.Parameter(torch.empty(n_gates, branching)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's default range, as the flat SoftmaxGate, from the caller's generator.
        uniform_fan_in_(self.w_GDB, self.in_features, generator)
        if self.b_GB is not None:
            uniform_fan_in_(self.b_GB, self.in_features, generator)

    @property
    def n_experts(self) -> int:
        return self.branching**self.depth

    def node_log_probs(self, x_ND: Tensor) -> Tensor:
        """Every node's log gate probabilities over its children, log g_{b|g}(x), (N, G, B)."""
        logits_NGB = torch.einsum("nd,gdb->ngb", x_ND, self.w_GDB)
        if self.b_GB is not None:
            logits_NGB = logits_NGB + self.b_GB
        return torch.log_softmax(logits_NGB, dim=-1)

    def node_probs(self, x_ND: Tensor) -> Tensor:
        """Every node's gate probabilities over its children, (N, G, B); each node's sum to 1."""
        return self.node_log_probs(x_ND).exp()

    def forward(self, x_ND: Tensor) -> Routing:
        log_probs_NE = path_log_probs(self.node_log_probs(x_ND), self.depth, self.branching)
        return Routing.make_dense(log_probs_NE, log_probs_NE.exp())


class HierarchicalMixtureOfExperts(nn.Module):
    """A hierarchical mixture of experts (Jordan & Jacobs 1994): a tree of softmax gates of depth L
    and branching B, with E = B**L experts at the leaves.

    The output record is the flat layer's :class:`~moekit.layers.MoEOutput`: ``routing.probs_NE``
    are the leaves' path probabilities (dense), ``expert_outputs`` every leaf's output (N, E, O), so
    the losses of :mod:`moekit.losses` and ``moekit.fit`` work unchanged. Per-node gate
    probabilities: ``model.gate.node_probs(x)`` (N, G, B).

    Args:
        in_features: D. out_features: O.
        depth: L >= 1 gate levels. branching: B >= 2 children per gate.
        expert: an :class:`ExpertConfig` for the leaves (default: linear, identity head).
        gate: a :class:`GateConfig` for every node (default: softmax with bias).
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
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = HMEConfig(in_features, out_features, depth, branching,
                                expert=expert or ExpertConfig(), gate=gate or GateConfig())
        self.gate = TreeGate(in_features, depth=depth, branching=branching,
                             bias=self.config.gate.bias, generator=generator)
        self.experts = self.config.expert.build(in_features, out_features, self.config.n_experts,
                                                generator=generator)

    @classmethod
    def from_config(cls, config: HMEConfig, *, generator: torch.Generator | None = None
                    ) -> HierarchicalMixtureOfExperts:
        return cls(config.in_features, config.out_features, config.depth, config.branching,
                   expert=config.expert, gate=config.gate, generator=generator)

    @property
    def head(self) -> str:
        return self.config.expert.head

    def node_probs(self, x_ND: Tensor) -> Tensor:
        """Every gate node's probabilities over its children, (N, G, B), breadth-first order."""
        check_matrix("HierarchicalMixtureOfExperts", "x", x_ND, n_columns=self.config.in_features)
        return self.gate.node_probs(x_ND)

    def forward(self, x_ND: Tensor) -> MoEOutput:
        check_matrix("HierarchicalMixtureOfExperts", "x", x_ND, n_columns=self.config.in_features)
        return dense_mixture(self.gate, self.experts, self.head, x_ND)

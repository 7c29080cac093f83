"""The tree of softmax gates of a hierarchical mixture of experts (Jordan & Jacobs 1994).

Shape legend: N rows, D input features, E experts (leaves, E = B**L), G gate nodes (internal nodes,
G = (B**L - 1) / (B - 1)), B branching factor, L depth.

A tree of depth L and branching B has one softmax gate at every internal node. Node g splits its
probability over its B children: g_{b|g}(x) = softmax(x W_g + b_g)_b. The mixing proportion of
leaf e is the product of the gate probabilities along its path from the root,

    pi_e(x) = prod_{l=0}^{L-1} g_{b_l | node_l(e)}(x).

Nodes are numbered breadth first: level l holds nodes [(B**l - 1)/(B - 1), (B**(l+1) - 1)/(B - 1));
node k of level l has children B*k + b (b = 0..B-1) in level l + 1; leaf e is the path whose
branches, read as base-B digits from the root, spell e. All gates of the tree are one stacked
parameter ``w_GDB`` (and ``b_GB``), so every node runs in one einsum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit._checks import check_int
from moekit.nn.init import uniform_fan_in_
from moekit.nn.outputs import Routing


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


class TreeGate(nn.Module):
    """All the softmax gates of a tree, stacked: ``w_GDB`` (G, D, B) and ``b_GB`` (G, B).

    Calling it returns a dense :class:`~moekit.nn.outputs.Routing` over the leaves: ``probs_NE``
    are the path probabilities, ``logits_NE`` their logs (already normalised, so a softmax returns
    them).

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

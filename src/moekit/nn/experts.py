"""Expert banks: E experts whose weights are stacked on a leading expert axis.

Shape legend: N rows, D input features, H hidden units, O outputs, E experts.

A bank runs every expert on every row in one batched einsum (``forward``, the dense mixtures of
1991), or each routed row through its own expert only (``forward_grouped``, given the rows in
expert order and the per-expert counts ``counts_E``; :mod:`moekit.nn.grouped_mm` holds the
kernels). A bank returns the experts' pre-head activations (``logits_NEO``); :func:`apply_head`
turns them into outputs, so that losses can work on log-probabilities straight from the logits of a
softmax head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int
from moekit.nn.grouped_mm import grouped_matmul, per_expert_rows
from moekit.nn.init import uniform_fan_in_

EXPERT_KINDS = ("linear", "mlp", "glu")
HEADS = ("identity", "sigmoid", "softmax")
ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu,
               "gelu": nn.functional.gelu, "silu": nn.functional.silu}


def softmax_last(z: Tensor) -> Tensor:
    """Softmax over the last axis; written out because torch.softmax is several times slower on CPU
    when that axis is short (a few classes), which is the common case for an output head."""
    e = torch.exp(z - z.amax(-1, keepdim=True).detach())
    return e / e.sum(-1, keepdim=True)


def apply_head(head: str, logits_NEO: Tensor) -> Tensor:
    """Apply an output head along the last axis: identity, sigmoid, or softmax over outputs."""
    if head == "identity":
        return logits_NEO
    if head == "sigmoid":
        return torch.sigmoid(logits_NEO)
    if head == "softmax":
        return softmax_last(logits_NEO)
    raise ValueError(f"apply_head: head must be one of {HEADS}; got head={head!r}.")


@dataclass(frozen=True)
class ExpertConfig:
    """Which experts to build.

    Attributes:
        kind: 'linear' (the paper's: one linear layer), 'mlp' (one hidden layer), or 'glu' (a gated
            linear unit, SwiGLU with activation 'silu', as in Mixtral).
        hidden: hidden units per MLP expert (ignored for linear experts).
        activation: the MLP's hidden activation, one of ``ACTIVATIONS``.
        head: output head, 'identity' (regression), 'sigmoid' or 'softmax' (a class distribution).
    """

    kind: str = "linear"
    hidden: int = 16
    activation: str = "tanh"
    head: str = "identity"

    def __post_init__(self) -> None:
        check_choice("ExpertConfig", "kind", self.kind, EXPERT_KINDS)
        check_int("ExpertConfig", "hidden", self.hidden, minimum=1)
        check_choice("ExpertConfig", "activation", self.activation, ACTIVATIONS)
        check_choice("ExpertConfig", "head", self.head, HEADS)

    def build(self, in_features: int, out_features: int, n_experts: int, *,
              generator: torch.Generator | None = None) -> LinearExperts | MLPExperts:
        if self.kind == "linear":
            return LinearExperts(in_features, out_features, n_experts, head=self.head,
                                 generator=generator)
        if self.kind == "glu":
            return GLUExperts(in_features, out_features, n_experts, hidden=self.hidden,
                              activation=self.activation, head=self.head, generator=generator)
        return MLPExperts(in_features, out_features, n_experts, hidden=self.hidden,
                          activation=self.activation, head=self.head, generator=generator)


class _ExpertBank(nn.Module):
    """The checked sizes every bank has: in_features D, out_features O, n_experts E, head."""

    def __init__(self, in_features: int, out_features: int, n_experts: int, head: str) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_int(owner, "in_features", in_features, minimum=1)
        self.out_features = check_int(owner, "out_features", out_features, minimum=1)
        self.n_experts = check_int(owner, "n_experts", n_experts, minimum=1)
        self.head = check_choice(owner, "head", head, HEADS)

    def _hidden_layer(self, hidden: int, activation: str) -> None:
        owner = type(self).__name__
        self.hidden = check_int(owner, "hidden", hidden, minimum=1)
        self.activation = check_choice(owner, "activation", activation, ACTIVATIONS)


class LinearExperts(_ExpertBank):
    """E linear experts, o_i = W_i x + b_i, each forming a linear decision surface (the paper's).

    Example:
        >>> bank = LinearExperts(2, 4, 3, head="softmax")
        >>> bank(torch.zeros(5, 2)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, *,
                 head: str = "identity", generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features, n_experts, head)
        self.w_EDO = nn.Parameter(torch.empty(n_experts, in_features, out_features))
        self.b_EO = nn.Parameter(torch.empty(n_experts, out_features))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        uniform_fan_in_(self.w_EDO, self.in_features, generator)
        uniform_fan_in_(self.b_EO, self.in_features, generator)

    def forward(self, x_ND: Tensor) -> Tensor:
        """Pre-head activations of every expert on every row, shape (N, E, O)."""
        return torch.einsum("nd,edo->neo", x_ND, self.w_EDO) + self.b_EO

    def forward_grouped(self, x_MD: Tensor, counts_E: Tensor, *, implementation: str = "auto"
                        ) -> Tensor:
        """Pre-head activations of each routed row's own expert, rows in expert order, (M, O)."""
        y_MO = grouped_matmul(x_MD, self.w_EDO, counts_E, implementation=implementation)
        return y_MO + per_expert_rows(self.b_EO, counts_E, x_MD.shape[0])


class MLPExperts(_ExpertBank):
    """E experts with one hidden layer each: o_i = W2_i act(W1_i x + b1_i) + b2_i.

    Example:
        >>> bank = MLPExperts(2, 1, 3, hidden=8)
        >>> bank(torch.zeros(5, 2)).shape
        torch.Size([5, 3, 1])
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, *, hidden: int = 16,
                 activation: str = "tanh", head: str = "identity",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features, n_experts, head)
        self._hidden_layer(hidden, activation)
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, in_features, hidden))
        self.b1_EH = nn.Parameter(torch.empty(n_experts, hidden))
        self.w2_EHO = nn.Parameter(torch.empty(n_experts, hidden, out_features))
        self.b2_EO = nn.Parameter(torch.empty(n_experts, out_features))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        uniform_fan_in_(self.w1_EDH, self.in_features, generator)
        uniform_fan_in_(self.b1_EH, self.in_features, generator)
        uniform_fan_in_(self.w2_EHO, self.hidden, generator)
        uniform_fan_in_(self.b2_EO, self.hidden, generator)

    def forward(self, x_ND: Tensor) -> Tensor:
        """Pre-head activations of every expert on every row, shape (N, E, O)."""
        act = ACTIVATIONS[self.activation]
        h_NEH = act(torch.einsum("nd,edh->neh", x_ND, self.w1_EDH) + self.b1_EH)
        return torch.einsum("neh,eho->neo", h_NEH, self.w2_EHO) + self.b2_EO

    def forward_grouped(self, x_MD: Tensor, counts_E: Tensor, *, implementation: str = "auto"
                        ) -> Tensor:
        """Pre-head activations of each routed row's own expert, rows in expert order, (M, O)."""
        act, n_rows = ACTIVATIONS[self.activation], x_MD.shape[0]
        h_MH = act(grouped_matmul(x_MD, self.w1_EDH, counts_E, implementation=implementation)
                   + per_expert_rows(self.b1_EH, counts_E, n_rows))
        y_MO = grouped_matmul(h_MH, self.w2_EHO, counts_E, implementation=implementation)
        return y_MO + per_expert_rows(self.b2_EO, counts_E, n_rows)


class GLUExperts(_ExpertBank):
    """E gated-linear-unit experts without biases (SwiGLU with 'silu', Shazeer 2020; Mixtral):
    o_i = W2_i (act(W1_i x) * (W3_i x)).

    Weights are stored as nn.Linear and Mixtral store them, output features first: ``w13_EFD``
    (F = 2H; rows [0, H) are the gate projection W1, rows [H, 2H) the up projection W3, so both run
    in one matmul) and ``w2_EOH``. The grouped matmul on CPU is faster on this layout.

    Example:
        >>> GLUExperts(4, 4, 3, hidden=8)(torch.zeros(5, 4)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, *, hidden: int = 16,
                 activation: str = "silu", head: str = "identity",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features, n_experts, head)
        self._hidden_layer(hidden, activation)
        self.w13_EFD = nn.Parameter(torch.empty(n_experts, 2 * hidden, in_features))
        self.w2_EOH = nn.Parameter(torch.empty(n_experts, out_features, hidden))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        uniform_fan_in_(self.w13_EFD, self.in_features, generator)
        uniform_fan_in_(self.w2_EOH, self.hidden, generator)

    @property
    def w1_EDH(self) -> Tensor:
        """The gate projection, input features first."""
        return self.w13_EFD[:, : self.hidden].transpose(1, 2)

    @property
    def w3_EDH(self) -> Tensor:
        """The up projection, input features first."""
        return self.w13_EFD[:, self.hidden :].transpose(1, 2)

    @property
    def w2_EHO(self) -> Tensor:
        """The down projection, hidden units first."""
        return self.w2_EOH.transpose(1, 2)

    def _glu(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.split(self.hidden, dim=-1)
        return ACTIVATIONS[self.activation](gate) * up

    def forward(self, x_ND: Tensor) -> Tensor:
        """Every expert on every row, shape (N, E, O)."""
        h_NEH = self._glu(torch.einsum("nd,efd->nef", x_ND, self.w13_EFD))
        return torch.einsum("neh,eoh->neo", h_NEH, self.w2_EOH)

    def forward_grouped(self, x_MD: Tensor, counts_E: Tensor, *, implementation: str = "auto"
                        ) -> Tensor:
        """Each routed row's own expert, rows in expert order, shape (M, O)."""
        h_MH = self._glu(grouped_matmul(x_MD, self.w13_EFD.transpose(1, 2), counts_E,
                                        implementation=implementation))
        return grouped_matmul(h_MH, self.w2_EOH.transpose(1, 2), counts_E,
                              implementation=implementation)

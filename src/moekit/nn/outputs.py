"""The records every stage passes on: what a gate decided (:class:`Routing`), where the routed rows
went (:class:`DispatchPlan`), and what a layer computed (:class:`MoEOutput`).

Shape legend: N rows, O outputs, E experts, K experts chosen per row, M routed assignments (N * K
before any drop).

They sit at the bottom of the package: gates, layers, losses' callers, fitting and analysis all read
them, and they import nothing of moekit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def every_expert(probs_NE: Tensor) -> Tensor:
    """Experts 0..E-1 on every row, (N, E) long: the choices of a gate that uses every expert."""
    n_rows, n_experts = probs_NE.shape
    return torch.arange(n_experts, device=probs_NE.device).expand(n_rows, -1)


@dataclass(frozen=True)
class Routing:
    """What a gate decided for a batch of rows.

    Attributes:
        weights_NK: weight of each chosen expert in the combination (for the dense gate, p_i).
        experts_NK: index of each chosen expert (long); for the dense gate, 0..E-1 on every row.
        probs_NE: the full gate distribution over all experts (rows sum to 1).
        logits_NE: the gate's pre-softmax outputs (the paper's x_j).
        dense: True when every row's k-th choice is expert k (the K = E dense gate), so that a
            combine can use ``weights_NK`` as per-expert weights without gathering.
        mask_NK: where choices vary in number per row (expert choice), True for real choices;
            None when every row has exactly K.
        load_E: a differentiable estimate of the rows each expert receives (noisy top-k's smooth
            load, Shazeer et al. 2017); None where the router has none.
    """

    weights_NK: Tensor
    experts_NK: Tensor
    probs_NE: Tensor
    logits_NE: Tensor
    dense: bool = False
    mask_NK: Tensor | None = None
    load_E: Tensor | None = None

    @classmethod
    def make_dense(cls, logits_NE: Tensor, probs_NE: Tensor) -> Routing:
        """The dense routing of a gate that mixes every expert (K = E): expert k is every row's
        k-th choice, weighted by its probability.

        Example:
            >>> logits = torch.zeros(2, 3)
            >>> Routing.make_dense(logits, torch.softmax(logits, -1)).experts_NK.tolist()
            [[0, 1, 2], [0, 1, 2]]
        """
        return cls(weights_NK=probs_NE, experts_NK=every_expert(probs_NE), probs_NE=probs_NE,
                   logits_NE=logits_NE, dense=True)

    @property
    def n_experts(self) -> int:
        return self.probs_NE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts_NK.shape[-1]


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed assignment goes (:func:`moekit.nn.dispatch.plan_dispatch`).

    Attributes:
        rows_M: the source row of each kept assignment, in expert order.
        experts_M: its expert (non-decreasing).
        weights_M: its combine weight (differentiable).
        counts_E: kept assignments per expert: what the expert banks take.
        dropped_rows, dropped_experts: the (row, expert) pairs dropped for capacity.
        n_assignments: assignments before any drop.
        slots_M: each kept assignment's position inside its expert's block.
    """

    rows_M: Tensor
    experts_M: Tensor
    weights_M: Tensor
    counts_E: Tensor
    dropped_rows: Tensor
    dropped_experts: Tensor
    n_assignments: int
    slots_M: Tensor

    @property
    def n_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def drop_rate(self) -> float:
        return self.dropped_rows.numel() / max(1, self.n_assignments)


@dataclass(frozen=True)
class MoEOutput:
    """What a mixture-of-experts layer computed; every layer returns it, whatever its options.

    Attributes:
        output: the blended output, sum_k weights_NK * expert output, shape (N, O) (a routed
            layer keeps its input's leading shape).
        routing: the gate's decision (:class:`Routing`).
        aux_loss: auxiliary loss to add to the objective (a 0-d tensor; zero for the dense layer).
        aux_parts: the named terms that make up ``aux_loss``, for logging.
        expert_outputs: every expert's output after its head, (N, E, O), where the layer computes
            every expert (dense layers); None otherwise.
        expert_logits: the same before the head (equal to ``expert_outputs`` for an identity head).
        dispatch: for routed layers, where each assignment went, including exactly which
            (row, expert) pairs were dropped for capacity and the drop rate; None for dense layers.
    """

    output: Tensor
    routing: Routing
    aux_loss: Tensor
    aux_parts: dict[str, Tensor] = field(default_factory=dict)
    expert_outputs: Tensor | None = None
    expert_logits: Tensor | None = None
    dispatch: DispatchPlan | None = None

    @staticmethod
    def check(result: Any, owner: str) -> MoEOutput:
        """``result`` if a forward returned a MoEOutput; else a TypeError saying what to pass.

        Example:
            >>> MoEOutput.check(torch.zeros(2), "record_routing")  # doctest: +NORMALIZE_WHITESPACE
            Traceback (most recent call last):
            ...
            TypeError: record_routing: the model must return a MoEOutput; got Tensor. Pass the
            mixture-of-experts layer itself (e.g. model.moe).
        """
        if not isinstance(result, MoEOutput):
            raise TypeError(f"{owner}: the model must return a MoEOutput; got "
                            f"{type(result).__name__}. Pass the mixture-of-experts layer itself "
                            "(e.g. model.moe).")
        return result

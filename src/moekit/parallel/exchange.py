"""The row exchange of expert parallelism: who sends how many rows where, and the collectives.

Shape legend: W ranks in the ep group, E experts (global), L experts per rank, N rows on this rank,
M kept assignments of this rank's rows (in expert order), R rows this rank's experts receive, D
features.

One step of a layer: every rank shares its row count and its per-expert assignment counts (one
all_gather, :func:`exchange_counts`); from that (W, E) table every rank derives the same
:class:`ExchangePlan` (:func:`plan_exchange`, pure bookkeeping); the rows go to the ranks owning
their experts and come back with differentiable ``all_to_all_single`` (:func:`all_to_all`; the
list form ``dist.all_to_all`` refuses uneven sizes).

Capacity (one process's rule, kept exactly): expert e keeps at most
C = max(1, ceil(capacity_factor * M_global / E)) assignments, M_global the assignments of the whole
global batch (the ranks' rows concatenated in rank order), first come (lowest global row) first
served. Rank r's assignments to e come after those of ranks < r, so it keeps those of its local
slots s with prefix[r, e] + s < C, prefix[r, e] the assignments to e on ranks < r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moekit.nn.outputs import DispatchPlan
from moekit.parallel.mesh import ExpertGroup, check_divisible


@dataclass(frozen=True)
class ExchangePlan:
    """What one rank sends and receives in a step, the same bookkeeping on every rank.

    Attributes:
        rows_W: rows on each rank; row_offset: this rank's first row in the global batch.
        capacity: C per expert, or None (dropless).
        prefix_WE: assignments to each expert on the ranks before each rank (before any drop).
        kept_WE: assignments each rank keeps for each expert (after capacity).
        send_splits, recv_splits: rows this rank sends to / receives from each rank.
        recv_counts_L: the received rows per local expert: what the local bank takes.
        order_R: received rows (by source rank, then expert) -> expert-major order; within an
            expert the rows stay in global row order (source rank, then its row order), as in one
            process. restore_R: its inverse.
    """

    rows_W: list[int]
    row_offset: int
    capacity: int | None
    prefix_WE: Tensor
    kept_WE: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_L: Tensor
    order_R: Tensor
    restore_R: Tensor

    @property
    def n_global_rows(self) -> int:
        return sum(self.rows_W)


def plan_exchange(rows_W: list[int], counts_WE: Tensor, rank: int, *,
                  capacity_factor: float | None) -> ExchangePlan:
    """The exchange of rank ``rank`` given every rank's row count and per-expert assignment counts
    (before capacity); W ranks own E / W experts each, in rank order.

    Example (2 ranks, 2 experts, rank 0 owns expert 0; no capacity):
        >>> plan = plan_exchange([2, 2], torch.tensor([[3, 1], [2, 2]]), 0, capacity_factor=None)
        >>> plan.send_splits, plan.recv_splits, plan.recv_counts_L.tolist()
        ([3, 1], [3, 2], [5])
    """
    n_ranks, n_experts = counts_WE.shape
    per_rank = check_divisible("plan_exchange", n_experts, n_ranks)
    prefix_WE = torch.cumsum(counts_WE, 0) - counts_WE
    capacity = None
    kept_WE = counts_WE
    if capacity_factor is not None:
        capacity = max(1, math.ceil(capacity_factor * int(counts_WE.sum()) / n_experts))
        kept_WE = (capacity - prefix_WE).clamp(min=0).minimum(counts_WE)
    kept_WRL = kept_WE.reshape(n_ranks, n_ranks, per_rank)  # source, owner, local expert
    mine_WL = kept_WRL[:, rank]
    local_expert_R = torch.cat([
        torch.repeat_interleave(torch.arange(per_rank, device=counts_WE.device), mine_WL[s])
        for s in range(n_ranks)])
    order_R = torch.argsort(local_expert_R, stable=True)
    restore_R = torch.empty_like(order_R)
    restore_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return ExchangePlan(rows_W=list(rows_W), row_offset=sum(rows_W[:rank]), capacity=capacity,
                        prefix_WE=prefix_WE, kept_WE=kept_WE,
                        send_splits=kept_WRL[rank].sum(-1).tolist(),
                        recv_splits=mine_WL.sum(-1).tolist(), recv_counts_L=mine_WL.sum(0),
                        order_R=order_R, restore_R=restore_R)


def apply_capacity(plan: DispatchPlan, exchange: ExchangePlan, rank: int) -> DispatchPlan:
    """This rank's dropless ``plan`` with the global capacity applied (module docstring): the same
    assignments one process keeps; row indices stay local (add ``exchange.row_offset`` for global
    ones)."""
    if exchange.capacity is None:
        return plan
    fits_M = exchange.prefix_WE[rank, plan.experts_M] + plan.slots_M < exchange.capacity
    return DispatchPlan(plan.rows_M[fits_M], plan.experts_M[fits_M], plan.weights_M[fits_M],
                        exchange.kept_WE[rank].clone(), plan.rows_M[~fits_M],
                        plan.experts_M[~fits_M], plan.n_assignments, plan.slots_M[fits_M])


# --- collectives ----------------------------------------------------------------------------------

def gather_equal(value_F: Tensor, ep: ExpertGroup) -> Tensor:
    """Every rank's ``value_F`` (same shape everywhere), stacked in rank order, (W, F)."""
    gathered = [torch.empty_like(value_F) for _ in range(ep.size)]
    dist.all_gather(gathered, value_F.contiguous(), group=ep.group)
    return torch.stack(gathered)


def exchange_counts(n_rows: int, counts_E: Tensor, ep: ExpertGroup) -> tuple[list[int], Tensor]:
    """Every rank's row count and per-expert assignment counts: ``rows_W`` and (W, E) int64."""
    mine = torch.cat([counts_E.new_tensor([n_rows]), counts_E]).to(torch.long)
    table_W1E = gather_equal(mine, ep)
    return table_W1E[:, 0].tolist(), table_W1E[:, 1:]


def gather_rows_uneven(t_NX: Tensor, rows_W: list[int], ep: ExpertGroup) -> Tensor:
    """Every rank's rows of ``t_NX`` concatenated in rank order (the global batch), padded to the
    largest rank for the all_gather; not differentiable (the expert-choice selection reads it)."""
    longest = max(rows_W)
    padded_NX = t_NX.new_zeros(longest, *t_NX.shape[1:])
    padded_NX[: t_NX.shape[0]] = t_NX.detach()
    gathered = gather_equal(padded_NX, ep)
    return torch.cat([gathered[r, :n] for r, n in enumerate(rows_W)])


def all_to_all(x_MD: Tensor, output_splits: list[int], input_splits: list[int], ep: ExpertGroup
               ) -> Tensor:
    """Send block r of ``x_MD`` (``input_splits[r]`` rows) to rank r and receive
    ``output_splits[r]`` rows from each; differentiable (the backward sends the gradients back)."""
    return all_to_all_single_autograd(x_MD.contiguous(), output_splits, input_splits, ep.group)


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks (all_reduce). Backward: the identity. Why: what reads the sum
    (the auxiliary losses) is computed alike on every rank and counted once in the objective, so
    each rank's rows get d(loss)/d(sum) once, from their own rank (Megatron's "reduce from the
    tensor-parallel region")."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_over_ranks(x: Tensor, ep: ExpertGroup) -> Tensor:
    """The sum of ``x`` over the ep group's ranks, differentiable as a replicated statistic: the
    gradient reaching each rank's ``x`` is that of the loss counted once (see ``_SumOverRanks``)."""
    return _SumOverRanks.apply(x, ep.group)

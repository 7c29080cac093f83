"""Dispatch and combine: sort routed rows by expert, and add the experts' outputs back to the rows.

Shape legend: N rows, D input features, O outputs, E experts, K choices per row, M routed
assignments (N * K before any drop).

Only the chosen experts are computed: the (row, expert) assignments of a
:class:`~moekit.nn.outputs.Routing` are sorted by expert (a stable sort, so rows keep their order
inside each block), the expert bank runs each block with its own weights
(:mod:`moekit.nn.grouped_mm`, given the per-expert counts), and :func:`combine_rows` adds the
results back to their rows, scaled by the routing weights. Dropless by default; with a capacity
factor, the assignments beyond an expert's capacity are dropped, and the plan lists exactly which
(row, expert) pairs were dropped.

Where every expert is computed on every row (the dense mixtures of 1991), :func:`blend` is the
combine: y_n = sum_k w_nk o_{n, e_nk}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.nn.outputs import DispatchPlan, Routing


def plan_dispatch(routing: Routing, n_experts: int, *, capacity_factor: float | None = None
                  ) -> DispatchPlan:
    """Sort the routing's assignments by expert; with ``capacity_factor``, keep at most
    ceil(capacity_factor * M / E) per expert, first come (lowest row) first served."""
    n_rows, k = routing.experts_NK.shape
    rows_NK = torch.arange(n_rows, device=routing.experts_NK.device).unsqueeze(1).expand(n_rows, k)
    experts, rows, weights = routing.experts_NK, rows_NK, routing.weights_NK
    if routing.mask_NK is not None:
        keep = routing.mask_NK
        experts, rows, weights = experts[keep], rows[keep], weights[keep]
    experts, rows, weights = experts.flatten(), rows.flatten(), weights.flatten()
    order_M = torch.argsort(experts, stable=True)
    experts_M, rows_M, weights_M = experts[order_M], rows[order_M], weights[order_M]
    counts_E = torch.bincount(experts_M, minlength=n_experts)
    n_assignments = experts_M.numel()
    empty = experts_M[:0]
    dropped_rows, dropped_experts = empty, empty
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slots_M = torch.arange(n_assignments, device=experts_M.device) - starts_E[experts_M]
    if capacity_factor is not None:
        capacity = max(1, math.ceil(capacity_factor * n_assignments / n_experts))
        fits_M = slots_M < capacity
        dropped_rows, dropped_experts = rows_M[~fits_M], experts_M[~fits_M]
        experts_M, rows_M, weights_M = experts_M[fits_M], rows_M[fits_M], weights_M[fits_M]
        slots_M = slots_M[fits_M]
        counts_E = counts_E.clamp(max=capacity)
    return DispatchPlan(rows_M, experts_M, weights_M, counts_E, dropped_rows, dropped_experts,
                        n_assignments, slots_M)


def gather_rows(x_ND: Tensor, plan: DispatchPlan) -> Tensor:
    """The input rows in plan (expert) order, shape (M, D)."""
    return x_ND.index_select(0, plan.rows_M)


def combine_rows(y_MO: Tensor, plan: DispatchPlan, n_rows: int) -> Tensor:
    """y_n = sum over n's kept assignments of weight * expert output; dropped ones add nothing."""
    weighted_MO = y_MO * plan.weights_M.unsqueeze(-1).to(y_MO.dtype)
    out_NO = y_MO.new_zeros(n_rows, y_MO.shape[-1])
    return out_NO.index_add(0, plan.rows_M, weighted_MO)


def blend(routing: Routing, expert_outputs_NEO: Tensor) -> Tensor:
    """Blend every expert's output with the routing weights: y_n = sum_k w_nk * o_{n, e_nk}.

    For the dense gate (K = E, e_nk = k) this is the paper's y = sum_i p_i o_i.

    Example:
        >>> from moekit.nn.outputs import Routing
        >>> p = torch.tensor([[0.25, 0.75]])
        >>> blend(Routing.make_dense(p.log(), p), torch.tensor([[[4.0], [8.0]]]))
        tensor([[7.]])
    """
    if routing.dense:
        return torch.einsum("ne,neo->no", routing.weights_NK, expert_outputs_NEO)
    out_features = expert_outputs_NEO.shape[-1]
    index_NKO = routing.experts_NK.unsqueeze(-1).expand(-1, -1, out_features)
    chosen_NKO = expert_outputs_NEO.gather(1, index_NKO)
    return torch.einsum("nk,nko->no", routing.weights_NK, chosen_NKO)

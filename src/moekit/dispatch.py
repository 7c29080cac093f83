"""Dispatch: sort routed rows by expert, run each expert on its contiguous block, combine.

Shape legend: N rows, D input features, H hidden units, O outputs, E experts, K choices per row,
M routed assignments (N * K before any drop).

Only the chosen experts are computed: the (row, expert) assignments of a :class:`Routing` are sorted
by expert (a stable sort, so rows keep their order inside each block), each expert's weights multiply
its block in one grouped matmul (``torch.nn.functional.grouped_mm`` where it supports the dtype and
device; a loop over experts elsewhere), and the results are added back to their rows, scaled by the
routing weights. On a CPU the weight gradients of the grouped matmul are written into memory reused
from step to step (:mod:`moekit.grad_memory`). Dropless by default; with a capacity factor, the
assignments beyond an expert's capacity are dropped, and the plan lists exactly which (row, expert)
pairs were dropped.

Three ways to run the per-expert matmuls, all exact:
    'grouped_mm'  torch.nn.functional.grouped_mm on the jagged blocks, no padding (the default
                  where it supports the dtype, device and alignment);
    'padded'      scatter each block into an (E, C, D) buffer, C = the largest block, one bmm
                  (the default elsewhere, e.g. float64 or unaligned sizes);
    'loop'        one matmul per expert: the obviously correct reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.gates import Routing
from moekit.grad_memory import GroupedMatmulReusedGrad

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STRATEGIES = ("auto", "padded", "grouped_mm", "loop")


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed assignment goes.

    Attributes:
        rows_M: the source row of each kept assignment, in expert order.
        experts_M: its expert (non-decreasing).
        weights_M: its combine weight (differentiable).
        counts_E: kept assignments per expert.
        offsets_E: int32 running totals of ``counts_E`` (the end of each expert's block).
        dropped_rows, dropped_experts: the (row, expert) pairs dropped for capacity.
        n_assignments: assignments before any drop.
        slots_M: each kept assignment's position inside its expert's block.
        max_count: the largest block (the padded buffer's C); computed when asked, since reading
            it waits for the device.
    """

    rows_M: Tensor
    experts_M: Tensor
    weights_M: Tensor
    counts_E: Tensor
    offsets_E: Tensor
    dropped_rows: Tensor
    dropped_experts: Tensor
    n_assignments: int
    slots_M: Tensor

    @property
    def n_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def max_count(self) -> int:
        return int(self.counts_E.max()) if self.n_experts else 0

    @property
    def drop_rate(self) -> float:
        return self.dropped_rows.numel() / max(1, self.n_assignments)


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
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return DispatchPlan(rows_M, experts_M, weights_M, counts_E, offsets_E, dropped_rows,
                        dropped_experts, n_assignments, slots_M)


def grouped_mm_supported(x_MD: Tensor, w_EDH: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs these operands (else the loop is used):
    a supported dtype and device, and rows whose strides are multiples of 16 bytes."""
    if not hasattr(torch.nn.functional, "grouped_mm") or x_MD.dtype != w_EDH.dtype:
        return False
    size = x_MD.element_size()
    aligned = (x_MD.shape[-1] * size) % 16 == 0 and (w_EDH.shape[-1] * size) % 16 == 0
    if not aligned or not x_MD.is_contiguous():
        return False
    if torch.compiler.is_compiling() and x_MD.dtype != torch.bfloat16:
        return False  # the compiler's shape function for grouped_mm accepts bf16 only
    if x_MD.device.type == "cpu":
        return x_MD.dtype in _GROUPED_DTYPES
    if x_MD.device.type == "cuda":
        return (x_MD.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x_MD.device) >= (8, 0))
    return False


def choose_strategy(x_MD: Tensor, w_EDH: Tensor) -> str:
    """'grouped_mm' where it runs (measured fastest on CPU too, benchmarks/RESULTS.md), else the
    padded bmm, which is exact for every dtype and device."""
    return "grouped_mm" if grouped_mm_supported(x_MD, w_EDH) else "padded"


def grouped_matmul(x_MD: Tensor, w_EDH: Tensor, plan: DispatchPlan, *, strategy: str = "auto"
                   ) -> Tensor:
    """Block e of ``x_MD`` (rows of expert e, in plan order) times ``w_EDH[e]``, shape (M, H)."""
    if strategy == "auto":
        strategy = choose_strategy(x_MD, w_EDH)
    if strategy == "padded":
        return grouped_matmul_padded(x_MD, w_EDH, plan)
    if strategy == "grouped_mm":
        if (x_MD.device.type == "cpu" and w_EDH.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return GroupedMatmulReusedGrad.apply(x_MD, w_EDH, plan.offsets_E)
        y_MH = torch.nn.functional.grouped_mm(x_MD, w_EDH, offs=plan.offsets_E)
        if y_MH.requires_grad and not torch.compiler.is_compiling():
            # grouped_mm's backward rejects broadcast (stride-0) gradients; give it real ones.
            y_MH.register_hook(lambda grad: grad.contiguous())
        return y_MH
    if strategy == "loop":
        return grouped_matmul_loop(x_MD, w_EDH, plan.counts_E)
    raise ValueError(f"grouped_matmul: strategy must be one of {STRATEGIES}; got {strategy!r}.")


def grouped_matmul_padded(x_MD: Tensor, w_EDH: Tensor, plan: DispatchPlan) -> Tensor:
    """Scatter the blocks into a zero-padded (E, C, D) buffer, one bmm, gather the rows back."""
    n_experts = w_EDH.shape[0]
    buffer_ECD = x_MD.new_zeros(n_experts, max(1, plan.max_count), x_MD.shape[-1])
    buffer_ECD = buffer_ECD.index_put((plan.experts_M, plan.slots_M), x_MD)
    y_ECH = torch.bmm(buffer_ECD, w_EDH)
    return y_ECH[plan.experts_M, plan.slots_M]


def grouped_matmul_loop(x_MD: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """The obviously correct fallback: one matmul per expert on its block."""
    blocks = torch.split(x_MD, counts_E.tolist())
    return torch.cat([block @ w_EDH[e] for e, block in enumerate(blocks)], dim=0)


def per_expert_rows(values_EX: Tensor, plan: DispatchPlan) -> Tensor:
    """Expert e's row of ``values_EX`` (a bias) for each of its assignments, in plan order, (M, X):
    ``values_EX[plan.experts_M]``, as repeated blocks, whose backward is a segment sum rather than
    an indexed accumulate (2.5-3x faster for a (16384, 1024) bias, forward and backward)."""
    return values_EX.repeat_interleave(plan.counts_E, dim=0, output_size=plan.rows_M.numel())


def gather_rows(x_ND: Tensor, plan: DispatchPlan) -> Tensor:
    """The input rows in plan (expert) order, shape (M, D)."""
    return x_ND.index_select(0, plan.rows_M)


def combine_rows(y_MO: Tensor, plan: DispatchPlan, n_rows: int) -> Tensor:
    """y_n = sum over n's kept assignments of weight * expert output; dropped ones add nothing."""
    weighted_MO = y_MO * plan.weights_M.unsqueeze(-1).to(y_MO.dtype)
    out_NO = y_MO.new_zeros(n_rows, y_MO.shape[-1])
    return out_NO.index_add(0, plan.rows_M, weighted_MO)

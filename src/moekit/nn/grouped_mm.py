"""The per-expert matmuls of routed layers, and the reused memory of their weight gradients.

Shape legend: M routed assignments (rows in expert order), D input features, H output features,
E experts.

Expert e's rows are the e-th contiguous block of ``x_MD`` (``counts_E[e]`` rows); each block is
multiplied by ``w_EDH[e]``. Three implementations, all exact, chosen by name
(``SparseMoEConfig.experts_implementation``):

    'grouped_mm'  torch.nn.functional.grouped_mm on the jagged blocks, no padding (the default
                  where it runs the dtype, device and alignment);
    'padded'      scatter each block into an (E, C, D) buffer, C = the largest block, one bmm
                  (the default elsewhere, e.g. float64 or unaligned sizes);
    'loop'        one matmul per expert: the obviously correct reference.

Weight gradients on a CPU (why): at E = 64 the experts' weight gradients are hundreds of MB. Each
backward allocates them afresh, ``zero_grad(set_to_none=True)`` frees them, and glibc serves and
returns blocks over 32 MB with mmap/munmap, so every step page-faults them in again: ~110,000 minor
faults and 40% of the step (benchmarks/RESULTS.md, benchmarks/expert_count_cost.py). Here each
weight keeps one block for its gradient. A backward writes into the block when nothing else still
holds it (the previous gradient was set to None), and otherwise allocates a fresh one, so a gradient
the caller kept or is accumulating into is never overwritten. The block is a NumPy array wrapped by
``torch.from_numpy``: every tensor on it holds a reference to the array, so the array's reference
count says whether any still does. A block lives as long as its weight;
:func:`release_gradient_memory` drops it sooner (after training, say). The gradient reaches the
weight through autograd as usual (AccumulateGrad adopts the tensor), so hooks,
DistributedDataParallel and gradient accumulation behave as with any other gradient.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

IMPLEMENTATIONS = ("auto", "grouped_mm", "padded", "loop")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the kernels ----------------------------------------------------------------------------------

def offsets_of(counts_E: Tensor) -> Tensor:
    """int32 running totals of ``counts_E``: the end of each expert's block (grouped_mm's offs)."""
    return torch.cumsum(counts_E, 0).to(torch.int32)


@functools.cache
def _grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's grouped_mm runs ``dtype`` on this CUDA device, and exactly: a probe on
    two tiny blocks, made once. torch 2.11 runs float32 and float16 on an H200
    (benchmarks/RESULTS.md); older releases run bfloat16 only."""
    x_MD = torch.arange(64, dtype=dtype, device=device).reshape(8, 8) / 64
    w_EDH = torch.ones(2, 8, 8, dtype=dtype, device=device)
    counts_E = torch.tensor([3, 5], device=device)
    try:
        got = torch.nn.functional.grouped_mm(x_MD, w_EDH, offs=offsets_of(counts_E))
    except RuntimeError:
        return False
    return bool(torch.equal(got, grouped_matmul_loop(x_MD, w_EDH, counts_E)))


def grouped_mm_supported(x_MD: Tensor, w_EDH: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs these operands: a supported dtype and
    device, and rows whose strides are multiples of 16 bytes."""
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
    if x_MD.device.type == "cuda" and x_MD.dtype in _GROUPED_DTYPES:
        if x_MD.dtype == torch.bfloat16:
            return torch.cuda.get_device_capability(x_MD.device) >= (8, 0)
        return _grouped_mm_runs_on(x_MD.device, x_MD.dtype)
    return False


def choose_implementation(x_MD: Tensor, w_EDH: Tensor) -> str:
    """'grouped_mm' where it runs (measured fastest on CPU and GPU, benchmarks/RESULTS.md), else
    the padded bmm, which is exact for every dtype and device."""
    return "grouped_mm" if grouped_mm_supported(x_MD, w_EDH) else "padded"


def check_implementation(owner: str, implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        listed = ", ".join(repr(i) for i in IMPLEMENTATIONS)
        raise ValueError(f"{owner}: experts_implementation must be one of {listed}; got "
                         f"experts_implementation={implementation!r}.")
    return implementation


def grouped_matmul(x_MD: Tensor, w_EDH: Tensor, counts_E: Tensor, *,
                   implementation: str = "auto") -> Tensor:
    """Block e of ``x_MD`` (its ``counts_E[e]`` rows, blocks in expert order) times ``w_EDH[e]``,
    shape (M, H), by the named implementation ('auto' chooses by dtype and device).

    Example:
        >>> x = torch.ones(3, 2); w = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> grouped_matmul(x, w, torch.tensor([1, 2]), implementation="loop").tolist()
        [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    """
    if implementation == "auto":
        implementation = choose_implementation(x_MD, w_EDH)
    if implementation == "padded":
        return grouped_matmul_padded(x_MD, w_EDH, counts_E)
    if implementation == "loop":
        return grouped_matmul_loop(x_MD, w_EDH, counts_E)
    check_implementation("grouped_matmul", implementation)
    if not grouped_mm_supported(x_MD, w_EDH):
        raise ValueError(
            f"grouped_matmul: experts_implementation='grouped_mm' cannot run {x_MD.dtype} rows of "
            f"{x_MD.shape[-1]} features on {x_MD.device.type} with this torch (it needs float32, "
            "bfloat16 or float16, rows whose size in bytes is a multiple of 16, and a device whose "
            "grouped_mm runs the dtype); use 'auto', 'padded' or 'loop'.")
    offsets_E = offsets_of(counts_E)
    if (x_MD.device.type == "cpu" and w_EDH.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return GroupedMatmulReusedGrad.apply(x_MD, w_EDH, offsets_E)
    y_MH = torch.nn.functional.grouped_mm(x_MD, w_EDH, offs=offsets_E)
    if y_MH.requires_grad and not torch.compiler.is_compiling():
        # grouped_mm's backward rejects broadcast (stride-0) gradients; give it real ones.
        y_MH.register_hook(lambda grad: grad.contiguous())
    return y_MH


def grouped_matmul_padded(x_MD: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """Scatter the blocks into a zero-padded (E, C, D) buffer, one bmm, gather the rows back."""
    n_experts, n_rows = w_EDH.shape[0], x_MD.shape[0]
    experts_M = torch.repeat_interleave(torch.arange(n_experts, device=x_MD.device), counts_E,
                                        output_size=n_rows)
    slots_M = torch.arange(n_rows, device=x_MD.device) - (torch.cumsum(counts_E, 0)
                                                          - counts_E)[experts_M]
    capacity = max(1, int(counts_E.max())) if n_experts else 1
    buffer_ECD = x_MD.new_zeros(n_experts, capacity, x_MD.shape[-1])
    buffer_ECD = buffer_ECD.index_put((experts_M, slots_M), x_MD)
    y_ECH = torch.bmm(buffer_ECD, w_EDH)
    return y_ECH[experts_M, slots_M]


def grouped_matmul_loop(x_MD: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """The obviously correct reference: one matmul per expert on its block."""
    blocks = torch.split(x_MD, counts_E.tolist())
    return torch.cat([block @ w_EDH[e] for e, block in enumerate(blocks)], dim=0)


def per_expert_rows(values_EX: Tensor, counts_E: Tensor, n_rows: int) -> Tensor:
    """Expert e's row of ``values_EX`` (a bias) repeated for each of its ``counts_E[e]`` rows,
    (M, X), as repeated blocks, whose backward is a segment sum rather than an indexed accumulate
    (2.5-3x faster for a (16384, 1024) bias, forward and backward)."""
    return values_EX.repeat_interleave(counts_E, dim=0, output_size=n_rows)


# --- weight gradients in reused memory (CPU) ------------------------------------------------------

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_LOCK = threading.Lock()


class _Block:
    """One weight's gradient memory, forgotten when the weight is freed."""

    def __init__(self, owner: Tensor, dtype: np.dtype) -> None:
        self.array = np.empty(tuple(owner.shape), dtype=dtype)
        key = id(owner)
        # Keyed by id, not by the tensor: a dict would compare tensors with ==, elementwise.
        self.owner = weakref.ref(owner, lambda _: _BLOCKS.pop(key, None))
        self._unused_refs = self._refs()  # measured, not assumed: interpreters count differently

    def fits(self, owner: Tensor, dtype: np.dtype) -> bool:
        return (self.owner() is owner and self.array.shape == tuple(owner.shape)
                and self.array.dtype == dtype)

    def _refs(self) -> int:
        return sys.getrefcount(self.array)

    def in_use(self) -> bool:
        """Whether a tensor on the block is alive: each one holds a reference to the array."""
        return self._refs() > self._unused_refs


_BLOCKS: dict[int, _Block] = {}


def _owner(weight: Tensor) -> Tensor:
    """The tensor owning ``weight``'s memory: the parameter itself, or the one it is a view of."""
    return weight if weight._base is None else weight._base


def _fresh(weight: Tensor) -> Tensor:
    return torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype,
                               device=weight.device)


def gradient_buffer(weight: Tensor) -> Tensor:
    """Uninitialised memory shaped and strided like ``weight``, for its gradient.

    The same memory comes back on the next call once every tensor handed out on it has been freed;
    while one is alive (the caller kept the gradient), fresh memory is allocated. CPU float32 and
    float64 weights that own their memory (or are views of one that does) are served from the
    reused block; anything else gets ``torch.empty_strided``.
    """
    owner = _owner(weight)
    dtype = _NUMPY_DTYPES.get(weight.dtype)
    if (dtype is None or weight.device.type != "cpu" or not owner.is_contiguous()
            or owner.storage_offset() != 0):
        return _fresh(weight)
    with _LOCK:
        block = _BLOCKS.get(id(owner))
        if block is None or not block.fits(owner, dtype):
            block = _BLOCKS[id(owner)] = _Block(owner, dtype)
        elif block.in_use():  # a gradient on the block is still alive: never overwrite it
            return _fresh(weight)
        memory = torch.from_numpy(block.array)
    return memory.as_strided(weight.shape, weight.stride(), weight.storage_offset())


def release_gradient_memory(module: torch.nn.Module | None = None) -> int:
    """Drop the reused gradient memory of ``module``'s parameters (of every weight when None), e.g.
    after training, before serving; a block is freed once no gradient on it is alive. The next
    backward allocates afresh. Returns how many blocks were dropped."""
    with _LOCK:
        keys = list(_BLOCKS) if module is None else [id(p) for p in module.parameters()]
        return sum(_BLOCKS.pop(key, None) is not None for key in keys)


def grouped_weight_grad(x_MD: Tensor, grad_MH: Tensor, counts: list[int], weight_EDH: Tensor
                        ) -> Tensor:
    """d(loss)/d(weight_EDH) of y = x_e @ weight_EDH[e] on each expert's block, into the reused
    memory: expert e's gradient is x_e^T grad_e (zero for an expert with no rows)."""
    grad_EDH = gradient_buffer(weight_EDH)
    output_first = grad_EDH.stride(-2) == 1  # a transposed view: write (H, D) blocks contiguously
    start = 0
    for e, count in enumerate(counts):
        x_cD, grad_cH = x_MD[start:start + count], grad_MH[start:start + count]
        if output_first:
            torch.mm(grad_cH.transpose(0, 1), x_cD, out=grad_EDH[e].transpose(0, 1))
        else:
            torch.mm(x_cD.transpose(0, 1), grad_cH, out=grad_EDH[e])
        start += count
    return grad_EDH


class GroupedMatmulReusedGrad(torch.autograd.Function):
    """``grouped_mm(x_MD, w_EDH, offs=offsets_E)`` whose weight gradient is written into reused
    memory by :func:`grouped_weight_grad`; the input gradient is grouped_mm's own."""

    @staticmethod
    def forward(ctx, x_MD: Tensor, w_EDH: Tensor, offsets_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_MD, w_EDH, offsets_E)
        return torch.nn.functional.grouped_mm(x_MD, w_EDH, offs=offsets_E)

    @staticmethod
    def backward(ctx, grad_MH: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_MD, w_EDH, offsets_E = ctx.saved_tensors
        grad_MH = grad_MH.contiguous()  # grouped_mm rejects broadcast (stride-0) gradients
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.functional.grouped_mm(grad_MH, w_EDH.transpose(-2, -1),
                                                    offs=offsets_E)
        if ctx.needs_input_grad[1]:
            counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
            if torch.is_grad_enabled():  # create_graph: a differentiable weight gradient
                blocks = zip(x_MD.split(counts), grad_MH.split(counts), strict=True)
                grad_w = torch.stack([x.transpose(0, 1) @ g for x, g in blocks])
            else:
                grad_w = grouped_weight_grad(x_MD, grad_MH, counts, w_EDH)
        return grad_x, grad_w, None

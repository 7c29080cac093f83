"""Expert weight gradients written into memory that is reused from step to step (CPU).

Shape legend: M routed assignments (rows in expert order), D input features, H output features,
E experts.

Why: at E = 64 the experts' weight gradients are hundreds of MB. Each backward allocates them
afresh, ``zero_grad(set_to_none=True)`` frees them, and glibc serves and returns blocks over 32 MB
with mmap/munmap, so every step page-faults them in again: ~110,000 minor faults and 40% of the
step (benchmarks/RESULTS.md, benchmarks/expert_count_cost.py). Here each weight keeps one block for
its gradient. A backward writes into the block when nothing else still holds it (the previous
gradient was set to None), and otherwise allocates a fresh one, so a gradient the caller kept or is
accumulating into is never overwritten. The block is a NumPy array wrapped by ``torch.from_numpy``:
every tensor on it holds a reference to the array, so the array's reference count says whether any
still does.

A block lives as long as its weight; :func:`release_gradient_memory` drops it sooner (after
training, say). The gradient reaches the weight through autograd as usual (AccumulateGrad adopts
the tensor), so hooks, DistributedDataParallel and gradient accumulation behave as with any other
gradient.
"""

from __future__ import annotations

import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

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

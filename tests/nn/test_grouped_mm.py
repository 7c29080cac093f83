"""Expert weight gradients written into reused memory: the same numbers as the loop, and a gradient
the caller still holds is never overwritten."""

import gc

import pytest
import torch

import moekit.nn.grouped_mm as grouped_mm
from moekit.nn.grouped_mm import (
    GroupedMatmulReusedGrad,
    gradient_buffer,
    grouped_matmul_loop,
    grouped_weight_grad,
    release_gradient_memory,
)
from moekit.nn.sparse import SparseMoE

COUNTS = [5, 0, 9, 6]  # expert 1 has no rows


def _weight(layout: str, gen: torch.Generator, dtype=torch.float32):
    """A parameter and a function giving the (E, D, H) weight the matmul sees: the parameter itself
    ('input-first'), or a transposed view of an (E, H, D) one ('output-first', as nn.Linear)."""
    shape = (4, 8, 12) if layout == "input-first" else (4, 12, 8)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype))
    return w, (lambda: w) if layout == "input-first" else (lambda: w.transpose(1, 2))


def _on_block(weight) -> bool:
    """Whether the weight's gradient lives in its reused block (malloc may hand back a freed
    address by chance, so comparing two gradients' addresses would not tell)."""
    return weight.grad.data_ptr() == grouped_mm._BLOCKS[id(weight)].array.ctypes.data


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("layout", ["input-first", "output-first"])
def test_outputs_and_gradients_match_the_loop(gen, layout):
    w, view = _weight(layout, gen)
    x = torch.randn(sum(COUNTS), 8, generator=gen, requires_grad=True)
    g = torch.randn(sum(COUNTS), 12, generator=gen)
    fast = GroupedMatmulReusedGrad.apply(x, view(), _offsets(COUNTS))
    gx_fast, gw_fast = torch.autograd.grad(fast, [x, w], g)
    loop = grouped_matmul_loop(x, view(), torch.tensor(COUNTS))
    gx_loop, gw_loop = torch.autograd.grad(loop, [x, w], g)
    torch.testing.assert_close(fast, loop)
    torch.testing.assert_close(gx_fast, gx_loop)
    torch.testing.assert_close(gw_fast, gw_loop)
    assert gw_fast.is_contiguous()  # the parameter's own layout, so autograd adopts it as is
    assert torch.count_nonzero(gw_fast[1]) == 0


@pytest.mark.parametrize("layout", ["input-first", "output-first"])
def test_weight_gradient_in_float64(gen, layout):
    w, view = _weight(layout, gen, torch.float64)
    x = torch.randn(sum(COUNTS), 8, generator=gen, dtype=torch.float64)
    g = torch.randn(sum(COUNTS), 12, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(grouped_matmul_loop(x, view(), torch.tensor(COUNTS)), [w], g)
    with torch.no_grad():
        got = grouped_weight_grad(x, g, COUNTS, view())
    torch.testing.assert_close(got if layout == "input-first" else got.transpose(1, 2), expected,
                               rtol=1e-12, atol=1e-12)


def _backward(view, x, g, counts):
    GroupedMatmulReusedGrad.apply(x, view(), _offsets(counts)).backward(g)


@pytest.mark.parametrize("layout", ["input-first", "output-first"])
def test_memory_is_reused_once_the_gradient_is_set_to_none(gen, layout):
    w, view = _weight(layout, gen)
    x = torch.randn(sum(COUNTS), 8, generator=gen)
    g = torch.randn(sum(COUNTS), 12, generator=gen)
    _backward(view, x, g, COUNTS)
    first = w.grad.clone()
    assert _on_block(w)
    w.grad = None
    _backward(view, x, g, COUNTS)
    assert _on_block(w)
    torch.testing.assert_close(w.grad, first)


def test_a_kept_gradient_is_never_overwritten(gen):
    w, view = _weight("input-first", gen)
    x = torch.randn(sum(COUNTS), 8, generator=gen)
    g = torch.randn(sum(COUNTS), 12, generator=gen)
    _backward(view, x, g, COUNTS)
    kept, snapshot = w.grad, w.grad.clone()
    w.grad = None
    _backward(view, x, 3 * g, COUNTS)
    assert not _on_block(w) and kept.data_ptr() == grouped_mm._BLOCKS[id(w)].array.ctypes.data
    torch.testing.assert_close(kept, snapshot)
    torch.testing.assert_close(w.grad, 3 * snapshot)


def test_gradients_accumulate_when_not_zeroed(gen):
    w, view = _weight("output-first", gen)
    x = torch.randn(sum(COUNTS), 8, generator=gen)
    g = torch.randn(sum(COUNTS), 12, generator=gen)
    _backward(view, x, g, COUNTS)
    once = w.grad.clone()
    _backward(view, x, g, COUNTS)
    torch.testing.assert_close(w.grad, 2 * once)


def test_an_expert_that_loses_its_rows_gets_a_zero_gradient(gen):
    # The reused memory holds the last step's numbers: an expert with no rows must be zeroed.
    w, view = _weight("input-first", gen)
    x = torch.randn(20, 8, generator=gen)
    g = torch.randn(20, 12, generator=gen)
    _backward(view, x, g, [5, 5, 5, 5])
    assert torch.count_nonzero(w.grad[3]) > 0
    w.grad = None
    _backward(view, x, g, [10, 5, 5, 0])
    assert torch.count_nonzero(w.grad[3]) == 0


def test_second_derivatives_match_the_loop(gen):
    w, view = _weight("input-first", gen)
    x = torch.randn(sum(COUNTS), 8, generator=gen, requires_grad=True)

    def grad_norm(matmul):
        (gw,) = torch.autograd.grad(matmul().square().sum(), [w], create_graph=True)
        return torch.autograd.grad(gw.square().sum(), [x])[0]

    fast = grad_norm(lambda: GroupedMatmulReusedGrad.apply(x, view(), _offsets(COUNTS)))
    loop = grad_norm(lambda: grouped_matmul_loop(x, view(), torch.tensor(COUNTS)))
    torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-4)


def test_a_training_step_reuses_the_experts_gradient_memory(gen):
    layer = SparseMoE(16, 8, 2, hidden=32, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    for _ in range(3):
        layer(x).output.square().mean().backward()
        assert _on_block(layer.experts.w13_EFD) and _on_block(layer.experts.w2_EOH)
        layer.zero_grad(set_to_none=True)


def test_the_memory_is_freed_with_its_weight(gen):
    w, view = _weight("input-first", gen)
    gradient_buffer(w)
    assert id(w) in grouped_mm._BLOCKS
    key = id(w)
    del w, view
    gc.collect()
    assert key not in grouped_mm._BLOCKS


def test_other_dtypes_get_fresh_memory(gen):
    w = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    buffer = gradient_buffer(w)
    assert buffer.shape == w.shape and buffer.dtype == torch.bfloat16
    assert id(w) not in grouped_mm._BLOCKS


def test_release_drops_a_modules_blocks_and_training_goes_on(gen):
    layer = SparseMoE(16, 4, 2, hidden=32, generator=gen)
    other, _ = _weight("input-first", gen)
    gradient_buffer(other)
    x = torch.randn(32, 16, generator=gen)
    layer(x).output.square().mean().backward()
    expected = layer.experts.w13_EFD.grad.clone()
    layer.zero_grad(set_to_none=True)
    assert release_gradient_memory(layer) == 2  # w13 and w2
    assert id(layer.experts.w13_EFD) not in grouped_mm._BLOCKS and id(other) in grouped_mm._BLOCKS
    layer(x).output.square().mean().backward()
    torch.testing.assert_close(layer.experts.w13_EFD.grad, expected)

"""Hostile inputs to the layers (issue 19, items 3 and 4): a NaN or inf row is refused before it can
change other rows' outputs or poison the gradients, unless the check is turned off, and then the
layers do what their configs document; with one expert per row the router still learns from the
task loss."""

import re

import pytest
import torch

from moekit import HierarchicalMixtureOfExperts, LocalizedMixtureOfExperts, MixtureOfExperts
from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE

F64 = torch.float64
# Every router kind, noisy top-k included, at its default K.
ROUTERS = {"topk": RouterConfig(kind="topk"),
           "noisy_topk": RouterConfig(kind="topk", noise="gaussian"),
           "switch": RouterConfig(kind="switch"),
           "expert_choice": RouterConfig(kind="expert_choice"),
           "sigmoid": RouterConfig(kind="sigmoid")}
TOKEN_CHOICE = ["topk", "noisy_topk", "switch", "sigmoid"]
DENSE = {"MixtureOfExperts": lambda **kw: MixtureOfExperts(6, 2, 3, **kw),
         "HierarchicalMixtureOfExperts": lambda **kw: HierarchicalMixtureOfExperts(6, 2, **kw),
         "LocalizedMixtureOfExperts": lambda **kw: LocalizedMixtureOfExperts(6, 2, 3, **kw)}
NOISE = 1  # the seed of the router noise, the same in every call that is compared


def _sparse(gen, name, **kwargs):
    return SparseMoE(6, 4, hidden=5, router=ROUTERS[name], generator=gen, **kwargs).double()


def _with_bad_row(x, row, value=float("nan")):
    bad = x.clone()
    bad[row, 2] = value
    return bad


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_one_nan_row_is_refused_under_every_router(gen, name):
    layer = _sparse(gen, name).train()
    x = _with_bad_row(torch.randn(16, 6, generator=gen, dtype=F64), 3)
    message = ("SparseMoE: x must be finite; 1 of 16 rows holds NaN or inf: x[3]. Drop or clean "
               "those rows before the layer, or build it with check_finite=False")
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x, generator=torch.Generator().manual_seed(NOISE))


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_is_refused_by_every_dense_layer(gen, name, value):
    layer = DENSE[name](generator=gen).double()
    x = _with_bad_row(torch.randn(9, 6, generator=gen, dtype=F64), 7, value)
    with pytest.raises(ValueError, match=re.escape(f"{name}: x must be finite; 1 of 9 rows holds "
                                                   "NaN or inf: x[7]. Drop or clean")):
        layer(x)


def test_the_message_counts_every_bad_row_and_names_the_first_five(gen):
    layer = _sparse(gen, "topk")
    x = torch.randn(3, 10, 6, generator=gen, dtype=F64)  # (batch, tokens, D): 30 rows
    for b, t in [(0, 1), (0, 4), (1, 0), (1, 9), (2, 2), (2, 3), (2, 8)]:
        x[b, t, 5] = float("inf")
    listed = "x[0, 1], x[0, 4], x[1, 0], x[1, 9], x[2, 2], ..."
    with pytest.raises(ValueError, match=re.escape(f"7 of 30 rows hold NaN or inf: {listed}. ")):
        layer(x)


def test_a_refused_batch_moves_no_load_bias(gen):
    """The sigmoid router counts its load in every training forward: a refused batch must not."""
    layer = _sparse(gen, "sigmoid").train()
    before = layer.router.bias_E.clone()
    with pytest.raises(ValueError, match="x must be finite"):
        layer(_with_bad_row(torch.randn(16, 6, generator=gen, dtype=F64), 0))
    assert not layer.router.load_counts_E.any()
    layer.router.step_bias()
    assert torch.equal(layer.router.bias_E, before)


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_with_the_check_off_token_choice_keeps_the_other_rows_outputs(gen, name):
    """Documented (SparseMoEConfig.check_finite): the bad row's output is NaN, the other rows'
    outputs are those of the clean batch (token choice, dropless), the router's gradient is NaN."""
    layer = _sparse(gen, name, check_finite=False).eval()
    x = torch.randn(16, 6, generator=gen, dtype=F64)
    clean = layer(x).output
    out = layer(_with_bad_row(x, 3)).output
    others = torch.arange(16) != 3
    assert out[3].isnan().all()
    torch.testing.assert_close(out[others], clean[others], rtol=0, atol=0)
    out.square().sum().backward()
    assert layer.router.w_DE.grad.isnan().any()


def test_with_the_check_off_expert_choice_lets_a_nan_row_change_other_rows(gen):
    """Documented: under expert choice the NaN row takes a slot in every expert and pushes other
    rows out, so their outputs change: the reason the check is on by default."""
    layer = _sparse(gen, "expert_choice", check_finite=False).eval()
    x = torch.randn(16, 6, generator=gen, dtype=F64)
    clean = layer(x)
    out = layer(_with_bad_row(x, 3))
    assert out.routing.mask_NK[3].all()  # every expert took the NaN row
    others = torch.arange(16) != 3
    changed = (out.output[others] != clean.output[others]).any(-1)
    assert changed.any() and out.output[others].isfinite().all()


@pytest.mark.parametrize("name", sorted(DENSE))
def test_with_the_check_off_a_dense_layer_gives_nan_on_the_bad_row_only(gen, name):
    """Documented (the dense configs' check_finite): the bad row's output is NaN, the other rows'
    outputs are unchanged, and a loss over the batch gives the gate NaN gradients."""
    layer = DENSE[name](check_finite=False, generator=gen).double()
    x = torch.randn(9, 6, generator=gen, dtype=F64)
    clean = layer(x).output
    out = layer(_with_bad_row(x, 7, float("inf"))).output
    assert out[7].isnan().all()
    torch.testing.assert_close(out[:7], clean[:7], rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad.isnan().any() for p in layer.gate.parameters())


@pytest.mark.parametrize("name, top_k", [("topk", 1), ("topk", 2), ("noisy_topk", 1),
                                         ("noisy_topk", 2), ("switch", 1), ("expert_choice", 1),
                                         ("expert_choice", 2), ("sigmoid", 1), ("sigmoid", 2)])
def test_the_router_learns_from_the_task_loss_for_every_kind_and_k(gen, name, top_k):
    """With one expert per row, renormalising would make every weight 1.0 and this gradient exactly
    0; the layer scales by the gate score instead (Switch: y = p_i(x) E_i(x))."""
    router = RouterConfig(kind=ROUTERS[name].kind, top_k=top_k, noise=ROUTERS[name].noise)
    layer = SparseMoE(6, 4, hidden=5, router=router, load_balance_weight=0.0,
                      generator=gen).double().train()
    out = layer(torch.randn(32, 6, generator=gen, dtype=F64),
                generator=torch.Generator().manual_seed(NOISE))
    assert out.aux_loss.item() == 0.0
    out.output.square().sum().backward()  # the task loss alone
    grad = layer.router.w_DE.grad
    assert grad.isfinite().all() and grad.norm() > 1e-3


def test_a_tree_too_deep_to_count_is_refused_with_a_message_that_prints():
    from moekit.nn.hierarchical import HMEConfig

    with pytest.raises(ValueError, match=r"depth=1000000 \(more than 65536 experts\)"):
        HMEConfig(2, 1, depth=10**6)  # 2**1e6 has 301,030 digits: more than Python will print

"""The paper's dense softmax gate and the Routing record."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moekit.nn.gates import GateConfig, SoftmaxGate
from moekit.nn.init import uniform_fan_in_
from moekit.nn.outputs import Routing
from moekit.nn.routers import (
    ExpertChoiceRouter,
    RouterConfig,
    SigmoidBiasRouter,
    TopKRouter,
    step_load_biases,
)


def test_worked_example():
    # One input feature, two experts: logits = x * w + b = 2 * (1, -1) + (0, 0) = (2, -2)
    # p = softmax(2, -2) = (e^2, e^-2) / (e^2 + e^-2) = (0.98201, 0.01799)
    gate = SoftmaxGate(1, 2, bias=True)
    with torch.no_grad():
        gate.w_DE.copy_(torch.tensor([[1.0, -1.0]]))
        gate.b_E.zero_()
    routing = gate(torch.tensor([[2.0]]))
    torch.testing.assert_close(routing.logits_NE, torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(routing.probs_NE, torch.tensor([[0.98201, 0.01799]]), atol=1e-5,
                               rtol=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 5), e=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_rows_sum_to_one_and_dense_routing_is_k_equals_e(n, d, e, seed):
    gen = torch.Generator().manual_seed(seed)
    gate = SoftmaxGate(d, e, generator=gen)
    routing = gate(10 * torch.randn(n, d, generator=gen))
    assert isinstance(routing, Routing)
    torch.testing.assert_close(routing.probs_NE.sum(-1), torch.ones(n))
    assert routing.top_k == routing.n_experts == e
    assert torch.equal(routing.experts_NK, torch.arange(e).expand(n, e))
    assert torch.equal(routing.weights_NK, routing.probs_NE)


def test_generator_makes_weights_reproducible():
    a = SoftmaxGate(3, 4, generator=torch.Generator().manual_seed(7))
    b = SoftmaxGate(3, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.w_DE, b.w_DE) and torch.equal(a.b_E, b.b_E)


def test_no_bias():
    gate = SoftmaxGate(3, 4, bias=False)
    assert gate.b_E is None and len(list(gate.parameters())) == 1


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError,
                       match=r"SoftmaxGate: n_experts must be an integer >= 1; got n_experts=0"):
        SoftmaxGate(2, 0)
    with pytest.raises(ValueError,
                       match=r"GateConfig: kind must be one of 'softmax'; got kind='topk'"):
        GateConfig(kind="topk")


# --- sparse routers ------------------------------------------------------------------------------

def _router(gen, **kwargs):
    return RouterConfig(**kwargs).build(6, 5, generator=gen)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_chooses_the_highest_logits(gen, renormalize):
    router = _router(gen, kind="topk", top_k=2, renormalize=renormalize)
    routing = router(torch.randn(9, 6, generator=gen))
    order = routing.logits_NE.argsort(-1, descending=True)[:, :2]
    assert torch.equal(routing.experts_NK, order)
    if renormalize:  # softmax over the two kept logits
        torch.testing.assert_close(routing.weights_NK,
                                   torch.softmax(routing.logits_NE.gather(-1, order), -1))
    else:  # their full-softmax probabilities, summing to less than 1
        torch.testing.assert_close(routing.weights_NK, routing.probs_NE.gather(-1, order))
        assert (routing.weights_NK.sum(-1) < 1).all()


def test_switch_is_top_one_weighted_by_its_probability(gen):
    # Switch Transformer's y = p_i(x) E_i(x): the weight is the chosen expert's full softmax
    # probability, not the 1.0 of a softmax over one logit.
    routing = _router(gen, kind="switch")(torch.randn(4, 6, generator=gen))
    assert (routing.top_k == 1
            and torch.equal(routing.experts_NK[:, 0], routing.logits_NE.argmax(-1)))
    torch.testing.assert_close(routing.weights_NK, routing.probs_NE.max(-1, keepdim=True).values)
    assert (routing.weights_NK < 1).all()


def test_top_one_worked_example():
    # logits (2, 0, 0): p = e^2 / (e^2 + 2) = 7.389 / 9.389 = 0.78699 for expert 0.
    # sigmoid k = 1: the score itself, sigmoid(2) = 0.88080 (not 0.88080 / 0.88080 = 1).
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    for kind, want in [("topk", 0.78699), ("switch", 0.78699), ("sigmoid", 0.88080)]:
        routing = RouterConfig(kind=kind, top_k=1).build(1, 3).choose(logits)
        assert routing.experts_NK.item() == 0
        assert routing.weights_NK.item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kind", ["topk", "switch", "sigmoid"])
def test_scale_top1_off_keeps_the_weight_of_one_that_old_folders_were_saved_with(kind):
    # A config saved before scale_top1 existed reads back with scale_top1=False
    # (RouterConfig.LEGACY_DEFAULTS): weight 1.0, the outputs it was saved with.
    assert RouterConfig.LEGACY_DEFAULTS == {"scale_top1": False}
    router = RouterConfig(kind=kind, top_k=1, scale_top1=False).build(3, 4)
    routing = router.choose(torch.randn(6, 4))
    torch.testing.assert_close(routing.weights_NK, torch.ones(6, 1))


@pytest.mark.parametrize("kind", ["topk", "sigmoid"])
def test_scale_top1_leaves_k_above_one_renormalised(gen, kind):
    logits = torch.randn(5, 5, generator=gen)
    on = RouterConfig(kind=kind, top_k=2).build(6, 5).choose(logits)
    off = RouterConfig(kind=kind, top_k=2, scale_top1=False).build(6, 5).choose(logits)
    torch.testing.assert_close(on.weights_NK, off.weights_NK, rtol=0, atol=0)
    torch.testing.assert_close(on.weights_NK.sum(-1), torch.ones(5))


def test_router_flags_must_be_booleans():
    with pytest.raises(TypeError, match=r"RouterConfig: scale_top1 must be True or False; "
                                        r"got scale_top1='no'"):
        RouterConfig(scale_top1="no")
    with pytest.raises(TypeError, match=r"renormalize must be True or False; got renormalize=1"):
        RouterConfig(renormalize=1)


def test_noisy_topk_is_reproducible_and_only_in_training(gen):
    router = _router(gen, kind="topk", top_k=2, noise="gaussian")
    x = torch.randn(30, 6, generator=gen)
    a = router(x, generator=torch.Generator().manual_seed(5))
    b = router(x, generator=torch.Generator().manual_seed(5))
    c = router(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.logits_NE, b.logits_NE) and not torch.equal(a.logits_NE, c.logits_NE)
    # Shazeer's smooth load: a differentiable expected count per expert, summing to about N * K
    assert a.load_E.shape == (5,) and a.load_E.requires_grad
    assert abs(a.load_E.sum().item() - 60) < 15
    router.eval()
    clean = router(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(clean.logits_NE, x @ router.w_DE)
    assert clean.load_E is None


def test_jitter_multiplies_inputs_in_training_only(gen):
    router = _router(gen, kind="topk", noise="jitter", jitter_eps=0.1)
    x = torch.randn(8, 6, generator=gen)
    noisy = router(x, generator=torch.Generator().manual_seed(0)).logits_NE
    assert not torch.allclose(noisy, x @ router.w_DE)
    torch.testing.assert_close(router.eval()(x).logits_NE, x @ router.w_DE)


def test_expert_choice_gives_each_expert_its_top_rows(gen):
    router = _router(gen, kind="expert_choice", top_k=2, capacity_factor=1.0)
    assert isinstance(router, ExpertChoiceRouter)
    routing = router(torch.randn(10, 6, generator=gen))
    capacity = 4  # ceil(1.0 * 10 rows * 2 / 5 experts)
    assert routing.mask_NK.sum(0).tolist() == [capacity] * 5
    for e in range(5):
        top = set(routing.probs_NE[:, e].topk(capacity).indices.tolist())
        assert set(routing.mask_NK[:, e].nonzero().flatten().tolist()) == top
    torch.testing.assert_close(routing.weights_NK, routing.probs_NE * routing.mask_NK)


def test_sigmoid_bias_moves_toward_balance(gen):
    router = _router(gen, kind="sigmoid", top_k=1, bias_update_rate=0.5)
    assert isinstance(router, SigmoidBiasRouter)
    with torch.no_grad():
        router.w_DE.zero_()
        router.w_DE[0, 3] = 5.0  # expert 3 wins every row with positive feature 0
    x = torch.randn(40, 6, generator=gen).abs()
    first = router(x)
    assert first.experts_NK.flatten().tolist() == [3] * 40
    # A forward only counts; the bias moves at the optimizer step.
    assert router.load_counts_E.tolist() == [0, 0, 0, 40, 0] and not router.bias_E.any()
    router.step_bias()
    # Expert 3 was overloaded: its bias fell, the others' rose (by the rate, sign of the gap).
    assert router.bias_E[3].item() == -0.5 and (router.bias_E[[0, 1, 2, 4]] == 0.5).all()
    assert not router.load_counts_E.any()  # cleared for the next step
    # k = 1: the sigmoid score itself (renormalising one score would give 1.0)
    torch.testing.assert_close(first.weights_NK, torch.sigmoid(first.logits_NE[:, 3:4]))
    router.eval()
    before = router.bias_E.clone()
    router(x)
    assert not router.load_counts_E.any()  # no counting outside training
    router.step_bias()
    assert torch.equal(router.bias_E, before)  # no rows counted: no move
    assert not router.bias_E.requires_grad


def test_sigmoid_bias_steps_once_from_every_micro_batch(gen):
    """Two micro-batches then one step move the bias as one batch of both (the bug this replaced:
    a move per forward, from each piece's own load)."""
    router = _router(gen, kind="sigmoid", top_k=2, bias_update_rate=0.1)
    x = torch.randn(30, 6, generator=gen)
    whole = _router(torch.Generator().manual_seed(1234), kind="sigmoid", top_k=2,
                    bias_update_rate=0.1)
    whole.load_state_dict(router.state_dict())
    for _ in range(3):  # later steps route with the moved bias
        router(x[:17])
        router(x[17:])
        whole(x)
        assert torch.equal(router.load_counts_E, whole.load_counts_E)
        assert int(whole.load_counts_E.sum()) == 60  # 30 rows * top 2
        router.step_bias()
        whole.step_bias()
        assert torch.equal(router.bias_E, whole.bias_E)
    assert whole.bias_E.any()


def test_step_load_biases_walks_a_model(gen):
    model = nn.ModuleList([_router(gen, kind="sigmoid"), _router(gen, kind="topk"),
                           _router(gen, kind="sigmoid", bias_update_rate=0.5)])
    x = torch.randn(8, 6, generator=gen)
    for router in model:
        router(x)
    assert [int(m.load_counts_E.sum()) for m in (model[0], model[2])] == [16, 16]
    assert step_load_biases(model) == 2
    assert model[2].bias_E.abs().sum() > 0 and not model[2].load_counts_E.any()
    assert step_load_biases(nn.Linear(2, 2)) == 0
    # The counts live within a step, as accumulated gradients do: saved state holds the bias only
    # (so model folders saved before the counts existed still load).
    assert [k for k in model.state_dict() if k.startswith("2.")] == ["2.w_DE", "2.bias_E"]


def test_router_config_errors():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, n_experts=5\]; got top_k=7"):
        RouterConfig(top_k=7).build(6, 5)
    with pytest.raises(ValueError,
                       match=r"noise='gaussian' \(noisy top-k\) needs kind 'topk' or 'switch'"):
        RouterConfig(kind="expert_choice", noise="gaussian")
    with pytest.raises(ValueError, match=r"kind must be one of .*got kind='hash'"):
        RouterConfig(kind="hash")
    assert isinstance(RouterConfig().build(6, 5), TopKRouter)


# --- shared helpers ------------------------------------------------------------------------------

def test_make_dense_is_every_expert_weighted_by_its_probability():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)
    routing = Routing.make_dense(logits, probs)
    assert routing.dense and routing.mask_NK is None and routing.load_E is None
    assert routing.experts_NK.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert routing.weights_NK is probs and routing.probs_NE is probs and routing.logits_NE is logits
    # The dataclass field keeps its default: a Routing built directly is not dense.
    assert Routing(probs, routing.experts_NK, probs, logits).dense is False


def test_uniform_fan_in_draws_as_nn_linear_does_from_the_generator():
    w = torch.empty(5, 3)
    uniform_fan_in_(w, 4, torch.Generator().manual_seed(3))
    expected = torch.empty(5, 3).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w, expected)
    # The gates draw their weights, then their biases, from one generator in that order.
    gate = SoftmaxGate(4, 3, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(gate.w_DE.detach(), torch.empty(4, 3).uniform_(-0.5, 0.5, generator=g))
    assert torch.equal(gate.b_E.detach(), torch.empty(3).uniform_(-0.5, 0.5, generator=g))


def test_expert_choice_router_builds_without_a_generator():
    router = ExpertChoiceRouter(6, 5, RouterConfig(kind="expert_choice"))
    assert router.w_DE.shape == (6, 5)


@pytest.mark.parametrize("kind, default", [("topk", 2), ("switch", 1), ("expert_choice", 2),
                                           ("sigmoid", 2)])
def test_top_k_left_unset_takes_the_kinds_default(kind, default):
    assert RouterConfig(kind=kind).top_k == default


def test_switch_refuses_another_top_k_instead_of_rewriting_it():
    with pytest.raises(ValueError, match=r"kind='switch' routes every row to one expert, top_k=1; "
                                         r"got top_k=2\. Use kind='topk' for top-2 routing"):
        RouterConfig(kind="switch", top_k=2)


@pytest.mark.parametrize("kind", ["topk", "sigmoid", "expert_choice"])
def test_choose_applies_the_forward_rule(gen, kind):
    """The rule forward applies is choose(logits): the interventions call it, so it must be the
    same rule, on the same logits (the two copies this replaces could drift apart)."""
    router = _router(gen, kind=kind).eval()
    x = torch.randn(9, 6, generator=gen)
    routing = router(x)
    again = router.choose(x @ router.w_DE)
    for name in ("weights_NK", "experts_NK", "probs_NE", "logits_NE"):
        torch.testing.assert_close(getattr(again, name), getattr(routing, name), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["topk", "sigmoid", "expert_choice"])
def test_choose_among_the_experts_kept(gen, kind):
    router = _router(gen, kind=kind).eval()
    keep_E = torch.tensor([True, False, True, True, False])
    routing = router.choose(torch.randn(12, 5, generator=gen), keep_E)
    chosen = routing.experts_NK if routing.mask_NK is None else routing.experts_NK[routing.mask_NK]
    assert keep_E[chosen].all()
    assert (routing.probs_NE[:, ~keep_E] == 0).all()


def test_choose_refuses_fewer_experts_than_top_k(gen):
    router = _router(gen, kind="topk", top_k=2)
    with pytest.raises(ValueError,
                       match="top_k=2 experts per row cannot be chosen from the 1 left"):
        router.choose(torch.randn(3, 5), torch.tensor([True, False, False, False, False]))


def test_lm_training_steps_the_load_bias_once_per_optimizer_step():
    """`moekit lm train`'s step moves a sigmoid router's bias from that step's counts, then
    clears them (the training loop's call of step_load_biases)."""
    import copy
    import dataclasses

    from moekit.nn.lm import LMConfig
    from moekit.runs.lm_checkpoint import new_state, train_step

    moe = LMConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, expert_hidden=8,
                   router=RouterConfig(kind="sigmoid", bias_update_rate=0.1))
    state = new_state({"moe": moe, "dense": dataclasses.replace(moe, ffn="dense")}, seed=0,
                      lr=1e-3, weight_decay=0.0, warmup_steps=0, steps=2)
    router = state.models["moe"].blocks[0].ffn.router
    x_BT = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(state.models["moe"])  # the same forward, to read the step's counts
    twin.loss(x_BT, x_BT.roll(-1, 1))
    counts_E = twin.blocks[0].ffn.router.load_counts_E.double()
    assert int(counts_E.sum()) == 32  # 16 tokens * top 2
    train_step(state, x_BT, x_BT.roll(-1, 1))
    assert not router.load_counts_E.any()
    want = 0.1 * torch.sign(counts_E.mean() - counts_E)
    torch.testing.assert_close(router.bias_E.double(), want)
    assert want.any()

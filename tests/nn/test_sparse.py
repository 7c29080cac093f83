"""Sparse routed layers against a slow reference (a loop over rows), in float64, gradients
included."""

import math

import pytest
import torch

from moekit.nn.dispatch import plan_dispatch
from moekit.nn.experts import ACTIVATIONS
from moekit.nn.grouped_mm import grouped_matmul, grouped_matmul_loop, per_expert_rows
from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE

F64 = torch.float64
ROUTERS = ["topk", "switch", "expert_choice", "sigmoid"]


def expert_on_row(bank, e, x_D):
    """One expert on one row, straight from its weights."""
    act = ACTIVATIONS[bank.activation]
    if hasattr(bank, "w3_EDH"):  # SwiGLU
        return (act(x_D @ bank.w1_EDH[e]) * (x_D @ bank.w3_EDH[e])) @ bank.w2_EHO[e]
    return act(x_D @ bank.w1_EDH[e] + bank.b1_EH[e]) @ bank.w2_EHO[e] + bank.b2_EO[e]


def reference_forward(layer, x_ND):
    """Slow and obviously correct: each row, each of its kept choices, weight times that expert."""
    routing = layer.router(x_ND)
    n_rows, k = routing.experts_NK.shape
    n_assignments = int(routing.mask_NK.sum()) if routing.mask_NK is not None else n_rows * k
    cf = layer.config.capacity_factor
    capacity = math.ceil(cf * n_assignments / layer.config.n_experts) if cf else None
    taken = [0] * layer.config.n_experts
    kept = {}
    for n in range(n_rows):  # first come (lowest row) first served
        for j in range(k):
            e = int(routing.experts_NK[n, j])
            if routing.mask_NK is not None and not routing.mask_NK[n, j]:
                continue
            if capacity is None or taken[e] < capacity:
                kept[(n, j)] = True
                taken[e] += 1
    rows = []
    for n in range(n_rows):
        y = x_ND.new_zeros(x_ND.shape[1])
        for j in range(k):
            if (n, j) in kept:
                e = int(routing.experts_NK[n, j])
                y = y + routing.weights_NK[n, j] * expert_on_row(layer.experts, e, x_ND[n])
        if layer.shared is not None:
            for s in range(layer.config.n_shared):
                y = y + expert_on_row(layer.shared, s, x_ND[n])
        rows.append(y)
    return torch.stack(rows), len(kept)


def _compare(layer, x_ND):
    layer = layer.double().eval()
    x_fast = x_ND.clone().requires_grad_(True)
    x_slow = x_ND.clone().requires_grad_(True)
    out = layer(x_fast)
    slow, n_kept = reference_forward(layer, x_slow)
    torch.testing.assert_close(out.output, slow)
    assert out.dispatch.rows_M.numel() == n_kept
    probe = torch.randn_like(slow)
    params = list(layer.parameters())
    grads_fast = torch.autograd.grad((out.output * probe).sum(), [x_fast, *params],
                                     allow_unused=True)
    grads_slow = torch.autograd.grad((slow * probe).sum(), [x_slow, *params], allow_unused=True)
    for gf, gs in zip(grads_fast, grads_slow, strict=True):
        if gs is None:
            assert gf is None or torch.count_nonzero(gf) == 0
        else:
            torch.testing.assert_close(gf, gs)
    return out


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("experts", ["swiglu", "mlp"])
def test_every_router_and_expert_type_matches_the_reference(gen, router, experts):
    layer = SparseMoE(6, 4, None if router == "switch" else 2, hidden=5, router=router,
                      experts=experts,
                      activation="silu" if experts == "swiglu" else "gelu", generator=gen)
    _compare(layer, torch.randn(11, 6, generator=gen, dtype=F64))


def test_shared_experts(gen):
    layer = SparseMoE(6, 4, 2, hidden=5, n_shared=2, generator=gen)
    _compare(layer, torch.randn(9, 6, generator=gen, dtype=F64))


@pytest.mark.parametrize("n_experts, top_k, n_rows", [(1, 1, 7), (4, 4, 7), (4, 2, 1), (8, 2, 3)])
def test_edge_sizes(gen, n_experts, top_k, n_rows):
    # one expert; k = E; a single row; more experts than rows (some experts get no rows)
    layer = SparseMoE(6, n_experts, top_k, hidden=5, generator=gen)
    out = _compare(layer, torch.randn(n_rows, 6, generator=gen, dtype=F64))
    if n_experts == 8:
        assert (out.dispatch.counts_E == 0).any()


def test_every_row_to_one_expert(gen):
    layer = SparseMoE(6, 4, 1, hidden=5, generator=gen).double()
    with torch.no_grad():
        layer.router.w_DE.zero_()
        layer.router.w_DE[0, 2] = 100.0
    x = torch.randn(10, 6, generator=gen, dtype=F64).abs() + 0.1  # feature 0 > 0: expert 2 wins
    out = _compare(layer, x)
    assert out.dispatch.counts_E.tolist() == [0, 0, 10, 0]


def test_capacity_drops_are_reported_exactly(gen):
    layer = SparseMoE(6, 4, 1, hidden=5, capacity_factor=1.0, generator=gen).double()
    with torch.no_grad():
        layer.router.w_DE.zero_()
        layer.router.w_DE[0, 2] = 100.0
    x = torch.randn(12, 6, generator=gen, dtype=F64).abs() + 0.1
    out = _compare(layer, x)
    # M = 12 assignments, E = 4: capacity ceil(12 / 4) = 3. Expert 2 keeps rows 0-2, drops 3-11.
    assert out.dispatch.counts_E.tolist() == [0, 0, 3, 0]
    assert out.dispatch.dropped_rows.tolist() == list(range(3, 12))
    assert out.dispatch.dropped_experts.tolist() == [2] * 9
    assert out.dispatch.drop_rate == pytest.approx(9 / 12)
    assert torch.equal(out.output[3:], torch.zeros(9, 6, dtype=F64))  # dropped rows pass nothing


def test_dropless_by_default(gen):
    out = SparseMoE(6, 4, 2, hidden=5, generator=gen)(torch.randn(20, 6, generator=gen))
    assert out.dispatch.drop_rate == 0 and out.dispatch.rows_M.numel() == 40


@pytest.mark.parametrize("strategy", ["grouped_mm", "padded"])
def test_fast_matmul_strategies_match_the_loop(gen, strategy):
    # float32: grouped_mm runs on CPU; the padded bmm runs everywhere. Same numbers as the loop.
    layer = SparseMoE(16, 8, 2, hidden=24, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    plan = plan_dispatch(layer.router(x), 8)
    x_MD = x[plan.rows_M]
    w = layer.experts.w2_EHO.detach().transpose(1, 2).contiguous().requires_grad_(True)
    fast = grouped_matmul(x_MD, w, plan.counts_E, implementation=strategy)
    loop = grouped_matmul_loop(x_MD, w, plan.counts_E)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(fast)
    (ga,) = torch.autograd.grad((fast * g).sum(), [w])
    (gb,) = torch.autograd.grad((loop * g).sum(), [w])
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["padded", "loop"])
@pytest.mark.parametrize("experts", ["swiglu", "mlp"])
def test_every_strategy_matches_the_reference_in_float64(gen, strategy, experts):
    layer = SparseMoE(6, 4, 2, hidden=5, capacity_factor=0.75, experts=experts,
                      experts_implementation=strategy, generator=gen)
    _compare(layer, torch.randn(13, 6, generator=gen, dtype=F64))


def test_per_expert_rows_equal_the_gather(gen):
    # Capacity drops and an expert no row chose: the repeated blocks must still line up.
    layer = SparseMoE(6, 4, 2, hidden=5, generator=gen)
    routing = layer.router(torch.randn(17, 6, generator=gen))  # 4 experts, planned as 5
    plan = plan_dispatch(routing, 5, capacity_factor=0.6)
    assert plan.dropped_rows.numel() > 0 and plan.counts_E[4] == 0
    bias = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    probe = torch.randn(plan.rows_M.numel(), 3, generator=gen, dtype=F64)
    fast, slow = per_expert_rows(bias, plan.counts_E, plan.rows_M.numel()), bias[plan.experts_M]
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(fast, bias, probe)[0],
                               torch.autograd.grad(slow, bias, probe)[0])


def test_bad_strategy(gen):
    plan = plan_dispatch(SparseMoE(8, 4, 2, generator=gen).router(torch.randn(3, 8)), 4)
    with pytest.raises(ValueError, match="experts_implementation must be one of"):
        grouped_matmul(torch.randn(6, 8), torch.randn(4, 8, 8), plan.counts_E,
                       implementation="fast")


def test_bf16_inputs(gen):
    layer = SparseMoE(16, 4, 2, hidden=32, generator=gen)
    x = torch.randn(8, 16, generator=gen)
    reference = layer(x).output
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.output.dtype == torch.bfloat16
    torch.testing.assert_close(out.output.float(), reference, rtol=0.1, atol=0.05)


def test_leading_axes_are_kept(gen):
    out = SparseMoE(8, 4, 2, hidden=8, generator=gen)(torch.randn(2, 3, 5, 8, generator=gen))
    assert out.output.shape == (2, 3, 5, 8) and out.routing.experts_NK.shape == (30, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, n_experts=4\]; got top_k=6"):
        SparseMoE(8, 4, 6)
    with pytest.raises(ValueError,
                       match=r"experts must be one of 'swiglu', 'mlp'; got experts='conv'"):
        SparseMoE(8, 4, 2, experts="conv")
    with pytest.raises(ValueError, match=r"x has 5 features in its last axis but the layer "
                                         r"expects d_model=8"):
        SparseMoE(8, 4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0; "
                                         r"got capacity_factor=0"):
        SparseMoE(8, 4, 2, capacity_factor=0)


def test_works_under_torch_compile(gen):
    layer = SparseMoE(16, 4, 2, hidden=32, n_shared=1, generator=gen).eval()
    x = torch.randn(24, 16, generator=gen)
    eager = layer(x).output
    compiled = torch.compile(layer)(x).output
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_noise_comes_from_the_callers_generator(gen):
    layer = SparseMoE(8, 4, 2, hidden=8, router=RouterConfig(kind="topk", noise="gaussian"),
                      generator=gen).train()
    x = torch.randn(16, 8, generator=gen)
    a = layer(x, generator=torch.Generator().manual_seed(3))
    b = layer(x, generator=torch.Generator().manual_seed(3))
    assert (torch.equal(a.output, b.output)
            and torch.equal(a.routing.experts_NK, b.routing.experts_NK))


def test_aux_loss_parts_are_kept_for_logging(gen):
    layer = SparseMoE(8, 4, 2, hidden=8, router=RouterConfig(kind="topk", noise="gaussian"),
                      load_balance_weight=0.01, z_loss_weight=0.001, importance_weight=0.1,
                      generator=gen).train()
    out = layer(torch.randn(16, 8, generator=gen), generator=torch.Generator().manual_seed(0))
    assert set(out.aux_parts) == {"load_balance", "z_loss", "importance_load"}
    expected = (0.01 * out.aux_parts["load_balance"] + 0.001 * out.aux_parts["z_loss"]
                + 0.1 * out.aux_parts["importance_load"])
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert layer.router.w_noise_DE.grad is not None  # the smooth load trains the noise scale


@pytest.mark.parametrize("implementation", ["grouped_mm", "padded", "loop"])
def test_experts_implementation_is_reachable_from_the_layer_and_saved(gen, implementation,
                                                                      tmp_path):
    """float32, where grouped_mm runs on a CPU: every implementation gives the loop's outputs and
    gradients, and the choice is part of the saved config."""
    from moekit import load_model, save_model

    reference = SparseMoE(16, 4, 2, hidden=8, experts_implementation="loop", generator=gen)
    layer = SparseMoE(16, 4, 2, hidden=8, experts_implementation=implementation)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 16, generator=gen)
    got, want = layer(x).output, reference(x).output
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), m.experts.w13_EFD)[0]
             for out, m in ((got, layer), (want, reference))]
    torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-5)
    again = load_model(save_model(layer, tmp_path / "layer"))
    assert again.config.experts_implementation == implementation


def test_grouped_mm_where_it_cannot_run_is_refused_with_the_alternatives(gen):
    layer = SparseMoE(6, 4, 2, hidden=5, experts_implementation="grouped_mm",
                      generator=gen).double()
    with pytest.raises(ValueError, match=r"experts_implementation='grouped_mm' cannot run "
                                         r"torch.float64 rows .* use 'auto', 'padded' or 'loop'"):
        layer(torch.randn(3, 6, dtype=F64))


def test_an_unknown_experts_implementation_names_the_parameter():
    with pytest.raises(ValueError, match=r"SparseMoE: experts_implementation must be one of "
                                         r"'auto', 'grouped_mm', 'padded', 'loop'; got "
                                         r"experts_implementation='fast'"):
        SparseMoE(6, 4, 2, experts_implementation="fast")


def test_a_top_k_that_conflicts_with_the_router_config_is_refused():
    with pytest.raises(ValueError, match=r"SparseMoE: top_k=3 conflicts with "
                                         r"router=RouterConfig\(top_k=2"):
        SparseMoE(8, 4, 3, router=RouterConfig(kind="topk", top_k=2))
    agreed = SparseMoE(8, 4, 2, router=RouterConfig(kind="topk", top_k=2))
    assert agreed.config.router.top_k == 2
    assert SparseMoE(8, 4, router="switch").config.router.top_k == 1


def test_expert_banks_take_per_expert_counts(gen):
    layer = SparseMoE(6, 3, 1, hidden=4, generator=gen).double()
    x_MD = torch.randn(5, 6, generator=gen, dtype=F64)
    counts_E = torch.tensor([2, 0, 3])
    y_MD = layer.experts.forward_grouped(x_MD, counts_E)
    rows = [expert_on_row(layer.experts, e, x_MD[m]) for m, e in enumerate([0, 0, 2, 2, 2])]
    torch.testing.assert_close(y_MD, torch.stack(rows))


@pytest.mark.parametrize("router", [RouterConfig(kind="switch"),
                                    RouterConfig(kind="switch", noise="gaussian"),
                                    RouterConfig(kind="topk", top_k=1),
                                    RouterConfig(kind="sigmoid", top_k=1)])
def test_the_top_one_path_passes_gradcheck(gen, router):
    """k = 1 scales the chosen expert by its gate score (Switch), so the output is a smooth function
    of the router's weights and the input between routing changes: finite differences agree."""
    # Training mode only for the noise: it would also move the sigmoid router's load bias.
    layer = SparseMoE(4, 3, hidden=3, router=router, load_balance_weight=0.0,
                      generator=gen).double().train(router.noise != "none")
    x = torch.randn(6, 4, generator=gen, dtype=F64, requires_grad=True)
    w = layer.router.w_DE.detach().clone().requires_grad_(True)

    def output(w_DE, x_ND):
        noise = torch.Generator().manual_seed(0)  # the same noise draw at every evaluation
        return torch.func.functional_call(layer, {"router.w_DE": w_DE}, (x_ND,),
                                          {"generator": noise}).output

    assert torch.autograd.gradcheck(output, (w, x))


def test_check_finite_is_reachable_from_the_layer_and_saved(gen, tmp_path):
    from moekit import load_model, save_model

    layer = SparseMoE(8, 4, 2, hidden=6, check_finite=False, generator=gen)
    assert layer.config.check_finite is False
    assert SparseMoE.from_config(layer.config).config.check_finite is False
    assert load_model(save_model(layer, tmp_path / "layer")).config.check_finite is False
    assert SparseMoE(8, 4, 2).config.check_finite is True
    with pytest.raises(TypeError, match=r"SparseMoE: check_finite must be True or False; "
                                        r"got check_finite='false'"):
        SparseMoE(8, 4, 2, check_finite="false")

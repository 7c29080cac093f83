"""Interventions: ablate, force, temperature; they restore the model; the importance table."""

import math

import pytest
import torch
from torch import nn

from moekit import ExpertConfig, MixtureOfExperts, SparseMoE
from moekit.analysis.importance import expert_importance
from moekit.analysis.interventions import ablate_expert, force_expert, scale_temperature
from moekit.analysis.recorder import record_routing
from moekit.nn.outputs import MoEOutput

F64 = torch.float64


def fixed_gate(probs, out_features=1, generator=None) -> MixtureOfExperts:
    """A mixture whose gate gives the same proportions everywhere: w = 0, b = log p."""
    probs = torch.as_tensor(probs, dtype=F64)
    moe = MixtureOfExperts(2, out_features, len(probs), generator=generator).double()
    with torch.no_grad():
        moe.gate.w_DE.zero_()
        moe.gate.b_E.copy_(probs.log())
    return moe


def test_ablation_renormalises_the_others_worked_example(gen):
    # p = (0.5, 0.3, 0.2); without expert 0: (0, 0.3 / 0.5, 0.2 / 0.5) = (0, 0.6, 0.4).
    moe = fixed_gate([0.5, 0.3, 0.2], generator=gen)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    o = moe.experts(x)  # (N, E, 1)
    with ablate_expert(moe, 0):
        out = moe(x)
    torch.testing.assert_close(out.routing.probs_NE[0], torch.tensor([0, 0.6, 0.4], dtype=F64))
    torch.testing.assert_close(out.output, 0.6 * o[:, 1] + 0.4 * o[:, 2])


def test_interventions_restore_the_model_even_after_an_error(gen):
    moe = MixtureOfExperts(2, 3, 4, generator=gen).double()
    x = torch.randn(8, 2, generator=gen, dtype=F64)
    before = moe(x).output
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ablate_expert(moe, 1):
        raise RuntimeError("boom")
    for manager in (ablate_expert(moe, [0, 2]), force_expert(moe, 3), scale_temperature(moe, 3.0)):
        with manager:
            assert not torch.equal(moe(x).output, before)
    assert torch.equal(moe(x).output, before)
    assert not moe._forward_hooks and not moe.gate._forward_hooks
    for k, v in moe.state_dict().items():
        assert torch.equal(v, state[k])


def test_ablating_a_dead_expert_changes_nothing(gen):
    # Expert 2's gate bias is -1e4: p_2 = exp(-1e4) = 0 exactly in float64, so it is dead.
    moe = MixtureOfExperts(2, 3, 4, expert=ExpertConfig(head="softmax"), generator=gen).double()
    with torch.no_grad():
        moe.gate.b_E[2] = -1e4
    x = torch.randn(200, 2, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (200,), generator=gen)
    with ablate_expert(moe, 2):
        ablated = moe(x).output
    # Equal up to the rounding of p / sum(p), where sum(p) is 1 to the last bit or two.
    torch.testing.assert_close(ablated, moe(x).output, rtol=1e-14, atol=0)
    table = expert_importance(moe, x, y)
    dead = table.rows[2]
    assert dead.load == 0.0 and dead.ablated_change == 0.0 and dead.output_change < 1e-14
    assert any(r.output_change > 0 for r in table.rows if r.expert != 2)


def test_ablating_an_expert_the_router_never_picks_changes_nothing(gen):
    moe = SparseMoE(4, 4, 2, hidden=8, router="topk", experts="mlp", generator=gen).eval()
    with torch.no_grad():
        moe.router.w_DE[:, 3] = -50.0  # positive inputs: expert 3's logit is always the lowest
    x = torch.rand(50, 4, generator=gen)
    assert not (moe(x).routing.experts_NK == 3).any()
    with ablate_expert(moe, 3):
        ablated = moe(x).output
    torch.testing.assert_close(ablated, moe(x).output, rtol=0, atol=0)


def test_routed_ablation_chooses_again_among_the_rest(gen):
    moe = SparseMoE(6, 5, 2, hidden=8, router="topk", experts="mlp", generator=gen).eval()
    x = torch.randn(40, 6, generator=gen)
    logits = moe(x).routing.logits_NE
    with ablate_expert(moe, 1):
        out = moe(x)
    assert not (out.dispatch.experts_M == 1).any()
    masked = logits.masked_fill(torch.arange(5) == 1, -math.inf)
    top, experts = masked.topk(2, dim=-1)
    torch.testing.assert_close(out.routing.experts_NK, experts)
    torch.testing.assert_close(out.routing.weights_NK, torch.softmax(top, -1))


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "sigmoid"])
def test_every_router_supports_every_intervention(gen, router):
    top_k = None if router == "switch" else 2
    moe = SparseMoE(6, 4, top_k, hidden=8, router=router, experts="mlp", generator=gen).eval()
    x = torch.randn(30, 6, generator=gen)
    with ablate_expert(moe, 0):
        assert not (moe(x).dispatch.experts_M == 0).any()
    with force_expert(moe, 2):
        assert moe(x).dispatch.counts_E.tolist() == [0, 0, 30, 0]
    with scale_temperature(moe, 0.5):
        assert moe(x).output.shape == x.shape


def test_force_expert_on_selected_rows(gen):
    moe = MixtureOfExperts(2, 2, 3, generator=gen).double()
    x = torch.randn(10, 2, generator=gen, dtype=F64)
    base = moe(x).output
    with force_expert(moe, 1, where=lambda x_ND: x_ND[:, 0] > 0):
        out = moe(x).output
    right = x[:, 0] > 0
    torch.testing.assert_close(out[right], moe.experts(x)[right, 1])
    torch.testing.assert_close(out[~right], base[~right])


def test_temperature_divides_the_gate_logits(gen):
    moe = MixtureOfExperts(2, 1, 3, generator=gen).double()
    x = torch.randn(7, 2, generator=gen, dtype=F64)
    logits = moe(x).routing.logits_NE
    with scale_temperature(moe, 4.0):
        probs = moe(x).routing.probs_NE
    torch.testing.assert_close(probs, torch.softmax(logits / 4.0, -1))
    topk = SparseMoE(4, 4, 2, hidden=8, experts="mlp", generator=gen).eval()
    xs = torch.randn(9, 4, generator=gen)
    routing = topk(xs).routing
    with scale_temperature(topk, 2.0):
        scaled = topk(xs).routing
    assert torch.equal(scaled.experts_NK, routing.experts_NK)  # the ranking is unchanged
    top = routing.logits_NE.gather(-1, routing.experts_NK)
    torch.testing.assert_close(scaled.weights_NK, torch.softmax(top / 2.0, -1))


class TreeLike(nn.Module):
    """Not a moekit layer: any module returning a MoEOutput with every expert's output (as a
    hierarchical mixture does) can be intervened on."""

    def __init__(self, inner: MixtureOfExperts) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return MoEOutput(out.output, out.routing, out.aux_loss,
                         expert_outputs=out.expert_outputs, expert_logits=out.expert_logits)


def test_any_module_returning_moe_output_works(gen):
    tree = TreeLike(fixed_gate([0.25, 0.75], generator=gen))
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    with ablate_expert(tree, 1):
        out = tree(x)
    torch.testing.assert_close(out.output, tree.inner.experts(x)[:, 0])


def test_a_module_without_expert_outputs_is_refused(gen):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = fixed_gate([0.5, 0.5], generator=gen)

        def forward(self, x):
            out = self.moe(x)
            return MoEOutput(out.output, out.routing, out.aux_loss)

    layer = Opaque()
    with (pytest.raises(TypeError, match="must return a MoEOutput with every expert's output"),
          ablate_expert(layer, 0)):
        layer(torch.randn(2, 2, dtype=F64))


def test_importance_table_ranks_the_expert_that_matters(gen):
    # Expert 0 outputs (5 x0, -5 x0): class 0 where x0 > 0, which is the truth; expert 1 outputs
    # the opposite. The gate weighs them 0.9 / 0.1, so the blend (4 x0, -4 x0) is always right.
    moe = fixed_gate([0.9, 0.1], out_features=2, generator=gen)
    with torch.no_grad():
        moe.experts.w_EDO.zero_()
        moe.experts.w_EDO[0, 0, 0], moe.experts.w_EDO[0, 0, 1] = 5.0, -5.0
        moe.experts.w_EDO[1, 0, 0], moe.experts.w_EDO[1, 0, 1] = -5.0, 5.0
        moe.experts.b_EO.zero_()
    x = torch.randn(100, 2, generator=gen, dtype=F64)
    y = (x[:, 0] < 0).long()  # class 0 where x0 > 0: what expert 0 says
    table = expert_importance(moe, x, y, temperatures=(0.5, 100.0))
    assert table.metric == "accuracy" and table.higher_is_better and table.baseline == 1.0
    assert table.rows[0].ablated == 0.0 and table.rows[1].ablated == 1.0
    assert table.rows[0].forced == 1.0 and table.rows[1].forced == 0.0
    assert [t["temperature"] for t in table.temperatures] == [0.5, 100.0]
    regression = expert_importance(moe, x, torch.randn(100, 2, generator=gen, dtype=F64))
    assert regression.metric == "mse" and not regression.higher_is_better
    assert expert_importance(moe, x).metric == "output_mse"
    assert table.to_dict()["experts"][0]["expert"] == 0


@pytest.mark.parametrize("call, error, message", [
    (lambda m: ablate_expert(m, 5), ValueError,
     r"ablate_expert: experts must lie in \[0, 3\); got expert=5"),
    (lambda m: ablate_expert(m, [0, 1, 2]), ValueError, r"cannot remove every expert"),
    (lambda m: force_expert(m, 3), ValueError, r"force_expert: expert must lie in \[0, 3\)"),
    (lambda m: scale_temperature(m, 0.0), ValueError,
     r"scale_temperature: temperature must be a finite number > 0; got temperature=0.0"),
])
def test_bad_interventions_are_named(gen, call, error, message):
    moe = MixtureOfExperts(2, 1, 3, generator=gen)
    with pytest.raises(error, match=message), call(moe):
        moe(torch.randn(2, 2))


def test_routed_ablation_leaving_fewer_than_k_is_refused(gen):
    moe = SparseMoE(4, 3, 2, hidden=4, generator=gen).eval()
    with (pytest.raises(ValueError, match=r"top_k=2 experts per row cannot be chosen from the 1"),
          ablate_expert(moe, [0, 1])):
        moe(torch.randn(2, 4))


def test_bad_metric_is_named(gen):
    moe = MixtureOfExperts(2, 1, 2, generator=gen)
    with pytest.raises(ValueError, match=r"metric must be one of 'accuracy', 'mse', 'auto' or a "
                                         r"function; got metric='f1'"):
        expert_importance(moe, torch.randn(3, 2), torch.zeros(3, 1), "f1")
    with pytest.raises(ValueError, match=r"metric='accuracy' needs class-index targets"):
        expert_importance(moe, torch.randn(3, 2), torch.zeros(3, 1), "accuracy")


def test_a_known_load_saves_the_passes_that_measure_it(gen):
    moe = MixtureOfExperts(2, 3, 4, generator=gen).double()
    x = torch.randn(50, 2, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (50,), generator=gen)
    calls = []
    moe.register_forward_hook(lambda *args: calls.append(1))
    measured = expert_importance(moe, x, y, batch_size=20)
    n_measured = len(calls)
    load_E = record_routing(moe, x, batch_size=20).stats.load_E  # as analyze records it
    calls.clear()
    given = expert_importance(moe, x, y, batch_size=20, load_E=load_E)
    assert given.to_dict() == measured.to_dict()
    assert len(calls) == n_measured - 3  # the 3 batches that record the load

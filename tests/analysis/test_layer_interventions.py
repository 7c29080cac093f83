"""Interventions at LM scale: ablating a dead expert changes nothing, the ablation table agrees with
single ablations, steering moves tokens, risk differences against a per-token loop, and replay
reproduces the recorded routing and logits with gradients reaching the routers."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from moekit.analysis.layer_interventions import (
    ablate_layer_experts,
    ablation_table,
    expert_masks,
    expert_offsets,
    intervention_effect,
    steer_layer_experts,
    validation_stream,
)
from moekit.analysis.layer_recorder import record_layers
from moekit.analysis.layer_replay import forced_indices, replay_layers
from moekit.analysis.layer_risk import risk_difference
from moekit.nn.lm import LMConfig, MoETransformerLM

NAMES = ["a", "b", "c"]


@pytest.fixture
def batches(gen):
    """Two batches (x_BT, y_BT, category_BT) of 3 x 8 tokens."""
    out = []
    for _ in range(2):
        data = torch.randint(0, 256, (3, 9), generator=gen)
        out.append((data[:, :-1], data[:, 1:], torch.randint(0, 3, (3, 8), generator=gen)))
    return out


def reference_bpb_C(model, batches, **controls):
    """Bits per byte per category, the slow way: every token's -log2 p(y) in a Python loop."""
    bits = {c: [] for c in range(len(NAMES))}
    with torch.no_grad():
        for x, y, cat in batches:
            logp_BTV = torch.log_softmax(model(x, **controls).logits_BTV.double(), -1)
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    bits[int(cat[b, t])].append(-float(logp_BTV[b, t, y[b, t]]) / math.log(2))
    return np.array([np.mean(bits[c]) for c in range(len(NAMES))])


# --- ablation -------------------------------------------------------------------------------------


def test_ablating_a_dead_expert_changes_nothing(lm, batches):
    # steer expert 1 of layer 0 away (-1e4 on its logit): no token routes to it, so removing it
    # from the choice leaves every token's experts and weights, hence the logits, bit for bit
    away = expert_offsets(lm, {0: {1: -1e4}})
    x = batches[0][0]
    with torch.no_grad():
        steered = lm(x, router_logit_offsets=away)
        ablated = lm(x, router_logit_offsets=away, keep_experts=expert_masks(lm, {0: [1]}))
    assert not (steered.moe_outputs[0].routing.experts_NK == 1).any()
    assert torch.equal(steered.logits_BTV, ablated.logits_BTV)
    table = ablation_table(lm, batches, router_logit_offsets=away, category_names=NAMES)
    assert table.share_LE[0, 1] == 0.0
    assert (table.delta_bpb_LEC[0, 1] == 0.0).all() and table.delta_bpb_LE[0, 1] == 0.0


def test_ablation_table_agrees_with_single_ablations_and_a_slow_reference(lm, batches):
    table = ablation_table(lm, batches, category_names=NAMES)
    assert table.delta_bpb_LEC.shape == (2, 4, 3) and table.n_tokens == 48
    np.testing.assert_allclose(table.baseline_bpb_C, reference_bpb_C(lm, batches), rtol=1e-6)
    effect = ablate_layer_experts(lm, batches, {1: [2]}, category_names=NAMES)
    np.testing.assert_allclose(table.delta_bpb_LEC[1, 2], effect.delta_bpb_C, rtol=0, atol=1e-12)
    slow = reference_bpb_C(lm, batches, keep_experts=expert_masks(lm, {1: [2]}))
    np.testing.assert_allclose(effect.bpb_C, slow, rtol=1e-6)
    assert (table.share_LE > 0).all()  # every expert is live here, so each ablation moves bpb
    assert (table.delta_bpb_LE != 0).all()
    best = table.ranked(1)[0]
    assert best["delta_bpb"] == table.delta_bpb_LE.max()
    assert set(best) == {"layer", "expert", "delta_bpb", "share", "worst_category",
                         "worst_delta_bpb"}
    assert table.to_dict()["category_names"] == NAMES


def test_max_tokens_caps_the_stream_and_a_cut_window_scores_as_in_the_whole(lm, batches):
    stream = validation_stream(batches, 30)  # 3 windows of 8, then 6 positions of a fourth
    assert [tuple(x.shape) for x, _, _ in stream] == [(3, 8), (1, 6)]
    with torch.no_grad():
        whole = lm(batches[1][0]).logits_BTV
        cut = lm(stream[1][0]).logits_BTV
    torch.testing.assert_close(cut[0], whole[0, :6], rtol=1e-5, atol=1e-6)
    table = ablation_table(lm, batches, layers=[1], max_tokens=30, category_names=NAMES)
    assert table.n_tokens == 30 and table.delta_bpb_LE.shape == (1, 4) and table.max_tokens == 30


def test_batches_without_categories_are_one_category(lm, batches):
    effect = ablate_layer_experts(lm, [(x, y) for x, y, _ in batches], {0: [0, 3]})
    assert effect.category_names == ["all"] and effect.tokens_C.tolist() == [48]
    assert effect.delta_bpb_C[0] == pytest.approx(effect.delta_bpb, abs=1e-12)


# --- steering -------------------------------------------------------------------------------------


def test_steering_moves_the_tokens_to_and_away_from_an_expert(lm, batches):
    toward = steer_layer_experts(lm, batches, {1: {2: 1e4}}, category_names=NAMES)
    assert toward.share_LE[1, 2] == 1.0 and toward.baseline_share_LE[1, 2] < 1.0
    np.testing.assert_array_equal(toward.share_LE[0], toward.baseline_share_LE[0])  # layer 0 alone
    np.testing.assert_allclose(toward.share_LE.sum(1), [2.0, 2.0])  # K = 2 experts per token
    away = steer_layer_experts(lm, batches, {1: {2: -1e4}}, category_names=NAMES)
    assert away.share_LE[1, 2] == 0.0
    slow = reference_bpb_C(lm, batches, router_logit_offsets=expert_offsets(lm, {1: {2: 1e4}}))
    np.testing.assert_allclose(toward.bpb_C, slow, rtol=1e-6)
    np.testing.assert_allclose(toward.delta_bpb_C, toward.bpb_C - toward.baseline_bpb_C)
    assert toward.to_dict()["n_tokens"] == 48


# --- risk difference ------------------------------------------------------------------------------


def test_risk_difference_against_a_per_token_loop(gen):
    rng = np.random.default_rng(0)
    n_tokens, n_layers, n_experts = 200, 3, 5
    indices_TLK = np.argsort(rng.random((n_tokens, n_layers, n_experts)), -1)[:, :, :2]
    in_a = rng.random(n_tokens) < 0.3
    indices_TLK[in_a, 2, 0] = 4  # layer 2: tokens of A always take expert 4 first
    indices_TLK[in_a, 2, 1] = np.where(indices_TLK[in_a, 2, 1] == 4, 0, indices_TLK[in_a, 2, 1])
    rd = risk_difference(indices_TLK, in_a, n_experts=n_experts, chunk_tokens=17)
    for layer in range(n_layers):
        for e in range(n_experts):
            fired = np.array([e in indices_TLK[t, layer] for t in range(n_tokens)])
            assert rd.count_a_LE[layer, e] == fired[in_a].sum()
            assert rd.rd_LE[layer, e] == pytest.approx(fired[in_a].mean() - fired[~in_a].mean())
    top = rd.ranked(1)[0]
    assert (top["layer"], top["expert"], top["rate_a"]) == (2, 4, 1.0)
    assert rd.ranked(toward="b")[0]["risk_difference"] == rd.rd_LE.min()
    first = risk_difference(indices_TLK, in_a, ~in_a, n_experts=n_experts, rank="first")
    assert first.rate_a_LE[2, 4] == 1.0 and first.rate_a_LE.sum(1).tolist() == [1.0] * 3


def test_risk_difference_of_a_recorded_category(lm, batches):
    rec = record_layers(lm, batches)
    rd = risk_difference(rec.indices_TLK, rec.categories_T == 1, n_experts=rec.n_experts)
    assert rd.n_a + rd.n_b == 48 and rd.n_a == int((rec.categories_T == 1).sum())
    assert len(rd.ranked()) == 8 and rd.to_dict()["rank"] == "any"


def test_risk_difference_errors_name_the_parameter():
    indices_TLK = np.zeros((4, 1, 1), dtype=np.int64)
    with pytest.raises(ValueError, match=r"in_a_T must be a bool array .* shape \(4,\)"):
        risk_difference(indices_TLK, np.ones(3, bool), n_experts=2)
    with pytest.raises(ValueError, match="both sets need tokens; got 4 in A and 0 in B"):
        risk_difference(indices_TLK, np.ones(4, bool), n_experts=2)
    with pytest.raises(ValueError, match="rank must be one of 'any', 'first'"):
        risk_difference(indices_TLK, np.eye(4, dtype=bool)[0], n_experts=2, rank="top")


# --- replay ---------------------------------------------------------------------------------------


def test_replay_reproduces_the_recorded_routing_and_logits_and_trains_the_routers(lm, batches):
    x, y, _ = batches[0]
    rec = record_layers(lm, [x])
    with torch.no_grad():
        direct = lm(x)
    replayed = replay_layers(lm, x, rec.indices_TLK)
    assert torch.equal(replayed.logits_BTV, direct.logits_BTV)
    for layer, out in enumerate(replayed.moe_outputs):
        np.testing.assert_array_equal(out.routing.experts_NK, rec.indices_TLK[:, layer])
        np.testing.assert_array_equal(out.routing.weights_NK.detach(), rec.weights_TLK[:, layer])
    F.cross_entropy(replayed.logits_BTV.reshape(-1, 256), y.reshape(-1)).backward()
    for block in lm.blocks:
        grad = block.ffn.router.w_DE.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_replaying_other_experts_routes_to_them(lm, batches):
    x = batches[0][0]
    rec = record_layers(lm, [x])
    other = (rec.indices_TLK.astype(np.int64) + 1) % 4  # every token's experts shifted by one
    with torch.no_grad():
        out = replay_layers(lm, x, other)
    for layer, moe_out in enumerate(out.moe_outputs):
        np.testing.assert_array_equal(moe_out.routing.experts_NK, other[:, layer])
    assert not torch.equal(out.logits_BTV, lm(x).logits_BTV)


# --- errors ---------------------------------------------------------------------------------------


def test_errors_name_the_parameter_and_the_fix(lm, batches, gen):
    dense = MoETransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2, ffn="dense",
                                      expert_hidden=16), generator=gen)
    with pytest.raises(TypeError, match=r"model must be a MoETransformerLM with ffn='moe' "
                                        r"\(.*\); got MoETransformerLM with ffn='dense'"):
        intervention_effect(dense, batches)
    with pytest.raises(ValueError, match="would keep 1 experts, fewer than top_k=2"):
        expert_masks(lm, {0: [0, 1, 2]})
    with pytest.raises(ValueError, match=r"experts must be indices in \[0, n_experts=4\)"):
        expert_masks(lm, {0: [4]})
    with pytest.raises(ValueError, match=r"layers must be indices in \[0, n_layers=2\)"):
        expert_offsets(lm, {2: {0: 1.0}})
    with pytest.raises(ValueError, match=r"offsets must be numbers; got offsets\[0\]\[1\]=nan"):
        expert_offsets(lm, {0: {1: float("nan")}})
    with pytest.raises(ValueError, match=r"indices_NLK must have shape \(N=24, L=2, K\)"):
        replay_layers(lm, batches[0][0], np.zeros((23, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"indices_NLK must have shape \(N, L, K\)"):
        forced_indices(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="category_names has 2 names"):
        intervention_effect(lm, batches, category_names=["a", "b"])
    with pytest.raises(TypeError, match=r"each batch must be a tuple \(x_BT, y_BT"):
        validation_stream([batches[0][0]])

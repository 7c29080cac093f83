"""The byte-level MoE transformer: shapes, causality, costs, the routing record, the routing
controls (steering, ablation, replay), save/load, a tiny overfit, float64 references for a block."""

import dataclasses
import json
import math
import time

import pytest
import torch

from moekit import load_model, save_model
from moekit.nn.attention import CausalSelfAttention, rotary
from moekit.nn.lm import Block, LMConfig, MoETransformerLM, cross_entropy
from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE

F64 = torch.float64
TINY = LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, n_experts=4, expert_hidden=16)


def tiny(gen, **changes):
    return MoETransformerLM(dataclasses.replace(TINY, **changes), generator=gen).eval()


def byte_batch(gen, batch=2, positions=12):
    return torch.randint(0, 256, (batch, positions), generator=gen)


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_shapes_and_the_record(gen, ffn):
    model = tiny(gen, ffn=ffn)
    out = model(byte_batch(gen, 3, 7))
    assert out.logits_BTV.shape == (3, 7, 256)
    assert out.aux_loss.shape == ()
    if ffn == "dense":
        assert out.moe_outputs == [] and float(out.aux_loss) == 0.0
    else:
        assert len(out.moe_outputs) == 2
        assert [o.routing.experts_NK.shape for o in out.moe_outputs] == [(21, 2)] * 2
        torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in out.moe_outputs))


@pytest.mark.parametrize("ffn, positions", [("moe", "rope"), ("moe", "learned"),
                                            ("dense", "rope")])
def test_changing_byte_t_changes_no_logit_before_t(gen, ffn, positions):
    model = tiny(gen, ffn=ffn, positions=positions)
    x = byte_batch(gen, 2, 16)
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(x), model(changed)
    torch.testing.assert_close(after.logits_BTV[:, :9], before.logits_BTV[:, :9], rtol=0,
                               atol=1e-6)
    assert not torch.allclose(after.logits_BTV[:, 9:], before.logits_BTV[:, 9:])
    for b, a in zip(before.moe_outputs, after.moe_outputs, strict=True):  # rows b * 16 + t
        rows = torch.arange(32).reshape(2, 16)[:, :9].flatten()
        assert torch.equal(a.routing.experts_NK[rows], b.routing.experts_NK[rows])


def test_costs_worked_example():
    # D = 32, 2 layers, E = 4, K = 2, expert hidden 16, V = 256, tied head.
    # One SwiGLU expert: 3 * 32 * 16 = 1536. Attention 4 * 32^2 = 4096. Router 32 * 4 = 128.
    # Matmul entries a token uses: 2 * (4096 + 128 + 2 * 1536) + 256 * 32 = 22784 -> 45568 FLOPs.
    # Total: 256 * 32 + 32 (final norm) + 2 * (4096 + 64 + 128 + 4 * 1536) = 29088.
    moe = TINY.costs(seq_len=64)
    assert (moe.matmul_flops, moe.total_params) == (45568, 29088)
    assert moe.active_params == 29088 - 2 * 2 * 1536
    assert moe.router_flops == 2 * 2 * 128 and moe.ffn_flops == 2 * 2 * 2 * 3 * 32 * 16
    assert moe.attention_flops == 2 * 4 * 32 * 65 / 2
    assert moe.flops_per_token == moe.matmul_flops + moe.attention_flops


def _matmul_entries(model):
    """Weight-matrix entries one token multiplies by, read from the model: attention, router, the
    K / E share of the expert bank, shared experts or the dense MLP, the output head."""
    c, total = model.config, 0
    for block in model.blocks:
        total += sum(p.numel() for p in block.attn.parameters())
        if isinstance(block.ffn, SparseMoE):
            total += block.ffn.router.w_DE.numel()
            total += sum(p.numel() for p in block.ffn.experts.parameters()) * c.top_k // c.n_experts
            if block.ffn.shared is not None:
                total += sum(p.numel() for p in block.ffn.shared.parameters())
        else:
            total += sum(p.numel() for p in block.ffn.parameters())
    return total + model.tok_emb_VD.numel()  # the head: tied or not, V x D


@pytest.mark.parametrize("changes", [{}, {"n_shared": 1}, {"tie_embeddings": False},
                                     {"positions": "learned", "router": RouterConfig(top_k=3)}])
def test_the_dense_twin_has_the_moes_active_flops(changes):
    moe_config = dataclasses.replace(TINY, **changes)
    dense_config = dataclasses.replace(moe_config, ffn="dense")
    moe, dense = moe_config.costs(), dense_config.costs()
    assert dense_config.dense_hidden == (moe_config.top_k + moe_config.n_shared) * 16
    assert moe.ffn_flops == dense.ffn_flops and moe.attention_flops == dense.attention_flops
    assert moe.matmul_flops == dense.matmul_flops + moe.router_flops
    assert moe.active_params == dense.active_params + moe.router_params
    assert dense.router_flops == dense.router_params == 0
    assert dense.active_params == dense.total_params
    for config, costs in ((moe_config, moe), (dense_config, dense)):  # the model agrees
        with torch.device("meta"):
            model = MoETransformerLM(config)
        assert sum(p.numel() for p in model.parameters()) == costs.total_params
        assert 2 * _matmul_entries(model) == costs.matmul_flops


def test_each_moe_output_is_its_layers_own_forward_on_tokens_in_b_t_order(gen):
    model = tiny(gen)
    inputs = []
    hooks = [b.ffn.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
             for b in model.blocks]
    x = byte_batch(gen, 2, 10)
    out = model(x)
    for h in hooks:
        h.remove()
    for block, h_BTD, recorded in zip(model.blocks, inputs, out.moe_outputs, strict=True):
        again = block.ffn(h_BTD).routing
        for name in ("experts_NK", "weights_NK", "probs_NE", "logits_NE"):
            assert torch.equal(getattr(recorded.routing, name), getattr(again, name))
    alone = model(x[1:])  # sequence 1 alone: its tokens are rows 10..19 of the batch's routing
    for both, one in zip(out.moe_outputs, alone.moe_outputs, strict=True):
        assert torch.equal(both.routing.experts_NK[10:], one.routing.experts_NK)


def test_steering_offsets_route_tokens_to_the_chosen_expert(gen):
    model = tiny(gen)
    x = byte_batch(gen, 2, 16)
    plain = model(x)
    offset = torch.zeros(4)
    offset[3] = 0.05
    nudged = model(x, router_logit_offsets={1: offset})
    offset[3] = 20.0
    forced = model(x, router_logit_offsets={1: offset})

    def share(out, layer):
        return (out.moe_outputs[layer].routing.experts_NK == 3).any(-1).float().mean()

    assert share(nudged, 1) >= share(plain, 1) and share(forced, 1) == 1.0
    assert torch.equal(forced.moe_outputs[0].routing.experts_NK,
                       plain.moe_outputs[0].routing.experts_NK)  # layer 0 is not steered


def test_a_keep_mask_means_no_token_routes_to_the_removed_expert(gen):
    model = tiny(gen)
    x = byte_batch(gen, 2, 16)
    plain = model(x)
    popular = int(torch.bincount(plain.moe_outputs[0].routing.experts_NK.flatten()).argmax())
    keep = torch.ones(4, dtype=torch.bool)
    keep[popular] = False
    out = model(x, keep_experts={0: keep})
    assert not (out.moe_outputs[0].routing.experts_NK == popular).any()
    assert out.moe_outputs[0].dispatch.counts_E[popular] == 0
    assert not torch.equal(out.logits_BTV, plain.logits_BTV)


@pytest.mark.parametrize("router", [RouterConfig(kind="topk", top_k=2),
                                    RouterConfig(kind="switch"),
                                    RouterConfig(kind="sigmoid", top_k=2)])
def test_replay_reproduces_the_logits_and_trains_the_router(gen, router):
    model = tiny(gen, router=router)
    x = byte_batch(gen, 2, 12)
    recorded = model(x)
    forced = {layer: o.routing.experts_NK for layer, o in enumerate(recorded.moe_outputs)}
    replayed = model(x, forced_indices=forced)
    assert torch.equal(replayed.logits_BTV, recorded.logits_BTV)
    replayed.logits_BTV.square().mean().backward()
    for block in model.blocks:
        assert block.ffn.router.w_DE.grad.abs().sum() > 0
    other = {0: (forced[0] + 1) % 4}  # another routing gives other logits
    assert not torch.allclose(model(x, forced_indices=other).logits_BTV, recorded.logits_BTV)


def test_replay_weights_are_the_live_probabilities_renormalised_over_the_forced_experts(gen):
    model = tiny(gen)
    x = byte_batch(gen, 1, 6)
    forced_NK = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [0, 1], [2, 3]])
    routing = model(x, forced_indices={1: forced_NK}).moe_outputs[1].routing
    chosen_NK = routing.probs_NE.gather(-1, forced_NK)
    torch.testing.assert_close(routing.weights_NK, chosen_NK / chosen_NK.sum(-1, keepdim=True))
    assert torch.equal(routing.experts_NK, forced_NK)


def test_replay_is_refused_under_expert_choice_and_with_a_keep_mask(gen):
    layer = SparseMoE(8, 4, hidden=4, router=RouterConfig(kind="expert_choice"), generator=gen)
    with pytest.raises(ValueError, match="forced_experts_NK replays token-choice routing"):
        layer(torch.randn(5, 8, generator=gen), forced_experts_NK=torch.zeros(5, 2).long())
    layer = SparseMoE(8, 4, 2, hidden=4, generator=gen)
    with pytest.raises(ValueError, match=r"got keep_E too\. Pass one of them"):
        layer(torch.randn(5, 8), forced_experts_NK=torch.zeros(5, 2).long(),
              keep_E=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_offset_E": torch.zeros(3)}, (r"logit_offset_E must be a floating tensor of shape "
                                         r"\(n_experts,\) = \(4,\); got torch.float32 of shape")),
    ({"keep_E": torch.ones(4)}, r"keep_E must be a bool tensor"),
    ({"forced_experts_NK": torch.zeros(4, 2).long()}, r"shape \(N, K\) = \(5, K\)"),
    ({"forced_experts_NK": torch.full((5, 2), 4)}, r"experts in \[0, 4\); got values from 4 to 4"),
])
def test_bad_routing_controls_are_refused_by_the_layer(gen, kwargs, match):
    layer = SparseMoE(8, 4, 2, hidden=4, generator=gen)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(5, 8, generator=gen), **kwargs)


def test_routing_controls_are_refused_where_they_cannot_apply(gen):
    x = byte_batch(gen, 1, 4)
    with pytest.raises(ValueError, match=r"keep_experts steers routers, and this model has none"):
        tiny(gen, ffn="dense")(x, keep_experts={0: torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"router_logit_offsets keys must be layer indices in "
                                         r"\[0, n_layers=2\); got 2"):
        tiny(gen)(x, router_logit_offsets={2: torch.zeros(4)})


def test_save_load_gives_identical_logits_and_keeps_the_nested_router(gen, tmp_path):
    config = dataclasses.replace(TINY, router=RouterConfig(kind="switch", noise="jitter"),
                                 capacity_factor=1.5, positions="learned", tie_embeddings=False,
                                 n_shared=1)
    model = MoETransformerLM(config, generator=gen).eval()
    folder = save_model(model, tmp_path / "lm")
    saved = json.loads((folder / "config.json").read_text())["config"]
    assert saved["router"]["kind"] == "switch" and saved["capacity_factor"] == 1.5
    loaded = load_model(folder)
    assert loaded.config == config and isinstance(loaded.config.router, RouterConfig)
    x = byte_batch(gen, 2, 9)
    assert torch.equal(loaded(x).logits_BTV, model(x).logits_BTV)


def test_weights_follow_the_scheme_and_come_from_the_generator_alone(gen):
    rng = torch.get_rng_state()
    config = dataclasses.replace(TINY, d_model=64, n_layers=4, expert_hidden=64)
    a = MoETransformerLM(config, generator=torch.Generator().manual_seed(5))
    b = MoETransformerLM(config, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    block = a.blocks[0]
    # 0.02 for matrices; 0.02 / sqrt(2 * 4) = 0.00707 for the residual output projections
    assert block.attn.w_qkv_FD.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.w_out_DD.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert block.ffn.experts.w2_EOH.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(64))


def test_loss_is_the_cross_entropy_in_nats_and_bits():
    logits = torch.zeros(2, 3, 256)  # uniform: ln 256 nats, 8 bits per byte
    ce = cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert float(ce) == pytest.approx(math.log(256))
    with pytest.raises(ValueError, match=r"y_BT must have the logits' \(B, T\) shape \(2, 3\)"):
        cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))


def test_a_tiny_model_overfits_64_bytes(gen):
    text = b"The quick brown fox jumps over the lazy dog; pack my box with 5 j"
    data = torch.tensor(list(text[:64]))
    x, y = data[None, :-1], data[None, 1:]
    model = tiny(gen, router=RouterConfig(kind="topk", top_k=2)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    first = model.loss(x, y)
    for _ in range(150):
        result = model.loss(x, y)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    assert first.bits_per_byte == pytest.approx(8.0, abs=0.1)  # near-uniform at the start
    assert result.bits_per_byte < 0.8  # < 10% of uniform's 8 bits
    assert time.perf_counter() - start < 10


def reference_attention(attn, h_BTD):
    """Slow and obvious: rotary as complex multiplication of (i, i + A/2) pairs by e^(i t w_i),
    then for each position a softmax over the positions before it."""
    n_batch, n_pos, d = h_BTD.shape
    heads, a = attn.n_heads, d // attn.n_heads
    qkv = h_BTD @ attn.w_qkv_FD.T
    q, k, v = (t.reshape(n_batch, n_pos, heads, a) for t in qkv.chunk(3, -1))
    freq = 10000.0 ** (-torch.arange(0, a, 2, dtype=F64) / a)
    turn = torch.polar(torch.ones(n_pos, a // 2, dtype=F64), torch.arange(n_pos)[:, None] * freq)

    def rotate(t):
        z = torch.complex(t[..., : a // 2], t[..., a // 2 :]) * turn[:, None]
        return torch.cat([z.real, z.imag], -1)

    q, k = rotate(q), rotate(k)
    rows = []
    for t in range(n_pos):
        scores = torch.einsum("bha,bsha->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(a)
        rows.append(torch.einsum("bhs,bsha->bha", scores.softmax(-1), v[:, : t + 1]))
    return torch.stack(rows, 1).reshape(n_batch, n_pos, d) @ attn.w_out_DD.T


def test_attention_matches_the_slow_reference_with_gradients(gen):
    attn = CausalSelfAttention(12, 3).double()
    h = torch.randn(2, 7, 12, generator=gen, dtype=F64, requires_grad=True)
    fast, slow = attn(h), reference_attention(attn, h)
    torch.testing.assert_close(fast, slow)
    probe = torch.randn_like(fast)
    for gf, gs in zip(torch.autograd.grad((fast * probe).sum(), [h, *attn.parameters()]),
                      torch.autograd.grad((slow * probe).sum(), [h, *attn.parameters()]),
                      strict=True):
        torch.testing.assert_close(gf, gs)


def test_rotary_scores_depend_on_the_offset_only(gen):
    q, k = torch.randn(2, 1, 1, 8, generator=gen, dtype=F64).unbind(0)
    at = [rotary(t.expand(1, 1, 9, 8)) for t in (q, k)]
    score = (at[0][0, 0, :, None] * at[1][0, 0, None]).sum(-1)  # score[t, s]
    torch.testing.assert_close(score[5, 2], score[3, 0])
    torch.testing.assert_close(score[8, 8], score[0, 0])


def test_one_block_passes_float64_gradcheck(gen):
    block = Block(dataclasses.replace(TINY, d_model=8, n_heads=2, expert_hidden=4),
                  generator=gen).double()
    h = torch.randn(1, 4, 8, generator=gen, dtype=F64, requires_grad=True)
    w = block.ffn.router.w_DE.detach().clone().requires_grad_(True)

    def output(w_DE, h_BTD):
        return torch.func.functional_call(block, {"ffn.router.w_DE": w_DE}, (h_BTD,))[0]

    assert torch.autograd.gradcheck(output, (w, h))


@pytest.mark.parametrize("changes, match", [
    ({"n_heads": 3}, (r"LMConfig: d_model must be a multiple of n_heads; got d_model=32, "
                     r"n_heads=3")),
    ({"n_heads": 32}, (r"positions='rope' rotates pairs of features, so the head size .* must be "
                      r"even; got d_model=32, n_heads=32 \(head size 1\)")),
    ({"router": RouterConfig(top_k=2), "n_experts": 1},
     r"router.top_k must be in \[1, n_experts=1\]; got router.top_k=2"),
    ({"ffn": "mlp"}, r"LMConfig: ffn must be one of 'moe', 'dense'; got ffn='mlp'"),
    ({"positions": "alibi"}, r"positions must be one of 'rope', 'learned'"),
    ({"load_balance_weight": -1.0}, (r"load_balance_weight must be a finite number >= 0; got "
                                    r"load_balance_weight=-1.0")),
    ({"d_model": 0}, r"LMConfig: d_model must be an integer >= 1; got d_model=0"),
])
def test_bad_configs_name_the_field_and_the_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("x, match", [
    (torch.zeros(2, 3), r"x_BT must be a long tensor of byte ids"),
    (torch.zeros(2, 65, dtype=torch.long), (r"x_BT has 65 positions; the model takes 1 to "
                                           r"max_seq_len=64")),
    (torch.full((1, 3), 256), r"ids in \[0, vocab_size=256\); got values from 256 to 256"),
])
def test_bad_inputs_are_refused(gen, x, match):
    with pytest.raises(ValueError, match=match):
        tiny(gen)(x)

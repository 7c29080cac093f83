"""Weights from and to transformers' Mixtral and Qwen3-MoE blocks give the same outputs (1e-5,
fp32)."""

import pytest
import torch

from moekit.interop.transformers import from_transformers, to_transformers, transformers_block
from moekit.nn.sparse import SparseMoE

transformers = pytest.importorskip("transformers")


def _mixtral(seed, top_k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)  # transformers initialises from the global generator
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                           num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def _qwen3(seed, norm_topk_prob, top_k=3):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=6,
                            num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
    block = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def _hidden(gen):
    return torch.randn(2, 7, 32, generator=gen)


def test_mixtral_block_loads_with_equal_outputs(gen):
    block = _mixtral(0)
    layer = from_transformers(block).eval()
    x = _hidden(gen)
    torch.testing.assert_close(layer(x).output, block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_block_loads_with_equal_outputs(gen, norm_topk_prob):
    block = _qwen3(1, norm_topk_prob)
    layer = from_transformers(block).eval()
    assert layer.config.router.renormalize is norm_topk_prob
    x = _hidden(gen)
    torch.testing.assert_close(layer(x).output, block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_export_back(gen, family):
    layer = SparseMoE(32, 4, 2, hidden=16, load_balance_weight=0.0, generator=gen).eval()
    block = transformers_block(layer, family).eval()
    x = _hidden(gen)
    torch.testing.assert_close(block(x), layer(x).output, rtol=1e-5, atol=1e-5)
    again = from_transformers(block)
    for a, b in zip(again.parameters(), layer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_refuses_what_does_not_map(gen):
    with pytest.raises(TypeError, match="expected a MixtralSparseMoeBlock"):
        from_transformers(torch.nn.Linear(2, 2))
    layer = SparseMoE(32, 4, 2, hidden=16, experts="mlp", activation="gelu", generator=gen)
    with pytest.raises(ValueError, match="only SwiGLU experts with a top-k router"):
        to_transformers(layer, _mixtral(0))
    with pytest.raises(ValueError, match=r"this layer needs \(4, 32, 32\)"):
        to_transformers(SparseMoE(32, 4, 2, hidden=16, generator=gen), _mixtral(0))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_top_one_blocks_keep_their_weighting(gen, norm_topk_prob):
    """At K = 1 transformers renormalises the one weight to 1.0 (Mixtral always, Qwen3 with
    norm_topk_prob); moekit's default weights it by its probability, so the import says which."""
    x = _hidden(gen)
    for block in (_mixtral(2, top_k=1), _qwen3(3, norm_topk_prob, top_k=1)):
        layer = from_transformers(block).eval()
        torch.testing.assert_close(layer(x).output, block(x), rtol=1e-5, atol=1e-5)


def test_a_probability_weighted_top_one_layer_exports_only_where_it_maps(gen):
    layer = SparseMoE(32, 4, 1, hidden=16, load_balance_weight=0.0, generator=gen).eval()
    x = _hidden(gen)
    block = transformers_block(layer, "qwen3_moe").eval()  # norm_topk_prob=False: p-weighted
    torch.testing.assert_close(block(x), layer(x).output, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"does not renormalise its top-1 weights.*Use Router"):
        transformers_block(layer, "mixtral")

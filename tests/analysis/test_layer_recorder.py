"""Routing recorded across every layer: equal to a direct forward (moekit LM, SparseMoE stacks,
transformers Mixtral / Qwen3-MoE / OLMoE), hooks gone after the context (after an error too),
streamed to disk equal to in memory, memory bounded by one batch."""

import json
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moekit.analysis.layer_hooks import find_routers, routing_hooks, softmax_top_k
from moekit.analysis.layer_recorder import LayerRecording, record_layers
from moekit.analysis.layer_stats import LayerRoutingStats
from moekit.nn.outputs import MoEOutput, Routing
from moekit.nn.sparse import SparseMoE

N_CATEGORIES = 3


@pytest.fixture
def batches(gen):
    """Three batches (x_BT, y_BT, category_BT) of 2 x 8 tokens."""
    out = []
    for _ in range(3):
        x = torch.randint(0, 256, (2, 8), generator=gen)
        out.append((x, torch.roll(x, -1, 1), torch.randint(0, N_CATEGORIES, (2, 8),
                                                            generator=gen)))
    return out


def assert_hooks_gone(model):
    for module in model.modules():
        assert not module._forward_hooks, type(module).__name__
        assert not module._forward_pre_hooks, type(module).__name__


# --- moekit models --------------------------------------------------------------------------------


def test_lm_recording_equals_the_routing_of_a_direct_forward(lm, batches):
    rec = record_layers(lm, batches, with_probs=True)
    assert (rec.n_tokens, rec.n_layers, rec.top_k, rec.n_experts) == (48, 2, 2, 4)
    assert rec.indices_TLK.dtype == np.int16 and rec.weights_TLK.dtype == np.float32
    for b, (x, _, category) in enumerate(batches):
        rows = slice(16 * b, 16 * (b + 1))
        with torch.no_grad():
            out = lm(x)
        for layer, moe_out in enumerate(out.moe_outputs):
            routing = moe_out.routing  # rows: the B * T tokens in (B, T) order
            np.testing.assert_array_equal(rec.indices_TLK[rows, layer], routing.experts_NK)
            np.testing.assert_array_equal(rec.weights_TLK[rows, layer], routing.weights_NK)
            np.testing.assert_array_equal(rec.probs_TLE[rows, layer], routing.probs_NE)
        np.testing.assert_array_equal(rec.categories_T[rows], category.reshape(-1))
    # each sequence its own document: 6 sequences of 8 tokens
    np.testing.assert_array_equal(rec.doc_T, np.repeat(np.arange(6), 8))
    assert not lm.training


def test_outputs_and_hooks_sources_agree(lm, batches):
    by_outputs = record_layers(lm, batches, source="outputs", with_probs=True)
    by_hooks = record_layers(lm, batches, source="hooks", with_probs=True)
    for name in ("indices_TLK", "weights_TLK", "probs_TLE", "categories_T", "doc_T"):
        np.testing.assert_array_equal(getattr(by_outputs, name), getattr(by_hooks, name))
    assert by_hooks.layer_names == ["blocks.0.ffn", "blocks.1.ffn"]
    assert_hooks_gone(lm)


def test_an_lm_is_read_from_its_outputs_without_hooks(lm, batches, monkeypatch):
    def no_hooks(*args, **kwargs):
        raise AssertionError("hooks registered")

    monkeypatch.setattr("moekit.analysis.layer_recorder.routing_hooks", no_hooks)
    assert record_layers(lm, batches).n_tokens == 48


def test_training_mode_is_restored(lm, batches):
    lm.train()
    record_layers(lm, batches[:1])
    assert lm.training


class TwoLayerStack(nn.Module):
    """A module holding SparseMoE layers whose forward returns a plain tensor: hooks needed."""

    def __init__(self, gen):
        super().__init__()
        self.moe0 = SparseMoE(8, 4, hidden=8, generator=gen)
        self.mid = nn.Linear(8, 8)
        self.moe1 = SparseMoE(8, 4, hidden=8, generator=gen)

    def forward(self, x_BTD):
        return self.moe1(torch.tanh(self.mid(self.moe0(x_BTD).output))).output


def test_module_with_sparse_moe_layers_is_read_through_hooks(gen):
    stack = TwoLayerStack(gen).eval()
    x_BTD = torch.randn(3, 5, 8, generator=gen)  # features: 15 tokens
    rec = record_layers(stack, [x_BTD], with_probs=True)
    assert rec.layer_names == ["moe0", "moe1"] and rec.indices_TLK.shape == (15, 2, 2)
    with torch.no_grad():
        first = stack.moe0(x_BTD)
        second = stack.moe1(torch.tanh(stack.mid(first.output)))
    for layer, out in enumerate((first, second)):
        np.testing.assert_array_equal(rec.indices_TLK[:, layer], out.routing.experts_NK)
        np.testing.assert_array_equal(rec.probs_TLE[:, layer], out.routing.probs_NE)
    np.testing.assert_array_equal(rec.doc_T, np.repeat(np.arange(3), 5))
    assert_hooks_gone(stack)


def test_a_forward_returning_a_list_of_moe_outputs_is_a_stack(gen):
    moe = SparseMoE(8, 4, hidden=8, generator=gen).eval()

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return [self.moe(x), self.moe(2 * x)]  # one layer called twice: two records

    x = torch.randn(6, 8, generator=gen)
    rec = record_layers(Stack(), [x], source="outputs")
    with torch.no_grad():
        np.testing.assert_array_equal(rec.indices_TLK[:, 1], moe(2 * x).routing.experts_NK)
    assert rec.n_experts == 4  # from the layer's config when probs are not recorded


# --- disk, memory, caps ---------------------------------------------------------------------------


def test_streamed_to_disk_equals_in_memory(lm, batches, tmp_path):
    in_memory = record_layers(lm, batches, with_probs=True)
    streamed = record_layers(lm, batches, with_probs=True, store=tmp_path / "rec")
    assert isinstance(streamed.indices_TLK, np.memmap) and streamed.store is not None
    reopened = LayerRecording.open(tmp_path / "rec")
    for rec in (streamed, reopened):
        for name in ("indices_TLK", "weights_TLK", "probs_TLE", "categories_T", "doc_T"):
            np.testing.assert_array_equal(getattr(rec, name), getattr(in_memory, name))
        assert rec.n_experts == 4
    names = ["a", "b", "c"]
    assert json.dumps(streamed.stats(names, chunk_tokens=5).to_dict()) == \
        json.dumps(in_memory.stats(names).to_dict())


def test_stats_equal_one_update_with_every_token(lm, batches):
    rec = record_layers(lm, batches)
    names = ["a", "b", "c"]
    whole = LayerRoutingStats(4, category_names=names).update(
        rec.indices_TLK, rec.weights_TLK, categories_T=rec.categories_T, doc_T=rec.doc_T).result()
    assert json.dumps(rec.stats(names, chunk_tokens=7).to_dict()) == json.dumps(whole.to_dict())


def test_a_failed_run_leaves_no_complete_store(lm, batches, tmp_path):
    bad = [*batches, "not a batch"]
    with pytest.raises(TypeError, match="each batch must be x_BT or a tuple"):
        record_layers(lm, bad, store=tmp_path / "rec")
    assert not (tmp_path / "rec" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no complete store"):
        LayerRecording.open(tmp_path / "rec")


def test_max_tokens_cuts_the_last_batch(lm, batches):
    full = record_layers(lm, batches)
    cut = record_layers(lm, batches, max_tokens=21)
    assert cut.n_tokens == 21
    np.testing.assert_array_equal(cut.indices_TLK, full.indices_TLK[:21])
    np.testing.assert_array_equal(cut.doc_T, full.doc_T[:21])


class StubLM(nn.Module):
    """Returns random routing for L = 2 layers of E = 8 experts: isolates the recorder's memory."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x_BT):
        outputs = []
        for _ in range(2):
            logits_NE = torch.randn(x_BT.numel(), 8, generator=self.gen)
            probs_NE = torch.softmax(logits_NE, -1)
            weights_NK, experts_NK = probs_NE.topk(2, -1)
            routing = Routing(weights_NK, experts_NK, probs_NE, logits_NE)
            outputs.append(MoEOutput(output=torch.zeros(()), routing=routing,
                                     aux_loss=torch.zeros(())))
        return SimpleNamespace(moe_outputs=outputs)


def _peak_numpy_bytes(tmp_path, store):
    batches = (torch.zeros(8, 256, dtype=torch.long) for _ in range(64))  # 64 x 2048 tokens
    tracemalloc.start()
    try:
        rec = record_layers(StubLM(), batches, with_probs=True, store=store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rec, peak


def test_a_streamed_run_holds_one_batch_at_a_time(tmp_path):
    # per token: indices 2 * 2 * 2 B + weights 2 * 2 * 4 B + probs 2 * 8 * 4 B + doc 8 B = 96 B;
    # 131072 tokens = 12 MiB recorded, one batch of 2048 tokens = 192 KiB
    batch_bytes = 2048 * 96
    rec_mem, peak_mem = _peak_numpy_bytes(tmp_path, None)
    rec_disk, peak_disk = _peak_numpy_bytes(tmp_path, tmp_path / "rec")
    assert rec_disk.n_tokens == rec_mem.n_tokens == 131072
    np.testing.assert_array_equal(rec_disk.indices_TLK, rec_mem.indices_TLK)
    assert peak_mem > 64 * batch_bytes  # in memory: the whole recording
    assert peak_disk < 2 * batch_bytes, peak_disk  # streamed: at most a batch


# --- hooks ----------------------------------------------------------------------------------------


def fail_inside_hooks(model, x_BT=None):
    """Enter routing_hooks, check the hooks are there (and run ``x_BT``), then raise."""
    with routing_hooks(model) as capture:
        assert all(site.module._forward_hooks for site in capture.sites)
        if x_BT is not None:
            model(x_BT)
            assert len(capture.take()[1]) == 2
        raise RuntimeError("boom")


def test_hooks_are_removed_after_an_error_inside_the_with(lm):
    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_hooks(lm)
    assert_hooks_gone(lm)


def test_hooks_are_removed_when_the_forward_fails(lm, tmp_path):
    x = torch.full((1, 40), 3)  # longer than max_seq_len=32: the model raises
    with pytest.raises(ValueError, match="max_seq_len=32"):
        record_layers(lm, [x], source="hooks", store=tmp_path / "rec")
    assert_hooks_gone(lm)


def test_no_router_is_an_error_that_says_what_to_pass():
    with pytest.raises(ValueError, match="found no router in Linear"):
        fail_inside_hooks(nn.Linear(2, 2))


def test_bad_arguments_name_the_parameter(lm, batches):
    with pytest.raises(ValueError, match="source must be one of 'auto', 'outputs', 'hooks'"):
        record_layers(lm, batches, source="gate")
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1; got max_tokens=0"):
        record_layers(lm, batches, max_tokens=0)
    with pytest.raises(ValueError, match="category_BT must give one category per token"):
        record_layers(lm, [(batches[0][0], None, torch.zeros(3))])
    with pytest.raises(ValueError, match="batches held no batch"):
        record_layers(lm, [])
    rec = record_layers(lm, [batches[0][0]])
    with pytest.raises(ValueError, match="got category_names but the recording has no categories"):
        rec.stats(["a"])
    stack = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="source='outputs' needs a forward that returns"):
        record_layers(stack, [torch.randn(2, 8)], source="outputs")


def test_softmax_top_k_worked_example():
    # softmax(2, 0, 1) = (0.665, 0.090, 0.245): top 2 = experts 0, 2; renormalised 0.731, 0.269
    experts, weights, probs = softmax_top_k(torch.tensor([[2.0, 0.0, 1.0]]), 2, False)
    assert experts.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, probs[:, [0, 2]])
    _, renormalised, _ = softmax_top_k(torch.tensor([[2.0, 0.0, 1.0]]), 2, True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(1))


class MixtralSparseMoeBlock(nn.Module):
    """transformers 4's layout, by class name: the gate is a bare nn.Linear returning logits."""

    def __init__(self, gen):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            self.gate.weight.normal_(generator=gen)

    def forward(self, x_BTD):
        self.gate(x_BTD.reshape(-1, 8))
        return x_BTD


def test_a_gate_returning_only_logits_gets_the_blocks_rule(gen):
    block = MixtralSparseMoeBlock(gen)
    x = torch.randn(2, 3, 8, generator=gen)
    rec = record_layers(block, [x], with_probs=True)
    experts, weights, probs = softmax_top_k(block.gate(x.reshape(-1, 8)).detach(), 2, True)
    np.testing.assert_array_equal(rec.indices_TLK[:, 0], experts)
    np.testing.assert_array_equal(rec.weights_TLK[:, 0], weights)
    np.testing.assert_array_equal(rec.probs_TLE[:, 0], probs)


# --- transformers ---------------------------------------------------------------------------------


def _hf_model(family):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                       "(pip install moekit[interop])")
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_experts_per_tok": 2, "vocab_size": 256}
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **sizes)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                             num_experts=4, norm_topk_prob=False, head_dim=8,
                                             **sizes)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(intermediate_size=64, num_experts=4,
                                          norm_topk_prob=True, eos_token_id=None, **sizes)
        cls = transformers.OlmoeForCausalLM
    with torch.random.fork_rng():  # transformers draws its initial weights from the global RNG
        torch.manual_seed(0)
        model = cls(config).eval()
        for site in find_routers(model):  # distinct logits, no ties
            torch.nn.init.normal_(site.module.weight)
    return model


def _manual_routing(model, x_BT, renormalize):
    """softmax / top-k / renormalise by hand from each gate's logits on the same inputs."""
    gates = [site.module for site in find_routers(model)]
    inputs = []
    handles = [g.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for g in gates]
    try:
        with torch.no_grad():
            model(x_BT)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for gate, h in zip(gates, inputs, strict=True):
        logits_NE = h.reshape(-1, h.shape[-1]) @ gate.weight.detach().T
        probs_NE = torch.softmax(logits_NE.float(), dim=-1)
        weights_NK, experts_NK = torch.topk(probs_NE, 2, dim=-1)
        if renormalize:
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        out.append((experts_NK, weights_NK, probs_NE))
    return out


@pytest.mark.parametrize("family, renormalize", [("mixtral", True), ("qwen3_moe", False),
                                                 ("olmoe", True)])
def test_transformers_recording_equals_softmax_top_k_of_the_gate_logits(family, renormalize, gen):
    model = _hf_model(family)
    x_BT = torch.randint(0, 256, (2, 6), generator=gen)
    rec = record_layers(model, [(x_BT, x_BT, torch.zeros_like(x_BT))], with_probs=True)
    assert (rec.n_layers, rec.top_k, rec.n_experts) == (2, 2, 4)
    assert rec.layer_names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer, (experts, weights, probs) in enumerate(_manual_routing(model, x_BT, renormalize)):
        np.testing.assert_array_equal(rec.indices_TLK[:, layer], experts)
        np.testing.assert_allclose(rec.weights_TLK[:, layer], weights, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rec.probs_TLE[:, layer], probs, rtol=1e-6, atol=1e-7)
    sums = rec.weights_TLK.sum(-1)
    assert np.allclose(sums, 1.0) == renormalize  # Qwen3 with norm_topk_prob=False: p, not 1
    assert record_layers(model, [x_BT]).n_experts == 4  # from the config, without probs
    assert_hooks_gone(model)


def test_transformers_hooks_are_removed_after_an_error(gen):
    model = _hf_model("mixtral")
    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_hooks(model, torch.randint(0, 256, (1, 4), generator=gen))
    assert_hooks_gone(model)

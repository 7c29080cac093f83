"""The routing recorder and its statistics: worked examples, known partitions, bounded memory."""

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from moekit import MixtureOfExperts, SparseMoE
from moekit.analysis.agreement import routing_agreement
from moekit.analysis.over_training import RoutingHistory, routing_summary
from moekit.analysis.recorder import batch_routing, record_routing
from moekit.analysis.stats import (
    RoutingStats,
    coefficient_of_variation,
    match_experts,
    max_over_mean,
    nmi_from_contingency,
)
from moekit.analysis.store import RoutingStore
from moekit.fitting.config import TrainConfig
from moekit.fitting.gradient import fit
from moekit.io.files import jsonable
from moekit.nn.outputs import MoEOutput, Routing

F64 = torch.float64


class FixedRouting(nn.Module):
    """A stub layer: input row i (its value) gets row i of a fixed routing."""

    def __init__(self, probs_NE, experts_NK=None, weights_NK=None, expert_outputs_NEO=None):
        super().__init__()
        self.probs_NE = torch.as_tensor(probs_NE, dtype=F64)
        self.experts_NK = None if experts_NK is None else torch.as_tensor(experts_NK)
        self.weights_NK = None if weights_NK is None else torch.as_tensor(weights_NK, dtype=F64)
        self.outputs_NEO = expert_outputs_NEO
        self.anchor = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x_N1):
        rows = x_N1[:, 0].long()
        p_NE = self.probs_NE[rows]
        if self.experts_NK is None:  # dense: every expert, weight p
            experts = torch.arange(p_NE.shape[1]).expand_as(p_NE)
            routing = Routing(p_NE, experts, p_NE, p_NE.log(), dense=True)
        else:
            routing = Routing(self.weights_NK[rows], self.experts_NK[rows], p_NE, p_NE.log())
        outputs = None if self.outputs_NEO is None else self.outputs_NEO[rows]
        output = p_NE[:, :1] if outputs is None else torch.einsum("ne,neo->no", p_NE, outputs)
        return MoEOutput(output, routing, output.new_zeros(()), expert_outputs=outputs,
                         expert_logits=outputs)


def rows(n):
    return torch.arange(n, dtype=F64).reshape(-1, 1)


def nearest_centre_gate(n_experts: int, sharpness: float = 60.0) -> MixtureOfExperts:
    """A 1-D mixture whose gate picks the expert whose centre e + 0.5 is nearest x: logits
    s (c_e x - c_e^2 / 2) are largest for the nearest centre, so expert e owns [e, e + 1)."""
    moe = MixtureOfExperts(1, 1, n_experts).double()
    centres = torch.arange(n_experts, dtype=F64) + 0.5
    with torch.no_grad():
        moe.gate.w_DE.copy_(sharpness * centres.reshape(1, -1))
        moe.gate.b_E.copy_(-sharpness * centres.square() / 2)
    return moe


def test_load_cv_and_max_over_mean_worked_example():
    # Rows 0-1 go to expert 0, rows 2-3 to expert 1: loads (0.5, 0.5, 0, 0), mean 0.25,
    # std = sqrt(mean of 0.25^2) = 0.25, so CV = 1 and max/mean = 0.5 / 0.25 = 2.
    one_hot = torch.eye(4, dtype=F64)
    stub = FixedRouting(one_hot[[0, 0, 1, 1]])
    stats = record_routing(stub, rows(4)).stats
    np.testing.assert_allclose(stats.load_E, [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(stats.primary_share_E, [0.5, 0.5, 0, 0])
    assert stats.cv == pytest.approx(1.0) and stats.max_over_mean == pytest.approx(2.0)
    assert stats.dead_experts() == [2, 3]
    assert stats.entropy_ratio == pytest.approx(0.0)  # one-hot gate
    assert coefficient_of_variation([1, 1, 1]) == 0.0 and max_over_mean([1, 3]) == 1.5


def test_soft_load_and_primary_share_differ():
    # p = (0.6, 0.4) on both rows: the mean proportion is (0.6, 0.4), the primary share (1, 0).
    stats = record_routing(FixedRouting([[0.6, 0.4], [0.6, 0.4]]), rows(2)).stats
    np.testing.assert_allclose(stats.mean_proportion_E, [0.6, 0.4])
    np.testing.assert_allclose(stats.primary_share_E, [1.0, 0.0])
    # H = -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.6730 nats, over ln 2 = 0.9710.
    assert stats.entropy_ratio == pytest.approx(0.9709505944546686)


def test_uniform_gate_has_entropy_ratio_one(gen):
    moe = MixtureOfExperts(3, 2, 5, generator=gen).double()
    with torch.no_grad():
        moe.gate.w_DE.zero_()
        moe.gate.b_E.zero_()
    stats = record_routing(moe, torch.randn(300, 3, generator=gen, dtype=F64)).stats
    assert stats.entropy_ratio == pytest.approx(1.0, abs=1e-12)
    assert stats.marginal_entropy_ratio == pytest.approx(1.0, abs=1e-12)
    assert stats.cv == pytest.approx(0.0, abs=1e-12) and stats.max_over_mean == pytest.approx(1.0)


def test_known_partition_is_recovered(gen, tmp_path):
    # x ~ U(0, 4), class = floor(x); expert e owns [e, e + 1), so primary expert == class.
    moe = nearest_centre_gate(4)
    x = 4 * torch.rand(2000, 1, generator=gen, dtype=F64)
    y = x[:, 0].floor().long()
    rec = record_routing(moe, x, y, batch_size=256, store=tmp_path / "routing",
                         class_names=["a", "b", "c", "d"])
    stats = rec.stats
    assert stats.nmi > 0.97
    assert stats.dead_experts() == []
    np.testing.assert_allclose(stats.load_E, np.bincount(y.numpy()) / 2000, atol=0.01)
    # The streaming NMI (from the contingency table) equals sklearn's on the stored rows.
    primary = np.asarray(rec.store["primary"])
    assert stats.nmi == pytest.approx(normalized_mutual_info_score(y.numpy(), primary))
    assert stats.to_dict()["expert_by_label"]["labels"] == ["a", "b", "c", "d"]


def test_kl_between_posterior_and_prior_worked_example():
    # p = (0.5, 0.5), o_0 = 0, o_1 = 1, target 0, variance 1:
    # h ∝ (0.5 e^0, 0.5 e^-0.5), so h_0 = 1 / (1 + e^-0.5) and KL = sum h log(h / 0.5).
    outputs = torch.tensor([[[0.0], [1.0]]], dtype=F64)
    stub = FixedRouting([[0.5, 0.5]], expert_outputs_NEO=outputs)
    stats = record_routing(stub, rows(1), torch.zeros(1, 1, dtype=F64)).stats
    h0 = 1 / (1 + math.exp(-0.5))
    want = h0 * math.log(h0 / 0.5) + (1 - h0) * math.log((1 - h0) / 0.5)
    assert stats.kl_posterior_prior == pytest.approx(want)
    np.testing.assert_allclose(stats.to_dict()["posterior"]["mean_posterior"], [h0, 1 - h0])


def test_coactivation_worked_example():
    # Top-2 choices per row: {0,1}, {0,1}, {0,2}, {1,2}; expert 3 never runs.
    # Expert 0 runs on 3 rows, twice with 1: P(1 | 0) = 2/3; loads = (3, 3, 2, 0) / 8.
    experts = [[0, 1], [0, 1], [0, 2], [1, 2]]
    probs = [[0.4, 0.4, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1],
             [0.1, 0.4, 0.4, 0.1]]
    stub = FixedRouting(probs, experts, [[0.5, 0.5]] * 4)
    stats = record_routing(stub, rows(4)).stats
    assert not stats.dense and stats.top_k == 2
    np.testing.assert_allclose(np.diag(stats.coactivation_EE), [3, 3, 2, 0])
    assert stats.coactivation_EE[0, 1] == 2 and stats.coactivation_EE[1, 2] == 1
    assert stats.coactivation_conditional_EE[0, 1] == pytest.approx(2 / 3)
    assert stats.coactivation_conditional_EE[3].sum() == 0
    np.testing.assert_allclose(stats.load_E, [3 / 8, 3 / 8, 2 / 8, 0])
    assert stats.dead_experts() == [3]


def test_nmi_and_matching_helpers():
    assert nmi_from_contingency([[5, 0], [0, 5]]) == pytest.approx(1.0)
    assert nmi_from_contingency([[5, 5], [5, 5]]) == pytest.approx(0.0)
    assert math.isnan(nmi_from_contingency([[0, 0]]))
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([1, 1, 0, 0, 0, 2, 2])
    table = np.zeros((3, 3))
    np.add.at(table, (clusters, labels), 1)
    assert nmi_from_contingency(table) == pytest.approx(
        normalized_mutual_info_score(labels, clusters))
    assert match_experts(np.array([[1, 9, 0], [8, 0, 0], [0, 0, 7]])).tolist() == [1, 0, 2]
    assert match_experts(np.array([[1, 9], [8, 0], [0, 0]])).tolist() == [1, 0, -1]


def test_regression_targets_are_binned(gen):
    moe = nearest_centre_gate(2)
    x = 2 * torch.rand(500, 1, generator=gen, dtype=F64)
    rec = record_routing(moe, x, x.clone(), n_target_bins=2, target_name="t")
    # Two quantile bins of t = x split at its median, close to the gate's boundary at 1.
    assert rec.stats.label_kind == "target bin" and len(rec.target_edges) == 3
    assert rec.stats.label_names[0].startswith("t in [")
    assert rec.stats.nmi > 0.8


def test_dropped_assignments_are_counted_and_stored(gen, tmp_path):
    moe = SparseMoE(8, 4, 2, hidden=8, capacity_factor=0.5, generator=gen)
    x = torch.randn(64, 8, generator=gen)
    plan = moe.eval()(x).dispatch
    rec = record_routing(moe, x, store=tmp_path / "r")
    stats = rec.stats
    assert stats.dropped_count_E.sum() == plan.dropped_rows.numel() > 0
    assert stats.drop_rate == pytest.approx(plan.drop_rate)
    assert int(rec.store["dropped"].sum()) == plan.dropped_rows.numel()
    assert int(rec.store["kept"].sum()) == plan.rows_M.numel()
    assert set(rec.store.fields) >= {"experts", "weights", "kept", "dropped", "probs"}
    assert stats.contribution_share_E is not None
    assert stats.contribution_share_E.sum() == pytest.approx(1.0)


def test_store_matches_the_model_and_dataloaders_match_tensors(gen, tmp_path):
    moe = MixtureOfExperts(2, 3, 4, generator=gen).double()
    x = torch.randn(250, 2, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (250,), generator=gen)
    rec = record_routing(moe, x, y, batch_size=64, store=tmp_path / "s")
    reopened = RoutingStore.open(tmp_path / "s")
    assert reopened.n_rows == 250 and not list(tmp_path.glob("s/*.part"))
    np.testing.assert_allclose(reopened["probs"], moe(x).routing.probs_NE.detach().numpy(),
                               rtol=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    again = record_routing(moe, loader).stats
    np.testing.assert_allclose(again.load_E, rec.stats.load_E)
    np.testing.assert_allclose(again.label_count_EC, rec.stats.label_count_EC)
    with pytest.raises(KeyError, match="no field 'nope'"):
        reopened["nope"]


def test_a_failed_recording_leaves_no_store(gen, tmp_path):
    moe = MixtureOfExperts(2, 1, 3, generator=gen)

    def batches():
        yield torch.randn(5, 2)
        yield torch.randn(5, 7)  # the wrong width: the model raises

    with pytest.raises(ValueError, match="x has 7 features"):
        record_routing(moe, batches(), store=tmp_path / "s")
    assert not list((tmp_path / "s").iterdir())
    with pytest.raises(FileNotFoundError, match="no complete store"):
        RoutingStore.open(tmp_path / "s")


def _permuted_copy(moe: MixtureOfExperts, perm: torch.Tensor) -> MixtureOfExperts:
    """The same mixture with expert perm[i] of the copy being expert i of the original... i.e.
    the copy's expert j is the original's expert perm[j]."""
    twin = MixtureOfExperts.from_config(moe.config).to(F64)
    state = moe.state_dict()
    with torch.no_grad():
        twin.gate.w_DE.copy_(state["gate.w_DE"][:, perm])
        twin.gate.b_E.copy_(state["gate.b_E"][perm])
        twin.experts.w_EDO.copy_(state["experts.w_EDO"][perm])
        twin.experts.b_EO.copy_(state["experts.b_EO"][perm])
    return twin


def test_permuted_twins_agree_fully_after_matching(gen):
    moe = MixtureOfExperts(2, 1, 5, generator=gen).double()
    perm = torch.tensor([3, 0, 4, 1, 2])
    twin = _permuted_copy(moe, perm)
    x = torch.randn(400, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(twin(x).output, moe(x).output)
    agreement = routing_agreement(moe, twin, x, batch_size=128)
    assert agreement.agreement == pytest.approx(1.0)
    assert agreement.nmi == pytest.approx(1.0)
    assert agreement.tv_distance == pytest.approx(0.0, abs=1e-12)
    assert agreement.agreement_unmatched < 0.5
    # Original expert i is the twin's expert j where perm[j] = i.
    assert agreement.match_A == torch.argsort(perm).tolist()
    assert math.isnan(agreement.selection_overlap)  # both dense: every expert always runs


def test_permuted_sparse_twins_agree_fully(gen):
    moe = SparseMoE(6, 4, 2, hidden=8, router="topk", experts="mlp", generator=gen).eval()
    twin = SparseMoE.from_config(moe.config).eval()
    perm = torch.tensor([2, 3, 1, 0])
    state = {k: (v[perm] if k.startswith("experts.") else v[:, perm]) for k, v
             in moe.state_dict().items()}
    twin.load_state_dict(state)
    x = torch.randn(100, 6, generator=gen)
    torch.testing.assert_close(twin(x).output, moe(x).output)
    agreement = routing_agreement(moe, twin, x)
    assert agreement.agreement == 1.0 and agreement.selection_overlap == 1.0


def test_recorder_memory_stays_bounded_over_a_million_rows(tmp_path):
    """1e6 rows of a tiny mixture in 100 batches, per-row routing streamed to disk: the resident
    memory grows by far less than the 1e6 rows would need (probabilities alone: 16 MB in float32,
    32 MB as float64), and the statistics hold only E-sized sums."""
    n_rows, batch = 1_000_000, 10_000
    moe = MixtureOfExperts(2, 1, 4, generator=torch.Generator().manual_seed(0))
    rss = []

    def batches():
        gen = torch.Generator().manual_seed(1)
        for i in range(n_rows // batch):
            if i in (5, n_rows // batch - 1):
                rss.append(_resident_bytes())
            x = torch.randn(batch, 2, generator=gen)
            yield x, (x[:, 0] > 0).long()

    start = time.perf_counter()
    rec = record_routing(moe, batches(), store=tmp_path / "big")
    seconds = time.perf_counter() - start
    assert rec.stats.n_rows == n_rows and rec.store.n_rows == n_rows
    assert (tmp_path / "big" / "probs.bin").stat().st_size == n_rows * 4 * 4
    assert rss[1] - rss[0] < 12 * 2**20, f"grew by {(rss[1] - rss[0]) / 2**20:.1f} MB"
    sizes = [v.size for v in vars(rec.stats).values() if isinstance(v, np.ndarray)]
    assert max(sizes) <= 16  # E x E
    assert seconds < 60


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_routing_history_callback_adds_routing_columns(gen):
    moe = MixtureOfExperts(1, 1, 3, generator=gen).double()
    x = torch.rand(60, 1, generator=gen, dtype=F64)
    result = fit(moe, x, 2 * x, TrainConfig(max_epochs=4, progress=False),
                 callbacks=[RoutingHistory(x, every=2)])
    history = result.history
    assert history[1]["routing_load_0"] + history[1]["routing_load_1"] + \
        history[1]["routing_load_2"] == pytest.approx(1.0)
    assert "routing_entropy_ratio" not in history[0]  # every=2: epochs 2 and 4 only
    assert len([v for v in history[:, "routing_entropy_ratio"] if v is not None]) == 2
    summary = routing_summary(moe, x)
    assert summary["entropy_ratio"] == pytest.approx(history[-1]["routing_entropy_ratio"])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 0}, ValueError,
     r"record_routing: batch_size must be an integer >= 1; got batch_size=0"),
    ({"likelihood": "poisson"}, ValueError,
     r"likelihood must be one of 'gaussian', 'categorical'; got likelihood='poisson'"),
])
def test_bad_arguments(kwargs, error, message, gen):
    with pytest.raises(error, match=message):
        record_routing(MixtureOfExperts(2, 1, 2, generator=gen), torch.randn(3, 2), **kwargs)


def test_a_model_that_does_not_return_moe_output_is_named():
    with pytest.raises(TypeError, match=r"must return a MoEOutput; got Tensor\. Pass the "
                                        "mixture-of-experts layer itself"):
        record_routing(nn.Linear(2, 2), torch.randn(3, 2))


def test_empty_stats_are_nan():
    stats = RoutingStats(n_experts=3)
    assert math.isnan(stats.entropy_ratio) and math.isnan(stats.kl_posterior_prior)
    assert stats.to_dict()["entropy"]["ratio"] is None


def test_a_hierarchical_mixture_is_recorded_over_its_leaves(gen):
    from moekit import HierarchicalMixtureOfExperts

    tree = HierarchicalMixtureOfExperts(2, 3, depth=2, branching=2, generator=gen).double()
    x = torch.randn(100, 2, generator=gen, dtype=F64)
    stats = record_routing(tree, x, torch.randint(0, 3, (100,), generator=gen)).stats
    assert stats.n_experts == 4 and stats.dense
    assert stats.load_E.sum() == pytest.approx(1.0) and stats.n_posterior_rows == 100


@pytest.mark.parametrize("layer", ["dense", "routed"])
def test_contributions_can_be_left_out_without_changing_the_rest(layer, gen):
    moe = MixtureOfExperts(6, 2, 4, generator=gen) if layer == "dense" else \
        SparseMoE(6, 4, 2, hidden=8, capacity_factor=0.5, generator=gen)
    x = torch.randn(64, 6, generator=gen)
    full = record_routing(moe, x, batch_size=16).stats
    lean = record_routing(moe, x, batch_size=16, contributions=False).stats
    assert full.contribution_share_E is not None and lean.contribution_share_E is None
    assert {k: v for k, v in full.to_dict().items() if k != "contribution_share"} == \
        {k: v for k, v in lean.to_dict().items() if k != "contribution_share"}
    with torch.no_grad():
        batch = batch_routing(moe, x, moe(x), contributions=False)
    assert batch.contribution_NE is None and batch.kept_NE.shape == (64, 4)


def test_jsonable_turns_arrays_and_non_finite_numbers_into_json():
    value = {"a": np.array([1.0, np.nan]), "b": (np.int64(2), math.inf), "c": "x", "d": None}
    assert jsonable(value) == {"a": [1.0, None], "b": [2, None], "c": "x", "d": None}
    agreement = routing_agreement(MixtureOfExperts(2, 1, 3), MixtureOfExperts(2, 1, 3),
                                  torch.randn(20, 2)).to_dict()
    assert agreement["selection_overlap"] is None  # both dense: nan becomes None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_is_recorded_on_the_cpu(gen, tmp_path):
    for i, (moe, y) in enumerate((
            (MixtureOfExperts(6, 3, 4, generator=gen), torch.randint(0, 3, (64,))),
            (MixtureOfExperts(6, 3, 4, generator=gen), torch.randn(64, 3)),
            (SparseMoE(6, 4, 2, hidden=8, capacity_factor=0.5, generator=gen), None))):
        x = torch.randn(64, 6, generator=gen)
        on_cpu = record_routing(moe, x, y, batch_size=16).stats
        on_gpu = record_routing(moe.cuda(), x.cuda(), None if y is None else y.cuda(),
                                batch_size=16, store=tmp_path / str(i)).stats
        np.testing.assert_allclose(on_gpu.load_E, on_cpu.load_E, atol=1e-5)
        np.testing.assert_allclose(on_gpu.label_count_EC, on_cpu.label_count_EC)
        np.testing.assert_allclose(on_gpu.contribution_share_E, on_cpu.contribution_share_E,
                                   atol=1e-4)

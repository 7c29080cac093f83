"""Routing statistics per layer and across layers: worked examples, known structure, references."""

import collections
import itertools
import json
import math
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from moekit.analysis.layer_categories import lift_table, top_lift_pairs
from moekit.analysis.layer_overlap import RoutingOverlap, match_seed_experts, routing_saturation
from moekit.analysis.layer_paths import CodeCounter
from moekit.analysis.layer_repeats import (
    count_repeats,
    intersect_chance_exact,
    intersect_chance_sampled,
)
from moekit.analysis.layer_stats import LayerRoutingStats


def random_sets(rng, n_tokens, n_layers, n_experts, top_k, p_E=None):
    """Distinct top-k experts per token and layer (Gumbel top-k of log p: non-uniform loads)."""
    logits_E = np.zeros(n_experts) if p_E is None else np.log(p_E)
    gumbel_TLE = logits_E - np.log(-np.log(rng.random((n_tokens, n_layers, n_experts))))
    return np.argsort(-gumbel_TLE, axis=-1)[:, :, :top_k]


def assert_same(a, b):
    """Nested JSON values equal, floats to 1e-9."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    else:
        assert a == b


# --- per layer ---------------------------------------------------------------------------------


def test_load_entropy_dead_and_never_first_worked_example():
    # E = 4, K = 2, one layer; sets (rank order): (0, 1), (1, 0), (0, 2).
    # assignments: e0 3, e1 2, e2 1, e3 0 of 6 -> load (1/2, 1/3, 1/6, 0); first choices 0, 1, 0.
    indices_TLK = np.array([[[0, 1]], [[1, 0]], [[0, 2]]])
    weights_TLK = np.array([[[0.5, 0.5]], [[0.75, 0.25]], [[1.0, 0.0]]])
    r = LayerRoutingStats(4).update(indices_TLK, weights_TLK).result()
    np.testing.assert_allclose(r.load_LE, [[1 / 2, 1 / 3, 1 / 6, 0]])
    np.testing.assert_allclose(r.top1_load_LE, [[2 / 3, 1 / 3, 0, 0]])
    # weights: e0 0.5 + 0.25 + 1 = 1.75, e1 0.5 + 0.75 = 1.25, e2 0, of 3.
    np.testing.assert_allclose(r.weighted_load_LE, [[1.75 / 3, 1.25 / 3, 0, 0]])
    h = -(0.5 * math.log(0.5) + 1 / 3 * math.log(1 / 3) + 1 / 6 * math.log(1 / 6))
    np.testing.assert_allclose(r.load_entropy_L, [h])
    np.testing.assert_allclose(r.load_entropy_ratio_L, [h / math.log(4)])
    assert r.dead_experts == [[3]] and r.never_first_experts == [[2, 3]]
    assert r.weighted_load_LE is not None
    assert r.top_k == 2 and r.n_tokens == 3 and r.n_layers == 1


def test_one_expert_and_k_equal_e_edges():
    one = LayerRoutingStats(1).update(np.zeros((5, 2, 1), dtype=int)).result()
    assert np.isnan(one.load_entropy_ratio_L).all() and one.dead_experts == [[], []]
    assert one.repeats.same_first_L.tolist() == [1.0, 1.0]
    # K = E: every pair shares every expert, and so would independent tokens.
    full = LayerRoutingStats(3).update(np.array([[[0, 1, 2]], [[2, 0, 1]], [[1, 2, 0]]])).result()
    assert full.repeats.sets_intersect_L.tolist() == [1.0]
    np.testing.assert_allclose(full.repeats.sets_intersect_chance_L, [1.0])
    np.testing.assert_allclose(full.repeats.mean_overlap_L, [1.0])
    np.testing.assert_allclose(full.repeats.mean_overlap_chance_L, [1.0])


def test_category_selective_layer_then_uniform_layer():
    # Layer 0 sends category c to expert c (NMI 1, lift E), layer 1 routes at random (NMI ~ 0).
    rng = np.random.default_rng(0)
    n, n_cat = 20000, 4
    categories_T = rng.integers(0, n_cat, n)
    indices_TLK = np.stack([categories_T, rng.integers(0, n_cat, n)], axis=1)[:, :, None]
    stats = LayerRoutingStats(n_cat, category_names=["code", "prose", "math", "chat"])
    tables = stats.update(indices_TLK, categories_T=categories_T).result(top_n=2).categories
    assert tables.nmi_L[0] == pytest.approx(1.0) and tables.nmi_L[1] < 0.005
    np.testing.assert_array_equal(tables.top1_share_LEC[0], np.eye(n_cat))
    np.testing.assert_allclose(tables.top1_share_LEC[1].sum(0), 1.0)
    np.testing.assert_allclose(np.diag(tables.lift_LEC[0]), n_cat, rtol=0.05)
    best = tables.top_pairs[0][0]
    assert best["expert"] == ["code", "prose", "math", "chat"].index(best["category"])
    assert best["share_of_category"] == 1.0 and best["share_of_expert"] == 1.0
    assert all(p["lift"] < 1.1 for p in tables.top_pairs[1])
    np.testing.assert_array_equal(tables.tokens_C, np.bincount(categories_T))


def test_nmi_equals_sklearn_on_top1_and_topk_shares_sum_to_k():
    rng = np.random.default_rng(1)
    n, n_cat = 3000, 5
    categories_T = rng.integers(0, n_cat, n)
    indices_TLK = random_sets(rng, n, 3, 10, 2)
    indices_TLK[: n // 2, 0, 0] = categories_T[: n // 2]  # half the tokens follow their category
    indices_TLK[: n // 2, 0, 1] = categories_T[: n // 2] + n_cat  # keep each token's set distinct
    stats = LayerRoutingStats(10, category_names=list("abcde"))
    tables = stats.update(indices_TLK, categories_T=categories_T).result().categories
    for layer in range(3):
        expected = normalized_mutual_info_score(categories_T, indices_TLK[:, layer, 0])
        assert tables.nmi_L[layer] == pytest.approx(expected, abs=1e-12)
    assert tables.nmi_L[0] > 5 * tables.nmi_L[1]
    np.testing.assert_allclose(tables.share_LEC.sum(1), 2.0)  # P(e in S | c) sums to K
    np.testing.assert_allclose(tables.top1_share_LEC.sum(1), 1.0)


def test_lift_table_and_top_pairs_worked_example():
    # 4 assignments: expected counts (row sum x column sum / 4) are [[1.5, 1.5], [0.5, 0.5]].
    counts_EC = np.array([[2, 1], [0, 1]])
    np.testing.assert_allclose(lift_table(counts_EC), [[4 / 3, 2 / 3], [0, 2]])
    pairs = top_lift_pairs(counts_EC, category_names=["a", "b"], top_n=5, min_count=1)
    assert [(p["expert"], p["category"]) for p in pairs] == [(1, "b"), (0, "a"), (0, "b")]
    assert top_lift_pairs(counts_EC, min_count=2)[0]["category"] == "0"
    assert np.isnan(lift_table(np.array([[1, 0], [0, 0]]))[1]).all()  # expert 1 never chosen


# --- across layers -----------------------------------------------------------------------------


def test_transitions_and_paths_of_a_deterministic_pattern():
    # Token t takes path (a, a + 1, a + 2) mod 4 with a = t mod 3 for t < 60, then (3, 3, 3) x 30:
    # paths (0,1,2), (1,2,3), (2,3,0) 20 times each, (3,3,3) 30 times.
    a_T = np.r_[np.arange(60) % 3, np.full(30, 3)]
    offsets_L = np.r_[0, 1, 2] * (a_T < 3)[:, None]
    indices_TLK = ((a_T[:, None] + offsets_L) % 4)[:, :, None]
    r = LayerRoutingStats(4).update(indices_TLK).result(top_n=2)
    assert r.top_paths == [{"path": [3, 3, 3], "count": 30, "share": 30 / 90},
                           {"path": [0, 1, 2], "count": 20, "share": 20 / 90}]
    assert r.n_distinct_paths == 4 and r.path_layers == [0, 1, 2]
    expected_EE = np.zeros((4, 4))
    expected_EE[[0, 1, 2, 3], [1, 2, 3, 3]] = [20, 20, 20, 30]
    np.testing.assert_array_equal(r.transitions_LEE[0], expected_EE)
    np.testing.assert_array_equal(r.transition_probs_LEE[0], expected_EE > 0)
    sub = LayerRoutingStats(4, path_layers=[2, 0]).update(indices_TLK).result(top_n=1)
    assert sub.top_paths[0]["path"] == [3, 3] and sub.n_distinct_paths == 4


def test_code_counter_merges_like_a_counter():
    rng = np.random.default_rng(10)
    counter, reference = CodeCounter(), collections.Counter()
    counter.MIN_MERGE = 8  # merge often: the sorted-array merge against a plain Counter
    for _ in range(30):
        codes = rng.zipf(1.5, rng.integers(0, 40)).astype(np.int64)
        counter.add(codes)
        reference.update(codes.tolist())
    codes_P, counts_P = counter.most_common(len(reference))
    assert dict(zip(codes_P.tolist(), counts_P.tolist(), strict=True)) == reference
    assert counter.n_distinct == len(reference) and (np.diff(counts_P) <= 0).all()


# --- consecutive tokens ------------------------------------------------------------------------


def test_repeat_rates_of_a_known_sequence():
    # Sets (first choice first): (0,1) (0,2) (1,0) (3,2) (2,3). The 4 pairs:
    #   same first:  yes no  no  no             -> 1/4
    #   f_t in S_t+1: yes yes no  yes           -> 3/4
    #   intersect:   yes yes no  yes            -> 3/4
    #   |∩|:         1   1   0   2 -> mean 4/4/K = 1/2
    indices_TLK = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [2, 3]])[:, None, :]
    rep = LayerRoutingStats(4).update(indices_TLK).result().repeats
    assert rep.n_pairs == 4
    assert (rep.same_first_L[0], rep.first_in_next_L[0]) == (0.25, 0.75)
    assert (rep.sets_intersect_L[0], rep.mean_overlap_L[0]) == (0.75, 0.5)
    # chance: first choices 0,0,1,3,2 -> p = (2,1,1,1)/5: sum p^2 = 7/25.
    assert rep.same_first_chance_L[0] == pytest.approx(7 / 25)


def test_documents_stop_consecutive_pairs_across_chunks():
    # Top-1 sequence 0 0 | 0 0 0 with a document break after token 2: pairs 1 + 2 = 3, all same.
    indices_TLK = np.zeros((5, 1, 1), dtype=int)
    doc_T = np.array([7, 7, 9, 9, 9])
    starts_T = np.array([True, False, True, False, False])
    for kwargs in ({"doc_T": doc_T}, {"starts_T": starts_T}):
        for split in (1, 2, 3):  # the break inside a chunk, or between chunks
            stats = LayerRoutingStats(2)
            stats.update(indices_TLK[:split], **{k: v[:split] for k, v in kwargs.items()})
            stats.update(indices_TLK[split:], **{k: v[split:] for k, v in kwargs.items()})
            assert stats.n_pairs == 3, (kwargs, split)
    unbroken = LayerRoutingStats(2).update(indices_TLK[:2]).update(indices_TLK[2:])
    assert unbroken.n_pairs == 4  # without boundaries, chunks continue one stream


def test_chance_rates_match_independent_tokens():
    # Independent tokens with skewed loads: each observed rate within 4 standard errors of chance.
    rng = np.random.default_rng(2)
    p_E = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    indices_TLK = random_sets(rng, 40000, 2, 8, 2, p_E)
    rep = LayerRoutingStats(8).update(indices_TLK).result().repeats
    for name in ("same_first", "first_in_next", "sets_intersect"):
        rate_L, chance_L = getattr(rep, f"{name}_L"), getattr(rep, f"{name}_chance_L")
        se_L = np.sqrt(chance_L * (1 - chance_L) / rep.n_pairs)
        assert (np.abs(rate_L - chance_L) < 4 * se_L).all(), name
    np.testing.assert_allclose(rep.mean_overlap_L, rep.mean_overlap_chance_L, atol=0.01)
    assert rep.intersect_chance_method == "exact (observed sets)"


def test_intersect_chance_exact_against_brute_force_and_mixtral_uniform():
    # Uniform over the 28 sets of 2 of 8 experts: 1 - C(6,2)/C(8,2) = 13/28 (Mixtral's 46%).
    masks = [(1 << i) | (1 << j) for i, j in itertools.combinations(range(8), 2)]
    uniform_S = np.zeros((1, 256))
    uniform_S[0, masks] = 1
    assert intersect_chance_exact(uniform_S)[0] == pytest.approx(13 / 28)
    rng = np.random.default_rng(3)
    counts_LS = rng.integers(0, 5, (2, 64)) * (rng.random((2, 64)) < 0.5)
    p_LS = counts_LS / counts_LS.sum(1, keepdims=True)
    brute_L = [sum(p_S[s] * p_S[u] for s in range(64) for u in range(64) if s & u)
               for p_S in p_LS]
    np.testing.assert_allclose(intersect_chance_exact(counts_LS), brute_L)


def test_sampled_intersect_chance_for_many_experts():
    # E = 20 > 16: the chance comes from a sample of tokens; compare with the exact one.
    rng = np.random.default_rng(4)
    p_E = rng.dirichlet(np.ones(20))
    indices_TLK = random_sets(rng, 20000, 1, 20, 2, p_E)
    rep = LayerRoutingStats(20, sample_tokens=1500).update(indices_TLK).result().repeats
    masks_T = (1 << indices_TLK[:, 0]).sum(-1)
    exact = intersect_chance_exact(np.bincount(masks_T, minlength=2**20)[None])[0]
    assert rep.sets_intersect_chance_L[0] == pytest.approx(exact, abs=0.03)
    assert rep.intersect_chance_method == "all pairs of 1500 sampled tokens"
    assert np.isnan(intersect_chance_sampled(indices_TLK[:1], 20)).all()


def test_count_repeats_against_a_loop():
    rng = np.random.default_rng(5)
    prev_TLK, next_TLK = random_sets(rng, 50, 2, 5, 3), random_sets(rng, 50, 2, 5, 3)
    valid_T = rng.random(50) < 0.7
    expected_4L = np.zeros((4, 2))
    for t, layer in itertools.product(np.flatnonzero(valid_T), range(2)):
        a, b = prev_TLK[t, layer], next_TLK[t, layer]
        shared = len(set(a) & set(b))
        expected_4L[:, layer] += [a[0] == b[0], a[0] in b, shared > 0, shared]
    np.testing.assert_array_equal(count_repeats(prev_TLK, next_TLK, valid_T), expected_4L)


# --- chunks and memory -------------------------------------------------------------------------


def test_chunked_accumulation_equals_one_shot():
    rng = np.random.default_rng(6)
    n = 1000
    indices_TLK = random_sets(rng, n, 3, 6, 2).astype(np.int16)
    weights_TLK = rng.random((n, 3, 2))
    categories_T = rng.integers(0, 3, n)
    doc_T = np.cumsum(rng.random(n) < 0.05)

    def run(bounds, chunk_tokens):
        stats = LayerRoutingStats(6, category_names=["x", "y", "z"], chunk_tokens=chunk_tokens)
        for lo, hi in itertools.pairwise(bounds):
            stats.update(indices_TLK[lo:hi], weights_TLK[lo:hi], categories_T=categories_T[lo:hi],
                         doc_T=doc_T[lo:hi])
        return stats.result(top_n=5).to_dict()

    one_shot = run([0, n], 65536)
    assert_same(run([0, 1, 17, 17, 400, 999, n], 65536), one_shot)
    assert_same(run([0, n], 37), one_shot)
    json.dumps(one_shot)  # plain JSON
    assert one_shot["repeats"]["n_pairs"] == n - 1 - (doc_T[-1] - doc_T[0])


def test_memory_stays_bounded_with_many_tokens():
    # 200k tokens x 2 layers x 8 experts: a one-hot T x L x E float64 array alone would be 25.6 MB.
    rng = np.random.default_rng(7)
    indices_TLK = random_sets(rng, 200_000, 2, 8, 2).astype(np.int8)
    stats = LayerRoutingStats(8, chunk_tokens=4096)
    tracemalloc.start()
    stats.update(indices_TLK).result()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3_000_000


# --- two routings ------------------------------------------------------------------------------


def test_saturation_identical_disjoint_and_reordered():
    rng = np.random.default_rng(8)
    a_TLK = random_sets(rng, 500, 2, 8, 2)
    same = routing_saturation(a_TLK, a_TLK, n_experts=8)
    assert same.overlap_L.tolist() == [1.0, 1.0] and same.top1_agreement_L.tolist() == [1.0, 1.0]
    # B takes the other half of the experts: sets of {0..3} against sets of {4..7}.
    low_TLK = random_sets(rng, 500, 2, 4, 2)
    disjoint = routing_saturation(low_TLK, low_TLK + 4, n_experts=8)
    assert disjoint.overlap_L.tolist() == [0, 0] and disjoint.chance_overlap_L.tolist() == [0, 0]
    swapped = routing_saturation(a_TLK, a_TLK[:, :, ::-1], n_experts=8)
    assert swapped.overlap_L.tolist() == [1.0, 1.0] and swapped.top1_agreement_L.tolist() == [0, 0]
    json.dumps(same.to_dict())


def test_hungarian_matching_recovers_a_known_permutation():
    rng = np.random.default_rng(9)
    a_TLK = random_sets(rng, 2000, 2, 6, 2, p_E=np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05]))
    perm_LE = np.array([[3, 0, 5, 1, 4, 2], [0, 1, 2, 3, 4, 5]])
    b_TLK = np.stack([perm_LE[layer][a_TLK[:, layer]] for layer in range(2)], axis=1)
    noisy_TLK = b_TLK.copy()
    flip_T = rng.random(2000) < 0.1  # 10% of tokens routed elsewhere by the second seed
    noisy_TLK[flip_T] = random_sets(rng, int(flip_T.sum()), 2, 6, 2)
    match = match_seed_experts(a_TLK, b_TLK, n_experts=6)
    np.testing.assert_array_equal(match.permutation_LE, perm_LE)
    np.testing.assert_allclose(match.matched_overlap_L, 1.0)
    np.testing.assert_allclose(match.matched_top1_agreement_L, 1.0)
    assert match.unmatched_overlap_L[0] < 0.5 and match.unmatched_overlap_L[1] == 1.0
    noisy = match_seed_experts(a_TLK, noisy_TLK, n_experts=6, chunk_tokens=300)
    np.testing.assert_array_equal(noisy.permutation_LE, perm_LE)
    assert 0.85 < noisy.matched_overlap_L.min() < 1.0
    assert (noisy.chance_overlap_L < noisy.matched_overlap_L).all()
    relabelled_TLK = np.argsort(match.permutation_LE[0])[b_TLK[:, 0]]  # B in A's numbering
    np.testing.assert_array_equal(relabelled_TLK, a_TLK[:, 0])
    json.dumps(match.to_dict())


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, match", [
    (lambda s: s.update(np.zeros((5, 2), int)), ValueError,
     (r"indices_TLK must be 3-D \(tokens T, layers L, top_k K\); got indices_TLK.shape=\(5, 2\)"
      r"\. For one layer pass indices_TLK\[:, None, :\]")),
    (lambda s: s.update(np.zeros((5, 1, 1))), TypeError,
     r"integer expert indices; got dtype=float64\. Pass the chosen experts"),
    (lambda s: s.update(np.full((3, 1, 1), 4)), ValueError,
     r"must lie in \[0, n_experts=4\); got indices_TLK\[0, 0, 0\]=4"),
    (lambda s: s.update(np.array([[[0, 1]], [[2, 2]]])), ValueError,
     r"K experts must be distinct; got indices_TLK\[1, 0\]=\[2, 2\]"),
    (lambda s: s.update(np.zeros((3, 1, 5), int)), ValueError,
     r"K=5 experts per token but n_experts=4; got indices_TLK.shape=\(3, 1, 5\)"),
    (lambda s: s.update(np.zeros((3, 1, 1), int), np.ones((3, 1))), ValueError,
     r"weights_TLK must have the shape of indices_TLK \(3, 1, 1\); got weights_TLK.shape=\(3, 1\)"),
    (lambda s: s.update(np.zeros((3, 1, 1), int), categories_T=np.zeros(3, int)), ValueError,
     r"got categories_T but no category_names; build LayerRoutingStats\(n_experts, category_names"),
    (lambda s: s.update(np.zeros((3, 1, 1), int), doc_T=np.zeros(2, int)), ValueError,
     r"doc_T must have one entry per token, shape \(3,\); got doc_T.shape=\(2,\)"),
    (lambda s: s.update(np.zeros((3, 1, 1), int), doc_T=np.zeros(3), starts_T=np.zeros(3)),
     ValueError, "pass doc_T or starts_T, not both"),
    (lambda s: s.update(np.zeros((3, 1, 1), int)).update(np.zeros((3, 2, 1), int)), ValueError,
     r"has \(L, K\) = \(2, 1\) but earlier chunks had \(L, K\) = \(1, 1\)"),
    (lambda s: s.update(np.zeros((3, 1, 1), int), np.ones((3, 1, 1))).update(
        np.zeros((3, 1, 1), int)), ValueError, "pass weights_TLK to every update or to none"),
    (lambda s: s.result(), ValueError, r"no tokens yet; call update\(indices_TLK\) first"),
])
def test_error_messages_name_the_argument_shape_and_fix(call, error, match):
    with pytest.raises(error, match=match):
        call(LayerRoutingStats(4))


def test_category_and_path_errors():
    named = LayerRoutingStats(3, category_names=["a", "b"])
    with pytest.raises(ValueError, match="categories_T is required"):
        named.update(np.zeros((2, 1, 1), int))
    with pytest.raises(ValueError, match=r"categories_T\[1\]=2\. Add its name to category_names"):
        named.update(np.zeros((2, 1, 1), int), categories_T=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"at most 10 layers, e.g. path_layers=range\(10\)"):
        LayerRoutingStats(64).update(np.zeros((2, 11, 1), int))
    with pytest.raises(ValueError, match=r"in \[0, L=2\); got path_layers=\[5\]"):
        LayerRoutingStats(4, path_layers=[5]).update(np.zeros((2, 2, 1), int))
    with pytest.raises(ValueError, match="must route the same tokens; got shapes"):
        RoutingOverlap(4).update(np.zeros((3, 1, 1), int), np.zeros((2, 1, 1), int))
    with pytest.raises(ValueError, match=r"no tokens yet; call update\(a, b\) first"):
        RoutingOverlap(4).matched()

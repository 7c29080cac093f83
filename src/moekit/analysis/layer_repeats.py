"""Consecutive tokens repeating an expert, per layer, against the rate of independent tokens
(Jiang et al. 2024, Mixtral of Experts, sec. 5): the counts of one chunk of token pairs, the chance
rates, and the record :class:`~moekit.analysis.layer_stats.LayerRoutingStats` reports.

Shape legend: T tokens, L MoE layers, E experts, K experts chosen per token in rank order
([..., 0] is the first choice), R sampled tokens, S = 2^E subsets of experts.

S_t is token t's set of K experts at one layer, f_t its first choice, p_e the top-1 load
(P(f = e)), q_e = P(e in S) (sums to K):

- same first:     f_t = f_{t+1};                chance sum_e p_e^2;
- first in next:  f_t in S_{t+1};               chance sum_e p_e q_e;
- sets intersect: S_t and S_{t+1} share an expert (Mixtral's "first or second choice");
                  chance 1 - sum_{S, S'} P(S) P(S') [S and S' disjoint];
- mean overlap:   |S_t ∩ S_{t+1}| / K;          chance sum_e q_e^2 / K.

Chance is the rate if consecutive tokens were independent draws from the observed routing. Three
of the four depend on the loads only and are exact; "sets intersect" depends on which experts share
a token, so it uses the observed distribution of sets: exact for E <= 16 (subset sums over the 2^E
sets), else from all pairs of a uniform sample of R tokens. Uniform routing over E = 8, K = 2 gives
1 - C(6, 2) / C(8, 2) = 13/28 = 0.464, Mixtral's 46%. Only pairs within one document count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_EXACT_SET_EXPERTS = 16  # 2^16 subsets per layer: the exact set distribution stays small


def count_repeats(prev_TLK: np.ndarray, next_TLK: np.ndarray, valid_T: np.ndarray) -> np.ndarray:
    """Per layer, over the pairs (prev_t, next_t) where ``valid_T``: how many have the same first
    choice, the first choice of prev in next's set, intersecting sets; and the summed |∩|.
    Returns counts_4L (int64)."""
    n_layers, top_k = prev_TLK.shape[1:]

    def count_L(mask_TL: np.ndarray) -> np.ndarray:  # per column: faster than a bool reduction
        return np.array([np.count_nonzero(mask_TL[:, i] & valid_T) for i in range(n_layers)])

    out_4L = np.zeros((4, n_layers), dtype=np.int64)
    any_TL = np.zeros((prev_TLK.shape[0], n_layers), dtype=bool)
    for i in range(top_k):  # K^2 comparisons of T x L: short-axis reductions are slow in numpy
        hit_TL = np.zeros_like(any_TL)
        for j in range(top_k):
            hit_TL |= next_TLK[:, :, j] == prev_TLK[:, :, i]
        if i == 0:
            out_4L[0] = count_L(prev_TLK[:, :, 0] == next_TLK[:, :, 0])
            out_4L[1] = count_L(hit_TL)
        any_TL |= hit_TL
        out_4L[3] += count_L(hit_TL)
    out_4L[2] = count_L(any_TL)
    return out_4L


def intersect_chance_exact(set_counts_LS: np.ndarray) -> np.ndarray:
    """P(two independent tokens' sets intersect) per layer, from the counts of each set (indexed by
    its bit mask, S = 2^E). Subset sums g(M) = P(S' inside M) make it one pass:
    P(disjoint) = sum_S P(S) g(complement of S).

    Example (E = 2, K = 1, half the tokens on each expert: they meet half the time):
        >>> intersect_chance_exact(np.array([[0, 5, 5, 0]])).tolist()
        [0.5]
    """
    n_layers, n_sets = set_counts_LS.shape
    p_LS = set_counts_LS / np.maximum(set_counts_LS.sum(1, keepdims=True), 1)
    g_LS = p_LS.copy()
    bit = 1
    while bit < n_sets:  # the zeta transform, one expert (bit) at a time
        view = g_LS.reshape(n_layers, -1, 2, bit)
        view[:, :, 1, :] += view[:, :, 0, :]
        bit *= 2
    complement_S = (n_sets - 1) ^ np.arange(n_sets)
    return 1.0 - (p_LS * g_LS[:, complement_S]).sum(1)


def intersect_chance_sampled(sample_RLK: np.ndarray, n_experts: int) -> np.ndarray:
    """The same chance estimated over all pairs of R sampled tokens (nan for fewer than 2)."""
    n = sample_RLK.shape[0]
    if n < 2:
        return np.full(sample_RLK.shape[1], np.nan)
    chance_L = np.empty(sample_RLK.shape[1])
    rows_R1 = np.arange(n)[:, None]
    for layer in range(sample_RLK.shape[1]):
        member_RE = np.zeros((n, n_experts), dtype=np.float32)
        member_RE[rows_R1, sample_RLK[:, layer]] = 1.0
        meets = np.count_nonzero(member_RE @ member_RE.T) - n  # a token always meets itself
        chance_L[layer] = meets / (n * (n - 1))
    return chance_L


class TokenSample:
    """A uniform sample of R tokens from a stream, the R with the smallest random keys: the
    observed set distribution for :func:`intersect_chance_sampled` when 2^E sets are too many."""

    def __init__(self, size: int, shape_LK: tuple[int, ...], rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.keys_R = np.zeros(0)
        self.sample_RLK = np.zeros((0, *shape_LK), dtype=np.int64)

    def add(self, idx_TLK: np.ndarray) -> None:
        keys_T = self.rng.random(idx_TLK.shape[0])
        if self.keys_R.size == self.size:  # full: only smaller keys can enter
            small_T = keys_T < self.keys_R.max()
            keys_T, idx_TLK = keys_T[small_T], idx_TLK[small_T]
        keys_R = np.concatenate([self.keys_R, keys_T])
        sample_RLK = np.concatenate([self.sample_RLK, idx_TLK])
        if keys_R.size > self.size:
            keep_R = np.argpartition(keys_R, self.size - 1)[:self.size]
            keys_R, sample_RLK = keys_R[keep_R], sample_RLK[keep_R]
        self.keys_R, self.sample_RLK = keys_R, sample_RLK


@dataclass(frozen=True)
class RepeatRates:
    """How often consecutive tokens (within a document) repeat an expert, per layer, against the
    rate of independent tokens (the definitions are in the module docstring)."""

    n_pairs: int
    same_first_L: np.ndarray
    same_first_chance_L: np.ndarray
    first_in_next_L: np.ndarray
    first_in_next_chance_L: np.ndarray
    sets_intersect_L: np.ndarray
    sets_intersect_chance_L: np.ndarray
    mean_overlap_L: np.ndarray
    mean_overlap_chance_L: np.ndarray
    intersect_chance_method: str


def repeat_rates(counts_4L: np.ndarray, n_pairs: int, top1_load_LE: np.ndarray,
                 selection_LE: np.ndarray, top_k: int, intersect_chance_L: np.ndarray,
                 method: str) -> RepeatRates:
    """Rates from :func:`count_repeats` sums; ``selection_LE`` is q_e = P(e in S)."""
    rate_4L = counts_4L / n_pairs if n_pairs else np.full(counts_4L.shape, np.nan)
    return RepeatRates(
        n_pairs=int(n_pairs),
        same_first_L=rate_4L[0], same_first_chance_L=(top1_load_LE ** 2).sum(1),
        first_in_next_L=rate_4L[1], first_in_next_chance_L=(top1_load_LE * selection_LE).sum(1),
        sets_intersect_L=rate_4L[2], sets_intersect_chance_L=intersect_chance_L,
        mean_overlap_L=rate_4L[3] / top_k, mean_overlap_chance_L=(selection_LE ** 2).sum(1) / top_k,
        intersect_chance_method=method)
